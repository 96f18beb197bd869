"""Bind the fast kernels (moecarve.kernels) to the CarvedMoE modules of a model.

Package-only: never copied into saved folders, so a carved folder loaded without moecarve runs the
reference forward. `use_kernels(model)` sets each CarvedMoE's `fast_forward` hook to a plain
function (module, hidden_states) -> output, or None to fall through to the reference code; being a
module-level function (no closure over the module) it survives deepcopy and pickling.

Backends:
  torch   the reference forward (sorted tokens + torch._grouped_mm); removes any fast path.
  cpu     moecarve.kernels.cpu for T <= 32 tokens (any device; it reads expert ids on the host).
  triton  moecarve.kernels.triton_decode for T <= 32 tokens (CUDA, or CPU under TRITON_INTERPRET=1).
  auto    per call: cpu on CPU tensors, triton on CUDA tensors when triton imports, else torch.
Every fast path falls back to the reference for larger T, unsupported activations, and (Triton,
which has no backward) whenever autograd is recording.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..kernels.cpu import moe_decode_cpu, use_cpu_path
from ..kernels.tensors import MoETensors

BACKENDS = ("auto", "torch", "cpu", "triton")


def is_carved_moe(module: nn.Module) -> bool:
    """True for CarvedMoE, including the copies trust_remote_code loads from a carved folder."""
    return type(module).__name__ == "CarvedMoE" and hasattr(module, "fast_forward")


def moe_tensors(moe: nn.Module) -> MoETensors:
    """The module's parameters as a MoETensors (the same tensors, not copies)."""
    ex, r, sh, spec = moe.experts, moe.router, moe.shared, moe.spec
    analytic = spec.router == "analytic"
    return MoETensors(
        in_proj=ex.in_proj, out_proj=ex.out_proj, act=ex.act, act_name=spec.act, gated=ex.gated,
        top_k=r.top_k, router=spec.router,
        router_gate=r.gate if analytic else r.weight, router_up=r.up if analytic else None,
        router_scale=r.scale, router_bias=r.bias, norm_topk_prob=getattr(r, "norm_topk_prob", False),
        in_bias=ex.in_bias,
        shared_in=None if sh is None else sh.in_proj, shared_out=None if sh is None else sh.out_proj,
        shared_in_bias=None if sh is None else sh.in_bias, out_bias=moe.out_bias,
    )  # fmt: skip


def _cpu_forward(moe: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if not use_cpu_path(x.shape[0]):
        return None
    return moe_decode_cpu(x, moe_tensors(moe)).view(hidden_states.shape)


@functools.cache
def _triton():
    """The Triton decode module, or None when triton is missing or broken."""
    try:
        from ..kernels import triton_decode
    except Exception:  # no triton, no driver: the reference path still works
        return None
    return triton_decode


def _triton_forward(moe: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
    kernels = _triton()
    if kernels is None:
        return None
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    t = moe_tensors(moe)
    if not kernels.supports(t, x.shape[0]) or (torch.is_grad_enabled() and (x.requires_grad or t.in_proj.requires_grad)):
        return None
    return kernels.moe_decode_triton(x, t).view(hidden_states.shape)


def _auto_forward(moe: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
    if hidden_states.device.type == "cpu":
        return _cpu_forward(moe, hidden_states)
    if hidden_states.device.type == "cuda":
        return _triton_forward(moe, hidden_states)
    return None


_FORWARDS = {"torch": None, "cpu": _cpu_forward, "triton": _triton_forward, "auto": _auto_forward}


def use_kernels(model: nn.Module, backend: str = "auto") -> int:
    """Route every CarvedMoE in `model` through `backend`; returns how many modules were set.

    Call again with another backend to switch, or with "torch" to restore the reference forward.
    """
    if backend not in _FORWARDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton" and _triton() is None:
        raise RuntimeError("backend 'triton' needs a working triton install (pip install 'moecarve[gpu]')")
    n = 0
    for module in model.modules():
        if is_carved_moe(module):
            module.fast_forward = _FORWARDS[backend]
            n += 1
    return n
