"""Build, load and call the C kernels in native.c (CPU decode of carved layers).

The C file is compiled on first use (kernels/build.py: the system C compiler, -O3 -march=native,
about a second, cached per machine) and called through ctypes (~1.5 us per call). Where no
compiler works, or with MOECARVE_NATIVE=0, `available()` is False and the callers keep their
pure-torch paths.

The wrappers take tensors, check what the C code assumes (contiguous, dtype, device) and pass
pointers: the kernels read the weights where the module keeps them.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import warnings
from pathlib import Path

import torch

from .build import build_library
from .tensors import MoETensors, selection_threshold

SOURCE = Path(__file__).with_name("native.c")

# transformers ACT2FN names -> the C kernels' activation codes (native.c's ACT_* enum)
ACTS = {
    "silu": 0, "swish": 0, "relu": 1, "gelu": 2,
    "gelu_new": 3, "gelu_pytorch_tanh": 3, "gelu_fast": 3, "quick_gelu": 4,
}  # fmt: skip
WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None  # why the library could not be built (reported once)


def _build() -> ctypes.CDLL:
    lib_path = build_library("native", [SOURCE])
    lib = ctypes.CDLL(str(lib_path))
    P, I, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    signatures = {
        "shadow_scores": ([P, I, I, P, I, P, P, I, I, I, I, P, P], I),
        "tail_add": ([I, I, I, I, P, P, P, I, P, P, F, P], I),
        "select_experts": ([P, I, I, P, P, I, F, P, P], I),
        "moe_layer": ([P, I, I, P, P, P, I, P, P, P, P, I, I, I, I, I, P, P, I, P], I),
        "moe_layer_shadow": ([P, I, I, P, I, P, P, P, P, I, F, P, P, P, I, P, P, P, P, I, I, I, I, I, P], I),
    }
    for name, (args, res) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernels, building them on first call; None where they cannot be built."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            if os.environ.get("MOECARVE_NATIVE", "1") == "0":
                _failed = "disabled by MOECARVE_NATIVE=0"
            else:
                try:
                    _lib = _build()
                except Exception as e:  # no compiler, unsupported flags, a read-only home ...
                    _failed = f"{type(e).__name__}: {e}"
                    warnings.warn(f"moecarve: CPU kernels unavailable ({_failed}); using the torch paths", stacklevel=2)
    return _lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supports(act_name: str, weight: torch.Tensor) -> bool:
    """Whether the kernels handle this activation and weight dtype (CPU tensors only)."""
    return act_name in ACTS and weight.dtype in WEIGHT_DTYPES and weight.device.type == "cpu"


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous float32 (itself when it already is: this runs per decode step)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.detach().float().contiguous()


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise MemoryError(f"moecarve CPU kernel {what}: out of memory")


def _inf(threshold: float | None) -> float:
    return float("inf") if threshold is None else float(threshold)


# Every tensor whose pointer goes to C is held by a local name until the call returns (a
# temporary from .float() / .contiguous() would be freed while C still reads it).


def shadow_scores(
    x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, in_bias: torch.Tensor | None,
    n_experts: int, expert_size: int, gated: bool, act_name: str, estimates: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The shadow router's scores [T, E] float32 for x [T, d] (native.c `shadow_scores`; the same
    maths as modules.moe.ShadowRouter.logits). codes: uint8 [E, rows, d/2] (two 4-bit codes per
    byte) or int8 [E, rows, d]; row_scale float32 [E, rows]; in_bias [E, rows] or None.
    estimates: also return each routed neuron's signed estimate [T, E m] float32 (as
    ShadowRouter.estimates, flattened: what a tail multiplies its columns by)."""
    x, codes, row_scale = x.float().contiguous(), codes.contiguous(), row_scale.float().contiguous()
    bias = None if in_bias is None else in_bias.float().contiguous()
    out = torch.empty(x.shape[0], n_experts, dtype=torch.float32)
    est = torch.empty(x.shape[0], n_experts * expert_size, dtype=torch.float32) if estimates else None
    rc = library().shadow_scores(
        x.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), 4 if codes.dtype == torch.uint8 else 8,
        row_scale.data_ptr(), _ptr(bias), n_experts, expert_size, int(gated), ACTS[act_name], out.data_ptr(), _ptr(est),
    )  # fmt: skip
    _check(rc, "shadow_scores")
    return (out, est) if estimates else out


def select_experts(
    scores: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, top_k: int, threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, A] float32, idx [T, A] int64) for scores [T, E]: top-A of scores + bias (ties
    to the lower index), or with `threshold` every expert whose score + bias exceeds it, at most A
    (unused slots: idx -1, weight 0); combine weight 1 + softmax(scores)_e * scale_e."""
    scores, bias, scale = (v.detach().float().contiguous() for v in (scores, bias, scale))
    T, E = scores.shape
    idx = torch.empty(T, top_k, dtype=torch.int64)
    w = torch.empty(T, top_k, dtype=torch.float32)
    rc = library().select_experts(
        scores.data_ptr(), T, E, bias.data_ptr(), scale.data_ptr(), top_k, _inf(threshold), idx.data_ptr(), w.data_ptr()
    )
    _check(rc, "select_experts")
    return w, idx


def _layer_weights(t: MoETensors) -> tuple:
    """The layer's weight pointers in native.c's order (shared, routed, out bias, dtype, sizes):
    the module's own parameters, alive as long as t (native_ok checked dtype and contiguity)."""
    n = 0 if t.shared_out is None else t.shared_out.shape[-1]
    return (
        _ptr(t.shared_in), _ptr(t.shared_in_bias), _ptr(t.shared_out), n, t.in_proj.data_ptr(), _ptr(t.in_bias),
        t.out_proj.data_ptr(), _ptr(t.out_bias), WEIGHT_DTYPES[t.in_proj.dtype], t.n_routed, t.expert_size,
        int(t.gated), ACTS[t.act_name],
    )  # fmt: skip


def moe_layer(x: torch.Tensor, t: MoETensors, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A carved layer on x [T, d] with its routing given: shared experts + out bias + sum_a
    weights[t, a] * expert_{idx[t, a]}(x[t]) -> float32 [T, d] (native.c `moe_layer`; idx -1: no
    expert). The layer's weights share one dtype (float32 or bfloat16) and are contiguous."""
    x, idx, weights = x.float().contiguous(), idx.contiguous(), weights.float().contiguous()
    T, d = x.shape
    y = torch.empty(T, d, dtype=torch.float32)
    rc = library().moe_layer(x.data_ptr(), T, d, *_layer_weights(t), idx.data_ptr(), weights.data_ptr(), idx.shape[1],
                             y.data_ptr())  # fmt: skip
    _check(rc, "moe_layer")
    return y


def tail_add(y: torch.Tensor, est: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor,
             scale: torch.Tensor, threshold: float, expert_size: int) -> torch.Tensor:  # fmt: skip
    """y [T, d] float32 (contiguous, updated in place and returned) += a layer's tail (native.c
    `tail_add`): per token, est * scale * column of every neuron outside its picked experts (idx /
    weights [T, A] as select_experts returns them) whose |est| [T, E m] exceeds threshold; codes
    uint8 [E m, ceil(d/2)], scale [E m] as modules.moe.TailNeurons keeps them."""
    assert y.dtype == torch.float32 and y.is_contiguous()
    est, idx, weights = _f32(est), idx.contiguous(), _f32(weights)
    codes, scale = codes.contiguous(), _f32(scale)
    T, d = y.shape
    rc = library().tail_add(T, d, est.shape[1] // expert_size, expert_size, est.data_ptr(), idx.data_ptr(),
                            weights.data_ptr(), idx.shape[1], codes.data_ptr(), scale.data_ptr(), float(threshold),
                            y.data_ptr())  # fmt: skip
    _check(rc, "tail_add")
    return y


def moe_layer_shadow(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """A carved layer routed by its shadow router, in one C call: score, select (top-A, or its
    threshold), run -> float32 [T, d] (native.c `moe_layer_shadow`)."""
    x = _f32(x)
    T, d = x.shape
    codes, scale = t.shadow_codes, t.shadow_scale
    assert codes.is_contiguous() and scale.dtype == torch.float32 and scale.is_contiguous()
    sbias = None if t.shadow_bias is None else _f32(t.shadow_bias)
    bias, rscale = _f32(t.router_bias), _f32(t.router_scale)
    y = torch.empty(T, d, dtype=torch.float32)
    rc = library().moe_layer_shadow(
        x.data_ptr(), T, d, codes.data_ptr(), 4 if codes.dtype == torch.uint8 else 8, scale.data_ptr(), _ptr(sbias),
        bias.data_ptr(), rscale.data_ptr(), t.top_k, _inf(selection_threshold(t)), *_layer_weights(t), y.data_ptr(),
    )  # fmt: skip
    _check(rc, "moe_layer_shadow")
    return y


if __name__ == "__main__":  # python -m moecarve.kernels.native: build and report
    lib = library()
    print("moecarve CPU kernels:", "ok" if lib is not None else f"unavailable ({_failed})", file=sys.stderr)
