"""Triton decode kernels for small experts (m < 16, down to single neurons): the picked experts'
neurons as one flat list, so the work and the launch count do not grow with A.

For a few tokens the carved layer is y_t = sum over token t's picked neurons n of
w_n * act(gate_n . x_t) * (up_n . x_t) * down_n: a gather over rows that each hold d contiguous
weights. Two launches after routing, fixed grids, no host sync (CUDA-graph capturable):

1. `_rows_kernel`, grid (T, cdiv(A*m, BLOCK_N)): one program per block of a token's picked
   neurons reads their gate and up rows (contiguous, d each) and writes h [T, A*m].
2. `_down_kernel`, grid (T, cdiv(d, BLOCK_D)): one program per block of output features sums
   h[t, n] * down_n over the token's neurons (down_n = out_proj[e, :, j], stride m) and the
   shared experts' contribution computed by kernels.triton_decode is added by the caller.

Unused routing slots (idx -1, from threshold selection) contribute nothing. Also runs under
TRITON_INTERPRET=1 on CPU tensors.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .tensors import MoETensors
from .triton_decode import ACTS, _act, _pow2

MAX_EXPERT_SIZE = 16  # experts up to this size take these kernels


@triton.jit
def _rows_kernel(
    x_ptr, w_ptr, b_ptr, idx_ptr, cw_ptr, h_ptr,
    D, M, N, A,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """h[t, n] = cw * act(gate . x_t + b) * (up . x_t + b) for the block of token t's neurons n
    (n = a * M + j: slot a's expert, its neuron j)."""
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    slot = offs_n // M
    j = offs_n % M
    e = tl.load(idx_ptr + t * A + slot, mask=n_mask, other=-1)
    live = n_mask & (e >= 0)
    rows = 2 * M if GATED else M
    row_g = e.to(tl.int64) * rows + j  # gate row of each neuron
    acc_g = tl.full([BLOCK_N], 0.0, dtype=tl.float32)
    acc_u = tl.full([BLOCK_N], 0.0, dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        xk = tl.load(x_ptr + t * D + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        m2 = live[:, None] & k_mask[None, :]
        wg = tl.load(w_ptr + row_g[:, None] * D + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * xk[None, :], axis=1)
        if GATED:
            wu = tl.load(w_ptr + (row_g + M)[:, None] * D + offs_k[None, :], mask=m2, other=0.0).to(tl.float32)
            acc_u += tl.sum(wu * xk[None, :], axis=1)
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + row_g, mask=live, other=0.0).to(tl.float32)
        if GATED:
            acc_u += tl.load(b_ptr + row_g + M, mask=live, other=0.0).to(tl.float32)
    h = _act(acc_g, ACT)
    if GATED:
        h = h * acc_u
    cw = tl.load(cw_ptr + t * A + slot, mask=live, other=0.0).to(tl.float32)
    tl.store(h_ptr + t * N + offs_n, tl.where(live, h * cw, 0.0), mask=n_mask)


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, idx_ptr, y_ptr, D, M, N, A,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """y[t, dblock] += sum_n h[t, n] * out_proj[e_n, dblock, j_n] over token t's neurons."""
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    acc = tl.full([BLOCK_D], 0.0, dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        e = tl.load(idx_ptr + t * A + offs_n // M, mask=n_mask, other=-1)
        live = n_mask & (e >= 0)
        j = offs_n % M
        h = tl.load(h_ptr + t * N + offs_n, mask=live, other=0.0)
        off = (e.to(tl.int64) * D * M + j)[:, None] + offs_d[None, :].to(tl.int64) * M  # [BLOCK_N, BLOCK_D]
        w = tl.load(w_ptr + off, mask=live[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * h[:, None], axis=0)
    prev = tl.load(y_ptr + t * D + offs_d, mask=d_mask, other=0.0)
    tl.store(y_ptr + t * D + offs_d, prev + acc, mask=d_mask)


@torch.library.custom_op("moecarve::neurons_decode", mutates_args=())
def neurons_op(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, in_proj: torch.Tensor, out_proj: torch.Tensor,
    in_bias: Optional[torch.Tensor], gated: bool, act: str,
) -> torch.Tensor:  # fmt: skip
    """Routed small experts for x [T, d] routed by idx / weights [T, A] -> float32 [T, d]."""
    x = x.contiguous()
    idx = idx.to(torch.int32).contiguous()
    weights = weights.contiguous()
    T, D = x.shape
    A = idx.shape[1]
    M = out_proj.shape[-1]
    N = A * M
    h = torch.empty(T, N, device=x.device, dtype=torch.float32)
    BLOCK_N, BLOCK_K = min(64, _pow2(N, 16)), min(128, _pow2(D, 16))
    _rows_kernel[(T, triton.cdiv(N, BLOCK_N))](
        x, in_proj, in_proj if in_bias is None else in_bias, idx, weights, h, D, M, N, A,
        GATED=gated, HAS_BIAS=in_bias is not None, ACT=ACTS.get(act, 0), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    y = torch.zeros(T, D, device=x.device, dtype=torch.float32)
    BLOCK_D = min(128, _pow2(D, 16))
    _down_kernel[(T, triton.cdiv(D, BLOCK_D))](h, out_proj, idx, y, D, M, N, A, BLOCK_N=min(32, _pow2(N, 16)), BLOCK_D=BLOCK_D)
    return y


@neurons_op.register_fake
def _(x, idx, weights, in_proj, out_proj, in_bias, gated, act):
    return x.new_empty(x.shape, dtype=torch.float32)


def neurons_triton(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """The routed experts of a small-expert layer for routed tokens, float32 [T, d] (shared experts
    and output bias not included)."""
    return neurons_op(x, idx, weights, t.in_proj, t.out_proj, t.in_bias, t.gated, t.act_name)
