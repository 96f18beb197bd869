"""The runtime's C library: built on first use (kernels/build.py) from runtime/csrc/*.c and
kernels/native.c (the shadow router's scoring and the top-A selection it shares with the carved
layers' kernels), and the ctypes mirror of its structures (runtime/csrc/rt.h: change both together).
"""

from __future__ import annotations

import ctypes
import threading
from ctypes import POINTER, Structure, c_float, c_int32, c_int64, c_void_p
from pathlib import Path

from ..kernels.build import BuildError, build_library

CSRC = Path(__file__).with_name("csrc")
KERNELS = Path(__file__).resolve().parents[1] / "kernels"

# rt.h's enums
F32, BF16, I8 = 0, 1, 2
PANEL, ROWS = 0, 1
NORM_RMS, NORM_LAYER = 0, 1
FFN_NONE, FFN_DENSE, FFN_MOE = 0, 1, 2
ROUTER_SHADOW, ROUTER_ANALYTIC, ROUTER_LINEAR, ROUTER_FITTED = 0, 1, 2, 3
PANEL_ROWS, BLOCK = 16, 32
PHASES = ("embed", "qkv", "attention", "wo", "ffn_norm", "router", "ffn", "lm_head")  # rt_profile's order


class Mat(Structure):
    _fields_ = [("data", c_void_p), ("scales", c_void_p), ("rows", c_int32), ("cols", c_int32),
                ("dtype", c_int32), ("layout", c_int32)]  # fmt: skip


class Norm(Structure):
    _fields_ = [("w", c_void_p), ("b", c_void_p), ("eps", c_float)]


class Dense(Structure):
    _fields_ = [("in_w", Mat), ("out_w", Mat), ("in_b", c_void_p), ("out_b", c_void_p), ("n", c_int32)]


class Moe(Structure):
    _fields_ = [
        ("E", c_int32), ("m", c_int32), ("A", c_int32),
        ("neurons", Mat), ("per", c_int32), ("bias", c_void_p), ("shared", Dense), ("out_bias", c_void_p), ("all", Dense),
        ("router", c_int32), ("rank_softmax", c_int32), ("weight_mode", c_int32),
        ("r_bias", c_void_p), ("r_scale", c_void_p), ("threshold", c_float),
        ("sh_codes", c_void_p), ("sh_bits", c_int32), ("sh_scale", c_void_p), ("sh_bias", c_void_p),
        ("r_w", c_void_p), ("r_b", c_void_p), ("probe_w", c_void_p), ("probe_b", c_void_p), ("probes", c_int32),
        ("tail_codes", c_void_p), ("tail_scale", c_void_p), ("tail_threshold", c_float),
    ]  # fmt: skip


class Layer(Structure):
    _fields_ = [
        ("in_norm", Norm), ("post_attn_norm", Norm), ("ffn_norm", Norm), ("post_ffn_norm", Norm),
        ("wqkv", Mat), ("bqkv", c_void_p), ("q_norm", c_void_p), ("k_norm", c_void_p), ("qk_norm_full", c_int32),
        ("qk_norm_after_rope", c_int32), ("qk_eps", c_float), ("parallel", c_int32),
        ("wo", Mat), ("bo", c_void_p), ("window", c_int32), ("inv_freq", c_void_p), ("rope_scale", c_float),
        ("ffn_kind", c_int32), ("act", c_int32), ("gated", c_int32), ("dense", Dense), ("moe", Moe),
    ]  # fmt: skip


class Desc(Structure):
    _fields_ = [
        ("n_layers", c_int32), ("d", c_int32), ("H", c_int32), ("Hkv", c_int32), ("hd", c_int32), ("rot", c_int32),
        ("vocab", c_int32), ("max_ctx", c_int32), ("max_slots", c_int32), ("max_tokens", c_int32),
        ("norm_kind", c_int32), ("norm_eps", c_float),
        ("embed_scale", c_float), ("residual_scale", c_float), ("attn_scale", c_float), ("attn_softcap", c_float),
        ("final_softcap", c_float), ("logit_scale", c_float),
        ("pos_offset", c_int32), ("rope_interleaved", c_int32), ("kv_dtype", c_int32),
        ("embed", Mat), ("pos_embed", Mat), ("final_norm", Norm), ("lm_head", Mat), ("lm_bias", c_void_p),
        ("layers", POINTER(Layer)),
    ]  # fmt: skip


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def library() -> ctypes.CDLL:
    """The compiled runtime (built on first call, about ten seconds; cached per machine).
    Raises kernels.build.BuildError where it cannot be built (no C compiler)."""
    global _lib
    with _lock:
        if _lib is None:
            sources = sorted(CSRC.glob("*.c")) + [KERNELS / "native.c"]
            lib = ctypes.CDLL(str(build_library("runtime", sources, [CSRC, KERNELS], ["-lpthread"])))
            lib.rt_create.argtypes, lib.rt_create.restype = [POINTER(Desc), c_int32], c_void_p
            lib.rt_free.argtypes, lib.rt_free.restype = [c_void_p], None
            lib.rt_threads.argtypes, lib.rt_threads.restype = [c_void_p], c_int32
            lib.rt_features.argtypes, lib.rt_features.restype = [], ctypes.c_char_p
            P = c_void_p
            lib.rt_step.argtypes = [P, c_int32, P, P, P, c_int32, c_int32, P, P, c_int64]
            lib.rt_step.restype = c_int32
            lib.rt_profile.argtypes, lib.rt_profile.restype = [P, c_int32, P], None
            _lib = lib
    return _lib


def features() -> str:
    """The CPU features the runtime was built with ("avx512 bf16 vnni", ..., "portable")."""
    return library().rt_features().decode()


__all__ = ["BuildError", "Desc", "Layer", "Mat", "Moe", "Dense", "Norm", "library", "features"]
