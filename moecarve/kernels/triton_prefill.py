"""Triton grouped GEMM for prefill (many tokens) of a carved MoE layer's routed experts.

The fused-MoE design (as in vLLM's fused_moe): token slots are sorted by expert and each expert's
run is padded to a multiple of BLOCK_M, so every BLOCK_M-row tile belongs to one expert. Then
  1. `_gemm_up_kernel`, grid (tiles, m / BLOCK_N): gathers the tile's token rows of x inside its
     loads (no permuted copy of x), multiplies by the expert's gate and up rows, applies
     act(gate) * up and writes h in sorted order [P, m];
  2. `_gemm_down_kernel`, grid (tiles, d / BLOCK_N): h times the expert's out_proj, scaled by the
     slot's combine weight and stored back at the slot's original place [T*A, d] (the weighted
     un-permute is the epilogue); a sum over the A slots of each token finishes the layer.
The alignment (sort + pad) is a handful of torch ops with no host sync: sizes are upper bounds,
unused tiles see expert id E and return at once. Shared experts and the output bias are dense
GEMMs and stay with torch (cuBLAS).

Shapes: T tokens, d hidden, E routed experts, m expert size, A experts per token, N = T*A slots,
P = padded slots <= N + E * (BLOCK_M - 1).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .tensors import MoETensors, route
from .triton_decode import ACTS, _act, _dot_opts


def align_by_expert(idx: torch.Tensor, n_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the slots of idx [T, A] by expert, each expert's run padded to a multiple of block_m.

    Returns sorted_slots [P] int32 (a slot t*A + a, or N for padding) and tile_expert [P / block_m]
    int32 (the expert of each tile, E for tiles past the end). No host sync.
    """
    flat = idx.reshape(-1).long()
    N, E = flat.numel(), n_experts
    P = triton.cdiv(N + E * (block_m - 1), block_m) * block_m
    counts = torch.zeros(E, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    starts = ends - padded
    order = flat.argsort(stable=True)  # slots sorted by expert
    expert = flat[order]
    rank = torch.arange(N, device=flat.device) - (counts.cumsum(0) - counts)[expert]  # place within its run
    sorted_slots = torch.full((P,), N, dtype=torch.int32, device=flat.device)
    sorted_slots[starts[expert] + rank] = order.to(torch.int32)
    tile_start = torch.arange(0, P, block_m, device=flat.device)
    tile_expert = torch.searchsorted(ends, tile_start, right=True).to(torch.int32)  # E past the end
    return sorted_slots, tile_expert


@triton.jit
def _gemm_up_kernel(
    x_ptr, w_ptr, b_ptr, slots_ptr, tile_expert_ptr, h_ptr,
    N, D, M, E, stride_we, stride_be,
    A: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h[p, n] = act(x_tok(p) gate_e,n + b) * (x_tok(p) up_e,n + b) for the BLOCK_M sorted slots p."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_p)
    if e < E:
        dt = x_ptr.dtype.element_ty
        offs_p = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(slots_ptr + offs_p)
        valid = slots < N
        tok = slots // A  # the permutation lives in the load addresses
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < M
        w_base = w_ptr + e * stride_we
        acc_g = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
        acc_u = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            xt = tl.load(x_ptr + tok[:, None] * D + offs_k[None, :], mask=valid[:, None] & k_mask[None, :], other=0.0)
            w_off = offs_n[None, :] * D + offs_k[:, None]  # [BLOCK_K, BLOCK_N] view of rows offs_n
            w_mask = n_mask[None, :] & k_mask[:, None]
            wg = tl.load(w_base + w_off, mask=w_mask, other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wg = wg.to(tl.float32)
            acc_g = tl.dot(xt, wg, acc_g, input_precision=DOT_PREC)
            if GATED:
                wu = tl.load(w_base + M * D + w_off, mask=w_mask, other=0.0)
                if UPCAST:
                    wu = wu.to(tl.float32)
                acc_u = tl.dot(xt, wu, acc_u, input_precision=DOT_PREC)
        b_base = b_ptr + e * stride_be
        if HAS_BIAS:
            acc_g += tl.load(b_base + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        h = _act(acc_g.to(dt).to(tl.float32), ACT).to(dt)
        if GATED:
            if HAS_BIAS:
                acc_u += tl.load(b_base + M + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            h = (h.to(tl.float32) * acc_u.to(dt).to(tl.float32)).to(dt)
        tl.store(h_ptr + offs_p[:, None] * M + offs_n[None, :], h, mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _gemm_down_kernel(
    h_ptr, w_ptr, cw_ptr, slots_ptr, tile_expert_ptr, y_ptr,
    N, D, M, E, stride_we,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[slot(p), n] = cw[slot(p)] * h[p] . out_e[n]: the weighted un-permute is the store."""
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_p)
    if e < E:
        offs_p = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
        slots = tl.load(slots_ptr + offs_p)
        valid = slots < N
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D
        w_base = w_ptr + e * stride_we
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, dtype=tl.float32)
        for k0 in range(0, M, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < M
            h_mask = valid[:, None] & k_mask[None, :]
            ht = tl.load(h_ptr + offs_p[:, None] * M + offs_k[None, :], mask=h_mask, other=0.0)
            w_mask = n_mask[None, :] & k_mask[:, None]
            wt = tl.load(w_base + offs_n[None, :] * M + offs_k[:, None], mask=w_mask, other=0.0)
            if UPCAST:
                ht = ht.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(ht, wt, acc, input_precision=DOT_PREC)
        dt = y_ptr.dtype.element_ty
        cw = tl.load(cw_ptr + slots, mask=valid, other=0.0).to(tl.float32)
        o = (acc.to(dt).to(tl.float32) * cw[:, None]).to(dt)  # the reference rounds, then weighs
        tl.store(y_ptr + slots[:, None] * D + offs_n[None, :], o, mask=valid[:, None] & n_mask[None, :])


@torch.library.custom_op("moecarve::experts_prefill", mutates_args=())
def experts_prefill_op(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
    in_proj: torch.Tensor, out_proj: torch.Tensor, in_bias: Optional[torch.Tensor], gated: bool, act: str,
) -> torch.Tensor:  # fmt: skip
    """Routed experts only: x [T, d], idx/weights [T, A] -> sum_a w_ta expert_{idx_ta}(x_t) [T, d]."""
    x, weights = x.contiguous(), weights.contiguous()
    T, D = x.shape
    A = idx.shape[1]
    E, rows, _ = in_proj.shape
    M, N = out_proj.shape[-1], T * A
    BLOCK_M = 16 if N <= 16 * E else 64  # small batches: less padding per expert
    slots, tile_expert = align_by_expert(idx, E, BLOCK_M)
    P = slots.numel()
    h = torch.empty(P, M, device=x.device, dtype=x.dtype)
    dot = _dot_opts(x)
    BN, BK = 64, 64
    _gemm_up_kernel[(P // BLOCK_M, triton.cdiv(M, BN))](
        x, in_proj, in_proj if in_bias is None else in_bias, slots, tile_expert, h,
        N, D, M, E, in_proj[0].numel(), rows,
        A=A, GATED=gated, HAS_BIAS=in_bias is not None, ACT=ACTS.get(act, 0), **dot,
        BLOCK_M=BLOCK_M, BLOCK_N=BN, BLOCK_K=BK,
    )  # fmt: skip
    y = torch.empty(N, D, device=x.device, dtype=x.dtype)
    _gemm_down_kernel[(P // BLOCK_M, triton.cdiv(D, BN))](
        h, out_proj, weights.reshape(-1), slots, tile_expert, y, N, D, M, E, D * M,
        **dot, BLOCK_M=BLOCK_M, BLOCK_N=BN, BLOCK_K=BK,
    )  # fmt: skip
    return y.view(T, A, D).sum(dim=1)


@experts_prefill_op.register_fake
def _(x, idx, weights, in_proj, out_proj, in_bias, gated, act):
    return torch.empty_like(x)


def moe_prefill_triton(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """The carved FFN for many tokens: x [T, d] -> [T, d] (router and shared experts in torch)."""
    weights, idx = route(x, t)
    y = experts_prefill_op(x, idx, weights, t.in_proj, t.out_proj, t.in_bias, t.gated, t.act_name)
    if t.shared_in is not None:
        h = F.linear(x, t.shared_in, t.shared_in_bias)
        if t.gated:
            g, u = h.chunk(2, dim=-1)
            h = t.act(g) * u
        else:
            h = t.act(h)
        y = y + F.linear(h, t.shared_out)
    if t.out_bias is not None:
        y = y + t.out_bias
    return y
