"""The CPU path for the carved FFN on a few tokens (decode, small batches), weights read in place.

First choice: the C kernels (kernels/native.c via kernels/native.py): the whole layer in one or
two calls (shadow scoring and selection included), whatever A and m are. Where they cannot be
built (no C compiler, MOECARVE_NATIVE=0) or do not apply, plain ATen GEMMs over the picked
experts' weights, described below.

Decode on CPU is a few GEMVs whose cost is reading the weights, so the carved layer wins by the
fraction of weights it skips, minus per-op overhead (~1-3 us per op, which at reference-model
sizes is the same order as a GEMV). Two ways to run the routed experts with ATen, picked per call:
  * gathered: one GEMM pair per expert any token picked, on the views `in_proj[e]` /
    `out_proj[e]` (contiguous blocks read in place, never index_select-ed: that copies every
    expert). Reads only the hit experts and does only the T*A rows of work, but costs ~7 ops per
    expert. T = 1 always takes it.
  * union: the experts lo..hi-1 spanning every hit expert as ONE dense MLP over all T tokens:
    in_proj[lo:hi] is a contiguous [(hi-lo)*2m, d] view, so the input projection is one GEMM,
    the hidden activations are multiplied by a [T, hi-lo] matrix of combine weights (0 where a
    token did not pick the expert) and the output projection is one batched GEMM. Reads the
    whole span (also unpicked experts inside it) and computes every token on every expert of it,
    in a fixed handful of ops. Once 8+ tokens are routed at E8 the hit experts are (nearly) all
    experts, so this is the dense MLP's cost and the gathered loop's overhead is pure loss.
    (Copying a non-contiguous union with index_select writes and re-reads every copied expert;
    it was not reliably faster in our measurements, so the union only reads contiguous spans.)
`use_union` chooses by a cost model in bytes of weight traffic (see there). Above
CPU_MAX_TOKENS the reference grouped-mm forward (one C++ call over all experts) takes over.

Host syncs (`.tolist()` of expert ids and counts) are free on CPU; Python floats for T = 1 feed
`addmm(alpha=w)`, which folds the weighting and the sum over experts into the GEMM. No
scatter-add (see _gathered). bf16/fp16 GEMMs run on ATen's GEMM rather than oneDNN (see
moe_decode_cpu).

Shapes: T tokens, d hidden, E routed experts, m expert size, A experts per token.
"""

from __future__ import annotations

import struct

import torch
import torch.nn.functional as F

from .tensors import MoETensors, route, router_logits, selection_threshold

# Largest T taken by this path; above it the reference grouped-mm forward (compute bound, sparse
# in work) is as fast or faster (Zen 4, reference-model shapes, float32; see bench/speed.py).
CPU_MAX_TOKENS = 64

# The union-vs-gathered cost model, in bytes of weight reading. Rough, fitted to both paths timed
# against each other on one Zen 4 core, reference-model shapes (m = 192, d = 512), T = 2..64:
# weights streamed at ~7-25 GB/s (DRAM .. L3), ~50 G fp32 multiply-adds/s.
BYTES_PER_MAC = 0.25  # one multiply-add costs as long as reading this many weight bytes
GATHER_OP_BYTES = 600_000  # the gathered loop's cost per expert beyond its GEMMs (~7 ops, a row
# gather, GEMMs of few rows: ~60-80 us), as weight bytes


_HAS_MKLDNN_SWITCH = hasattr(torch._C, "_get_mkldnn_enabled") and hasattr(torch._C, "_set_mkldnn_enabled")


def use_cpu_path(n_tokens: int) -> bool:
    return n_tokens <= CPU_MAX_TOKENS


def _swiglu(h: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """[.., 2m] -> act(gate) * up [.., m] (gated), or [.., m] -> act(h)."""
    if t.gated:
        m = h.shape[-1] // 2
        return t.act(h[..., :m]) * h[..., m:]
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
    if t.router_fn is not None:  # weights come rounded to x.dtype: exact as Python floats
        w, idx = t.router_fn(x)
        return idx[0].tolist(), w[0].float().tolist()
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


def use_union(n_tokens: int, top_k: int, n_hit: int, span: int, t: MoETensors) -> bool:
    """Whether the union path is expected to beat the gathered one (ties go to the union).

    Cost in bytes of weight traffic, with P parameters and b bytes per parameter per expert:
      union     span * P * b  + n_tokens * span * P * BYTES_PER_MAC      (every token, every expert)
      gathered  n_hit * (P * b + GATHER_OP_BYTES) + n_tokens * top_k * P * BYTES_PER_MAC
    So the union wins when the hit experts fill their span and T is small (reading dominates), or
    experts are small (op overhead dominates); the gathered loop when few experts are hit, or when
    T is large enough that the union's T * span work outweighs the bytes (it is compute bound).
    """
    P = t.in_proj[0].numel() + t.out_proj[0].numel()
    b = t.in_proj.element_size()
    union = span * P * (b + n_tokens * BYTES_PER_MAC)
    gathered = n_hit * (P * b + GATHER_OP_BYTES) + n_tokens * top_k * P * BYTES_PER_MAC
    return union <= gathered


PATHS = ("auto", "native", "gathered", "union")


def native_ok(t: MoETensors) -> bool:
    """Whether the C kernels (kernels/native.c) can run this layer (cached on t)."""
    if t.native is None:
        from . import native

        dt = t.in_proj.dtype
        tensors = (t.in_proj, t.out_proj, t.in_bias, t.shared_in, t.shared_out, t.shared_in_bias, t.out_bias)
        t.native = (
            native.supports(t.act_name, t.in_proj)
            and all(w is None or (w.dtype == dt and w.device.type == "cpu" and w.is_contiguous()) for w in tensors)
            and native.available()
        )
    return t.native


def _route(x: torch.Tensor, t: MoETensors) -> tuple[torch.Tensor, torch.Tensor]:
    """tensors.route, with the shadow router scored and selected by the C kernel where it runs."""
    from . import native

    if t.router == "shadow" and t.shadow_codes is not None and t.act_name in native.ACTS and native.available():
        scores = native.shadow_scores(x, t.shadow_codes, t.shadow_scale, t.shadow_bias, t.n_routed, t.expert_size,
                                      t.gated, t.act_name)  # fmt: skip
        weights, idx = native.select_experts(scores, t.router_bias, t.router_scale, t.top_k, selection_threshold(t))
        return weights.to(x.dtype), idx.clamp_(min=0)  # "threshold": unused slots (weight 0) name expert 0
    return route(x, t)


def _native(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """The whole layer in C: each picked expert's rows read once, in place, for every token that
    picked it, whatever A and m are. The shadow router is scored and selected in the same call;
    other routers route here first."""
    from . import native

    if t.router == "shadow" and t.shadow_codes is not None:
        y = native.moe_layer_shadow(x, t)
    else:
        weights, idx = _route(x, t)  # [T, A]
        y = native.moe_layer(x, t, idx, weights)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def tail_ok(t: MoETensors) -> bool:
    """Whether moe_decode_cpu_tail runs this layer: a shadow router and the C kernels."""
    from . import native

    return t.router == "shadow" and t.shadow_codes is not None and t.act_name in native.ACTS and native_ok(t)


def moe_decode_cpu_tail(x: torch.Tensor, t: MoETensors, codes: torch.Tensor, scale: torch.Tensor,
                        threshold: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """A carved layer with a tail (modules.moe.TailNeurons: codes uint8 [N, ceil(d/2)], scale [N],
    threshold) for a few tokens, x [T, d] -> [T, d], the maths of CarvedMoE.forward in three C calls:
    the shadow router scored once, with every routed neuron's estimate est [T, N] (N = E m); the
    picked experts as for any layer; then est * scale * column of each neuron outside the token's
    picks whose |est| passes the threshold (native.c `tail_add`; the reference dequantises all N
    columns every call)."""
    from . import native

    E, m = t.n_routed, t.expert_size
    scores, est = native.shadow_scores(x, t.shadow_codes, t.shadow_scale, t.shadow_bias, E, m, t.gated, t.act_name,
                                       estimates=True)  # fmt: skip
    weights, idx = native.select_experts(scores, t.router_bias, t.router_scale, t.top_k, selection_threshold(t))
    y = native.moe_layer(x, t, idx, weights)  # idx -1 ("threshold": an unused slot) is no expert
    y = native.tail_add(y, est, idx, weights, codes, scale, float(threshold), m)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def moe_decode_cpu(x: torch.Tensor, t: MoETensors, path: str = "auto") -> torch.Tensor:
    """The carved FFN for a few tokens: x [T, d] -> [T, d], same maths as CarvedMoE.forward.

    path: "auto" (the C kernels where they are built, else T = 1 gathered and `use_union` above),
    "native", "gathered" or "union" (tests, benchmarks).

    bf16/fp16: the GEMMs run on ATen's own reduced-precision GEMM instead of oneDNN, whose
    per-call set-up (~20 us) costs more than an expert's GEMV at these sizes (measured on Zen 4:
    S1A1E8 at reference-model shapes 290 -> 140 us per layer). Both accumulate in float32. The
    switch is process-global, so it is set for this call only.
    """
    if path not in PATHS:
        raise ValueError(f"unknown CPU path {path!r}; choose one of {', '.join(PATHS)}")
    if path == "native" or (path == "auto" and native_ok(t)):
        return _native(x, t)
    if x.dtype == torch.float32 or not _HAS_MKLDNN_SWITCH:
        return _decode(x, t, path)
    prev = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        return _decode(x, t, path)
    finally:
        torch._C._set_mkldnn_enabled(prev)


def _decode(x: torch.Tensor, t: MoETensors, path: str) -> torch.Tensor:
    if x.shape[0] == 1 and path != "union":
        idx, ws = _route_one(x, t)
        y = _shared(x, t)
        for e, w in zip(idx, ws):
            y = torch.addmm(y, _expert_hidden(x, t, e), t.out_proj[e].t(), alpha=w)  # y + w h W_e^T
        return y
    weights, idx = _route(x, t)  # [T, A], [T, A]
    counts = torch.bincount(idx.reshape(-1), minlength=t.n_routed).tolist()  # tokens per expert
    hit = [e for e, c in enumerate(counts) if c]
    lo, hi = hit[0], hit[-1] + 1
    if path == "union" or (path == "auto" and use_union(x.shape[0], idx.shape[1], len(hit), hi - lo, t)):
        return _shared(x, t) + _union(x, weights, idx, t, lo, hi)
    return _shared(x, t) + _gathered(x, weights, idx, t, counts)


def _union(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, t: MoETensors, lo: int, hi: int) -> torch.Tensor:
    """Routed experts lo..hi-1 (a span holding every picked expert) as one masked dense MLP.

    x [T, d], weights/idx [T, A] -> [T, d]. Unpicked (token, expert) pairs are computed and
    multiplied by 0 (a non-finite activation there would leak as NaN: fp16 overflow only).
    """
    T, d = x.shape
    n = hi - lo
    b = None if t.in_bias is None else t.in_bias[lo:hi].reshape(-1)
    h = F.linear(x, t.in_proj[lo:hi].reshape(n * t.in_proj.shape[1], d), b)  # [T, n*2m]: a view, no copy
    h = _swiglu(h.view(T, n, -1), t)  # [T, n, m]
    c = weights.new_zeros(T, t.n_routed).scatter_(1, idx, weights)[:, lo:hi]  # [T, n], 0 = not picked
    h = (h * c.unsqueeze(-1)).permute(1, 2, 0)  # [n, m, T]
    # out_proj[e] [d, m] as the left operand (no transpose): streams the weights as plain row-major
    # GEMMs, measured ~25% faster cache-cold than h @ out_proj[e]^T at T = 8
    return torch.bmm(t.out_proj[lo:hi], h).sum(dim=0).t()  # [n, d, T] -> [T, d]


def _gathered(
    x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, t: MoETensors, counts: list[int]
) -> torch.Tensor:
    """Routed experts, one GEMM pair per picked expert: x [T, d], weights/idx [T, A] -> [T, d].

    Slots sorted by expert; each slot's output is copied to its place and the A slots of a token
    summed (no scatter-add: index_add_ opens a thread-parallel region even for a few rows, and on
    a shared 2-core machine that was seen to stall for milliseconds; index_copy_ of a few rows
    stays single-threaded).
    """
    T, A = idx.shape
    order = idx.reshape(-1).argsort(stable=True)  # slot ids sorted by expert
    w = weights.reshape(-1)[order].unsqueeze(-1)  # [T*A, 1]
    out = x.new_empty(T * A, x.shape[1])  # every slot is written exactly once
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        slots = order[start : start + c]
        h = _expert_hidden(x[slots // A], t, e) * w[start : start + c]  # [c, m]
        out.index_copy_(0, slots, F.linear(h, t.out_proj[e]))
        start += c
    return out.view(T, A, -1).sum(dim=1)
