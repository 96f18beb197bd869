"""Triton kernels for the shadow router on GPU decode: score, select, then the decode experts.

The same maths as modules.moe.ShadowRouter (and kernels/native.c on CPU), three launches, no host
sync (CUDA-graph capturable), behind one `torch.library.custom_op`:

1. `_quantize_kernel`, one program per token: q = round_half_even(x / s), s = max|x| / 127.
2. `_scores_kernel`, one program per routed expert: its packed 4-bit (or int8) gate/up rows are
   read once for all tokens, unpacked in registers, multiplied with the int8 tokens (exact integer
   sums in float32), scaled per row and token, then act(g) * u, |.| and the sum over the expert's
   m neurons -> scores [T, E].
3. `_select_kernel`, one program per token: the A-th largest score + bias is found by bisection on
   the float's order-preserving integer key (32 passes over E values, whatever A is), then every
   expert above it (ties to the lower index) is written in expert order; with a threshold, only
   those above it (at most A; unused slots idx -1, weight 0). Combine weight 1 + softmax * scale.

The picked experts then run through kernels.triton_decode's (or, for small experts,
kernels.triton_neurons') kernels, which skip idx -1.
Also runs under TRITON_INTERPRET=1 on CPU tensors (how the CPU tests check it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tensors import MoETensors
from .triton_decode import ACTS, _act, _pow2


@triton.jit
def _quantize_kernel(x_ptr, q_ptr, s_ptr, D, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + t * D + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0) / 127.0, 1e-30)
    v = x / s
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    r = tl.where(((r - v) == 0.5) & odd, r - 1.0, r)  # ties to even, as torch.round
    r = tl.minimum(tl.maximum(r, -127.0), 127.0)
    tl.store(q_ptr + t * D + offs, r, mask=mask)
    tl.store(s_ptr + t, s)


@triton.jit
def _scores_kernel(
    q_ptr, qs_ptr, codes_ptr, rs_ptr, b_ptr, out_ptr,
    T, D, E, M, KW,
    PACKED: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program e: scores[t, e] = sum_j |act(g~_j) * u~_j| for every token t (KW bytes per row)."""
    e = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    qs = tl.load(qs_ptr + offs_t, mask=t_mask, other=0.0)
    rows = 2 * M if GATED else M
    score = tl.full([BLOCK_T], 0.0, dtype=tl.float32)
    for j0 in range(0, M, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        j_mask = offs_j < M
        acc_g = tl.full([BLOCK_T, BLOCK_J], 0.0, dtype=tl.float32)
        acc_u = tl.full([BLOCK_T, BLOCK_J], 0.0, dtype=tl.float32)
        for k0 in range(0, KW, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < KW
            c_mask = j_mask[:, None] & k_mask[None, :]
            x_mask = t_mask[:, None] & k_mask[None, :]
            row_g = (e * rows + offs_j)[:, None] * KW + offs_k[None, :]
            cg = tl.load(codes_ptr + row_g, mask=c_mask, other=0)
            if GATED:
                cu = tl.load(codes_ptr + row_g + M * KW, mask=c_mask, other=0)
            if PACKED:  # byte k: element k (low nibble) and element k + D/2 (high nibble), each + 8
                xl = tl.load(q_ptr + offs_t[:, None] * D + offs_k[None, :], mask=x_mask, other=0.0)
                xh = tl.load(q_ptr + offs_t[:, None] * D + KW + offs_k[None, :], mask=x_mask, other=0.0)
                lo = tl.where(c_mask, (cg & 15).to(tl.float32) - 8.0, 0.0)
                hi = tl.where(c_mask, (cg >> 4).to(tl.float32) - 8.0, 0.0)
                acc_g += tl.dot(xl, tl.trans(lo), input_precision="ieee")
                acc_g += tl.dot(xh, tl.trans(hi), input_precision="ieee")
                if GATED:
                    lo = tl.where(c_mask, (cu & 15).to(tl.float32) - 8.0, 0.0)
                    hi = tl.where(c_mask, (cu >> 4).to(tl.float32) - 8.0, 0.0)
                    acc_u += tl.dot(xl, tl.trans(lo), input_precision="ieee")
                    acc_u += tl.dot(xh, tl.trans(hi), input_precision="ieee")
            else:
                xk = tl.load(q_ptr + offs_t[:, None] * D + offs_k[None, :], mask=x_mask, other=0.0)
                acc_g += tl.dot(xk, tl.trans(cg.to(tl.float32)), input_precision="ieee")
                if GATED:
                    acc_u += tl.dot(xk, tl.trans(cu.to(tl.float32)), input_precision="ieee")
        # integer dot products (exact) -> h~ = s_t * row_scale * dot + bias
        sg = tl.load(rs_ptr + e * rows + offs_j, mask=j_mask, other=0.0)
        h = acc_g * (qs[:, None] * sg[None, :])
        if HAS_BIAS:
            h += tl.load(b_ptr + e * rows + offs_j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
        h = _act(h, ACT)
        if GATED:
            su = tl.load(rs_ptr + e * rows + M + offs_j, mask=j_mask, other=0.0)
            u = acc_u * (qs[:, None] * su[None, :])
            if HAS_BIAS:
                u += tl.load(b_ptr + e * rows + M + offs_j, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            h = h * u
        score += tl.sum(tl.where(j_mask[None, :], tl.abs(h), 0.0), axis=1)
    tl.store(out_ptr + offs_t * E + e, score, mask=t_mask)


@triton.jit
def _key(v):
    """An int32 whose order is the float32's (for the bisection)."""
    i = v.to(tl.int32, bitcast=True)
    return tl.where(i < 0, i ^ 0x7FFFFFFF, i)


@triton.jit
def _select_kernel(
    s_ptr, bias_ptr, scale_ptr, thr_ptr, idx_ptr, w_ptr, E, K,
    A_PAD: tl.constexpr, HAS_THRESHOLD: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    """Program t: the K best of scores + bias (above the threshold if any) -> slots 0.. of idx/w [T, A_PAD]."""
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    s = tl.load(s_ptr + t * E + offs, mask=mask, other=float("-inf"))
    v = tl.where(mask, s + tl.load(bias_ptr + offs, mask=mask, other=0.0), float("-inf"))
    if HAS_THRESHOLD:
        v = tl.where(v > tl.load(thr_ptr), v, float("-inf"))
    key = _key(v)
    # the K-th largest key by bisection: lo <= kth < hi, count(key >= lo) >= K
    lo = tl.min(key, axis=0).to(tl.int64)
    hi = tl.max(key, axis=0).to(tl.int64) + 1
    for _ in range(33):
        mid = (lo + hi) // 2
        ok = tl.sum((key >= mid).to(tl.int32), axis=0) >= K
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    kth = lo.to(tl.int32)
    above = key > kth
    ties = (key == kth) & mask
    room = K - tl.sum(above.to(tl.int32), axis=0)
    take = above | (ties & (tl.cumsum(ties.to(tl.int32), axis=0) <= room))
    take = take & (v > float("-inf"))  # a threshold may leave fewer than K
    slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
    p = tl.exp(s - tl.max(s, axis=0))
    p = p / tl.sum(p, axis=0)
    w = 1.0 + p * tl.load(scale_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.sum(take.to(tl.int32), axis=0)
    rest = tl.arange(0, A_PAD)
    tl.store(idx_ptr + t * A_PAD + rest, tl.full([A_PAD], -1, tl.int32), mask=rest >= n)  # unused slots
    tl.store(w_ptr + t * A_PAD + rest, tl.full([A_PAD], 0.0, tl.float32), mask=rest >= n)
    tl.store(idx_ptr + t * A_PAD + slot, offs, mask=take)
    tl.store(w_ptr + t * A_PAD + slot, w, mask=take)


def _shadow_route(
    x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, in_bias: torch.Tensor | None,
    bias: torch.Tensor, scale: torch.Tensor, threshold: torch.Tensor | None, m: int, top_k: int, gated: bool, act: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    T, D = x.shape
    E, KW = codes.shape[0], codes.shape[-1]
    q = torch.empty(T, D, device=x.device, dtype=torch.float32)
    qs = torch.empty(T, device=x.device, dtype=torch.float32)
    _quantize_kernel[(T,)](x, q, qs, D, BLOCK_D=_pow2(D))
    scores = torch.empty(T, E, device=x.device, dtype=torch.float32)
    _scores_kernel[(E,)](
        q, qs, codes, row_scale, row_scale if in_bias is None else in_bias, scores, T, D, E, m, KW,
        PACKED=codes.dtype == torch.uint8, GATED=gated, HAS_BIAS=in_bias is not None, ACT=ACTS[act],
        BLOCK_T=_pow2(T, 16), BLOCK_J=min(32, _pow2(m, 16)), BLOCK_K=min(64, _pow2(KW, 16)),
    )  # fmt: skip
    A_PAD = _pow2(top_k)  # tl.arange needs a power of two: pad the slots, keep the first top_k
    idx = torch.empty(T, A_PAD, device=x.device, dtype=torch.int32)
    w = torch.empty(T, A_PAD, device=x.device, dtype=torch.float32)
    _select_kernel[(T,)](
        scores, bias, scale, bias if threshold is None else threshold, idx, w, E, top_k,
        A_PAD=A_PAD, HAS_THRESHOLD=threshold is not None, BLOCK_E=_pow2(E),
    )  # fmt: skip
    return w[:, :top_k].to(x.dtype), idx[:, :top_k].contiguous()


@torch.library.custom_op("moecarve::shadow_route", mutates_args=())
def shadow_route_op(
    x: torch.Tensor, codes: torch.Tensor, row_scale: torch.Tensor, in_bias: torch.Tensor | None,
    bias: torch.Tensor, scale: torch.Tensor, threshold: torch.Tensor | None, m: int, top_k: int, gated: bool, act: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The shadow router: x [T, d] -> (weights [T, A] x.dtype, idx [T, A] int32, -1 = none)."""
    return _shadow_route(x.contiguous(), codes, row_scale, in_bias, bias, scale, threshold, m, top_k, gated, act)


@shadow_route_op.register_fake
def _(x, codes, row_scale, in_bias, bias, scale, threshold, m, top_k, gated, act):
    T = x.shape[0]
    return x.new_empty(T, top_k), x.new_empty(T, top_k, dtype=torch.int32)


def shadow_route_triton(x: torch.Tensor, t: MoETensors) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] -> (combine weights [T, A] x.dtype, expert indices [T, A] int32; -1 = none)."""
    return shadow_route_op(
        x, t.shadow_codes, t.shadow_scale, t.shadow_bias, t.router_bias, t.router_scale, t.shadow_threshold,
        t.expert_size, t.top_k, t.gated, t.act_name,
    )  # fmt: skip
