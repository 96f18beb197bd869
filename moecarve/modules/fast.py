"""Bind the fast kernels (moecarve.kernels) to the CarvedMoE modules of a model.

Package-only: never copied into saved folders, so a carved folder loaded without moecarve runs the
reference forward. `use_kernels(model)` sets each CarvedMoE's `fast_forward` hook to a plain
function (module, hidden_states) -> output, or None to fall through to the reference code; being a
module-level function (no closure over the module) it survives deepcopy and pickling.

Backends (T = tokens in the call):
  torch   the reference forward (sorted tokens + torch._grouped_mm); removes any fast path.
  cpu     kernels.cpu for T <= CPU_MAX_TOKENS: the C kernels (kernels/native.c: each picked
          expert read once, in place, one call per layer), or where no C compiler is available
          gathered experts / one masked dense GEMM over the picked experts' span by a bytes-read
          rule; else the reference (any device; reads expert ids on the host, free on CPU only).
  triton  kernels.triton_decode for T <= 32 (kernels.triton_neurons for experts of <= 16
          neurons), kernels.triton_prefill above (CUDA, or CPU tensors under TRITON_INTERPRET=1).
  auto    per call: CPU tensors -> cpu; CUDA tensors -> Triton decode for T <= 32, and for larger
          T the reference where torch._grouped_mm runs (bf16 on sm90+), else Triton prefill.
Routers: the analytic and linear routers run inside the kernels (fused in Triton decode); the
shadow router has its own kernels (C on CPU: kernels/native.c, one call per layer; Triton:
kernels/triton_shadow.py); any other router (the "fitted" probe router) is called as the module's
own `router` and its choice fed to the same expert kernels. Layers with a tail (TailNeurons) take the
CPU path's C router and experts plus the tail in torch; the Triton paths leave them to the reference.
Every path falls back to the reference for unsupported activations and whenever autograd is recording (run inference under
torch.no_grad / inference_mode, as generate() does). The CPU path calls C through ctypes (or
.tolist() without it), so under torch.compile it splits the graph; the Triton paths are single
custom ops and trace whole.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cpu import moe_decode_cpu, moe_decode_cpu_tail, tail_ok, use_cpu_path
from ..kernels.tensors import MoETensors
from .moe import _grouped_mm_ok

BACKENDS = ("auto", "torch", "cpu", "triton")
KERNEL_ROUTERS = ("analytic", "linear")  # routers the kernels compute; others run as the module's router


def is_carved_moe(module: nn.Module) -> bool:
    """True for CarvedMoE, including the copies trust_remote_code loads from a carved folder."""
    return type(module).__name__ == "CarvedMoE" and hasattr(module, "fast_forward")


# ACT2FN names whose module is exactly this function: calling it skips nn.Module.__call__ (~2 us)
FUNCTIONAL_ACTS = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
}  # fmt: skip


def _router_pack(r: nn.Module) -> torch.Tensor | None:
    """The analytic router's gate and up rows stacked in float32 [2E, d], kept on the module and
    rebuilt when either parameter changes (new storage or an in-place update bumps _version)."""
    if getattr(r, "up", None) is None:
        return None
    key = (r.gate.data_ptr(), r.gate._version, r.up.data_ptr(), r.up._version)
    cached = r.__dict__.get("_moecarve_router_pack")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, torch.cat([r.gate, r.up]).float())
        r.__dict__["_moecarve_router_pack"] = cached
    return cached[1]


def moe_tensors(moe: nn.Module, pack_router: bool = False) -> MoETensors:
    """The module's parameters as a MoETensors (the same tensors, not copies; `pack_router` adds
    the cached [2E, d] float32 router stack, a few KB). Routers outside KERNEL_ROUTERS (e.g.
    "fitted") are passed as `router_fn`, the module's router itself."""
    ex, r, sh, spec = moe.experts, moe.router, moe.shared, moe.spec
    analytic = spec.router == "analytic"
    own = spec.router not in KERNEL_ROUTERS
    return MoETensors(
        in_proj=ex.in_proj, out_proj=ex.out_proj, act=FUNCTIONAL_ACTS.get(spec.act, ex.act), act_name=spec.act,
        gated=ex.gated, router_packed=_router_pack(r) if pack_router and analytic else None,
        top_k=r.top_k, router=spec.router, router_fn=r if own else None,
        router_gate=r.gate if analytic else getattr(r, "weight", None), router_up=r.up if analytic else None,
        router_scale=r.scale, router_bias=r.bias, norm_topk_prob=getattr(r, "norm_topk_prob", False),
        in_bias=ex.in_bias,
        shared_in=None if sh is None else sh.in_proj, shared_out=None if sh is None else sh.out_proj,
        shared_in_bias=None if sh is None else sh.in_bias, out_bias=moe.out_bias,
        shadow_codes=getattr(r, "codes", None), shadow_scale=getattr(r, "row_scale", None),
        shadow_bias=getattr(r, "in_bias", None) if spec.router == "shadow" else None,
        shadow_threshold=r.threshold if getattr(r, "selection", "topk") == "threshold" else None,
    )  # fmt: skip


def _cached_tensors(moe: nn.Module) -> MoETensors:
    """moe_tensors(moe, pack_router=True), built once per module (use_kernels drops it): the
    fields are the Parameter objects themselves, so in-place updates and .to() are seen. The router
    bias is a buffer, which .to() replaces, and the packed router a derived copy: both are looked
    up again per call. Saves ~10 us of nn.Module attribute lookups per layer and token."""
    t = moe.__dict__.get("_moecarve_tensors")
    if t is None:
        t = moe.__dict__["_moecarve_tensors"] = moe_tensors(moe)
    r = moe.router
    t.router_bias = r.bias
    if t.router == "analytic":
        t.router_packed = _router_pack(r)
    elif t.router_fn is not None:
        t.router_fn = r
        if t.router == "shadow":  # buffers too
            t.shadow_codes = r.codes
            if t.shadow_threshold is not None:
                t.shadow_threshold = r.threshold
    return t


def _recording(x: torch.Tensor, moe: nn.Module) -> bool:
    """Autograd is recording this call: the fast paths (Python-float weights, custom ops without
    backward) leave it to the reference ops."""
    return torch.is_grad_enabled() and (x.requires_grad or moe.experts.in_proj.requires_grad)


def _tailed(moe: nn.Module) -> bool:
    """The layer has a tail (modules.moe.TailNeurons): the CPU path computes it beside its C kernels
    (kernels.cpu.moe_decode_cpu_tail); the Triton paths do not, and run the reference code."""
    return getattr(moe, "tail", None) is not None


def _cpu_forward(moe: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    if x.shape[0] == 0 or not use_cpu_path(x.shape[0]) or _recording(x, moe):
        return None
    t = _cached_tensors(moe)
    if _tailed(moe):  # the C router and experts, the tail from the router's estimates (kernels.cpu)
        if not tail_ok(t):
            return None
        tail = moe.tail
        return moe_decode_cpu_tail(x, t, tail.codes, tail.scale, tail.threshold).view(hidden_states.shape)
    return moe_decode_cpu(x, t).view(hidden_states.shape)


_TRITON: tuple | None = None  # (triton_decode, triton_prefill, triton_shadow, triton_neurons) once imported


def _load_triton() -> tuple | None:
    """Import the Triton kernels (outside any traced code), or None when triton is unusable."""
    global _TRITON
    if _TRITON is None:
        try:
            from ..kernels import triton_decode, triton_neurons, triton_prefill, triton_shadow
        except Exception:  # no triton, no driver: the reference path still works
            return None
        _TRITON = (triton_decode, triton_prefill, triton_shadow, triton_neurons)
    return _TRITON


def _triton_call(moe: nn.Module, hidden_states: torch.Tensor, prefill: str) -> torch.Tensor | None:
    """prefill: "triton" (Triton grouped GEMM above 32 tokens) or "auto" (the reference where
    torch._grouped_mm runs, else Triton)."""
    if _TRITON is None:
        return None
    decode, grouped, shadow, neurons = _TRITON
    x = hidden_states.reshape(-1, hidden_states.shape[-1])
    T = x.shape[0]
    if _tailed(moe):
        return None
    t = moe_tensors(moe)
    if T == 0 or not decode.supports(t) or _recording(x, moe):
        return None
    if T <= decode.MAX_DECODE_TOKENS:
        if t.router == "shadow":  # scored and selected in Triton
            weights, idx = shadow.shadow_route_triton(x, t)
        elif t.router_fn is not None:  # e.g. the probe router: the module routes, the kernels run the experts
            weights, idx = t.router_fn(x)
        else:
            weights, idx = decode.route_triton(x, t)
        if t.expert_size <= neurons.MAX_EXPERT_SIZE:  # small experts: one flat list of picked neurons
            y = neurons.neurons_triton(x, idx, weights, t).to(x.dtype)
            if moe.shared is not None:
                y = y + moe.shared(x)
            if moe.out_bias is not None:
                y = y + moe.out_bias
            return y.view(hidden_states.shape)
        return decode.experts_triton(x, idx, weights, t).view(hidden_states.shape)
    if prefill == "auto" and _grouped_mm_ok(x):
        return None
    return grouped.moe_prefill_triton(x, t).view(hidden_states.shape)


def _triton_forward(moe: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
    return _triton_call(moe, hidden_states, prefill="triton")


def _auto_forward(moe: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor | None:
    if hidden_states.device.type == "cpu":
        return _cpu_forward(moe, hidden_states)
    if hidden_states.device.type == "cuda":
        return _triton_call(moe, hidden_states, prefill="auto")
    return None


_FORWARDS = {"torch": None, "cpu": _cpu_forward, "triton": _triton_forward, "auto": _auto_forward}


def use_kernels(model: nn.Module, backend: str = "auto") -> int:
    """Route every CarvedMoE in `model` through `backend`; returns how many modules were set.

    Call again with another backend to switch, or with "torch" to restore the reference forward,
    and after replacing (not updating in place) any parameter of a carved layer.
    """
    if backend not in _FORWARDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "triton" or (backend == "auto" and torch.cuda.is_available()):
        if _load_triton() is None and backend == "triton":
            raise RuntimeError("backend 'triton' needs a working triton install (pip install 'moecarve[gpu]')")
    n = 0
    for module in model.modules():
        if is_carved_moe(module):
            module.fast_forward = _FORWARDS[backend]
            module.__dict__.pop("_moecarve_tensors", None)  # rebuilt from the current parameters
            n += 1
    return n
