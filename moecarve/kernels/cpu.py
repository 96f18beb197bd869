"""A CPU decode path for the carved FFN: plain GEMMs over the selected experts' own weight blocks.

Decode on CPU is a few GEMVs whose cost is reading the weights, so the carved layer wins by the
fraction of weights it skips, minus per-op overhead (~1-3 us per op, which at reference-model
sizes is the same order as a GEMV). Hence:
  * each selected expert is a GEMM on the views `in_proj[e]` / `out_proj[e]`: contiguous blocks
    read in place, never gathered (index_select of weights copies every selected expert);
  * expert ids and (T = 1) combine weights are read with `.tolist()`: a host sync is free on CPU
    and Python ints/floats pick views and feed `addmm(alpha=w)`, which folds the weighting and
    the sum over experts into the GEMM;
  * one loop over the A (T = 1) or the hit (T > 1) experts, never over tokens, and no
    scatter-add (see below);
  * slices instead of chunk, functional activations (the binding passes F.silu, not a module);
  * bf16/fp16 GEMVs on ATen's GEMM rather than oneDNN (see moe_decode_cpu).
For larger T the reference's sorted grouped-mm is one C++ call over all groups and wins;
`use_cpu_path` says where the switch is.

Shapes: T tokens, d hidden, E routed experts, m expert size, A experts per token.
"""

from __future__ import annotations

import struct

import torch
import torch.nn.functional as F

from .tensors import MoETensors, route, router_logits

# Largest T taken by this path; above it the reference grouped-mm forward is as fast or faster
# (2-core Zen 4, reference-model shapes, float32; see bench/speed.py and bench/RESULTS.md).
CPU_MAX_TOKENS = 4


_HAS_MKLDNN_SWITCH = hasattr(torch._C, "_get_mkldnn_enabled") and hasattr(torch._C, "_set_mkldnn_enabled")


def use_cpu_path(n_tokens: int) -> bool:
    return n_tokens <= CPU_MAX_TOKENS


def _swiglu(h: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """[T, 2m] -> act(gate) * up [T, m] (gated), or [T, m] -> act(h)."""
    if t.gated:
        m = h.shape[-1] // 2
        return t.act(h[:, :m]) * h[:, m:]
    return t.act(h)


def _shared(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """Shared experts plus the output bias, [T, d] (zeros when there is neither)."""
    if t.shared_in is None:
        return torch.zeros_like(x) if t.out_bias is None else t.out_bias.expand_as(x).clone()
    h = _swiglu(F.linear(x, t.shared_in, t.shared_in_bias), t)
    return F.linear(h, t.shared_out, t.out_bias)


def _expert_hidden(x: torch.Tensor, t: MoETensors, e: int) -> torch.Tensor:
    """Expert e's hidden activations for rows x [N, d] -> [N, m], reading in_proj[e] in place."""
    b = None if t.in_bias is None else t.in_bias[e]
    return _swiglu(F.linear(x, t.in_proj[e], b), t)


def _round(v: float, dtype: torch.dtype) -> float:
    """v rounded to dtype (the reference casts combine weights to x.dtype)."""
    if dtype == torch.bfloat16:  # round-to-nearest-even on the top 16 bits of the float32
        bits = struct.unpack("<I", struct.pack("<f", v))[0]
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return struct.unpack("<f", struct.pack("<I", bits))[0]
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", v))[0]
    return struct.unpack("<f", struct.pack("<f", v))[0]


def _route_one(x: torch.Tensor, t: MoETensors) -> tuple[list[int], list[float]]:
    """Routing of a single token x [1, d] as Python ints and floats (same maths as `route`)."""
    probs = router_logits(x, t).softmax(dim=-1)  # [1, E] float32
    idx = torch.topk(probs + t.router_bias, t.top_k, dim=-1).indices[0].tolist()
    p_all, s_all = probs[0].tolist(), t.router_scale.tolist()
    p = [p_all[e] for e in idx]
    if t.router == "analytic":
        w = [1.0 + pe * s_all[e] for pe, e in zip(p, idx)]
    else:
        if t.norm_topk_prob:
            total = sum(p)
            p = [pe / total for pe in p]
        w = [pe * (1.0 + s_all[e]) for pe, e in zip(p, idx)]
    return idx, [_round(v, x.dtype) for v in w]


def moe_decode_cpu(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """The carved FFN for a few tokens: x [T, d] -> [T, d], same maths as CarvedMoE.forward.

    bf16/fp16: the GEMVs run on ATen's own reduced-precision GEMM instead of oneDNN, whose
    per-call set-up (~20 us) costs more than an expert's GEMV at these sizes (measured on Zen 4:
    S1A1E8 at reference-model shapes 290 -> 140 us per layer). Both accumulate in float32. The
    switch is process-global, so it is set for this call only.
    """
    if x.dtype == torch.float32 or not _HAS_MKLDNN_SWITCH:
        return _decode(x, t)
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return _decode(x, t)
    finally:
        torch._C._set_mkldnn_enabled(prev)


def _decode(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    if x.shape[0] == 1:
        idx, ws = _route_one(x, t)
        y = _shared(x, t)
        for e, w in zip(idx, ws):
            y = torch.addmm(y, _expert_hidden(x, t, e), t.out_proj[e].t(), alpha=w)  # y + w h W_e^T
        return y

    # T > 1: slots sorted by expert, one GEMM pair per expert that any token picked. Each slot's
    # output is copied to its place and the A slots of a token summed (no scatter-add: index_add_
    # opens a thread-parallel region even for a few rows, and on a shared 2-core machine that was
    # seen to stall for milliseconds; index_copy_ of a few rows stays single-threaded).
    weights, idx = route(x, t)  # [T, A], [T, A]
    T, A = idx.shape
    flat = idx.reshape(-1)  # [T*A]
    order = flat.argsort(stable=True)  # slot ids sorted by expert
    w = weights.reshape(-1)[order].unsqueeze(-1)  # [T*A, 1]
    counts = torch.bincount(flat, minlength=t.n_routed).tolist()
    out = x.new_empty(T * A, x.shape[1])  # every slot is written exactly once
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        slots = order[start : start + c]
        h = _expert_hidden(x[slots // A], t, e) * w[start : start + c]  # [c, m]
        out.index_copy_(0, slots, F.linear(h, t.out_proj[e]))
        start += c
    return _shared(x, t) + out.view(T, A, -1).sum(dim=1)
