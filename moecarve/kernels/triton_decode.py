"""Triton kernels for GPU decode (1-32 tokens) of a carved MoE layer.

Three launches, no host sync, fixed grids (so the op is CUDA-graph capturable) behind one
`torch.library.custom_op` (so torch.compile treats it as a single opaque node):

1. `_router_kernel`, one program per token: router scores, float32 softmax, top-A by repeated
   argmax, combine weights -> idx [T, A] int32, weights [T, A] x.dtype.
2. `_up_kernel`, grid (E + 1, m / BLOCK_M): the program of expert e finds which tokens picked e
   from idx, and if none exits without touching e's weights; otherwise it reads its rows of
   in_proj[e] once for all those tokens and writes act(gate) * up to h [E, T, m]. Program row E
   does the shared experts (every token) in the same launch, so both fill the GPU together.
3. `_down_kernel`, grid (d / BLOCK_N): each program owns BLOCK_N output features and sums the
   shared expert and every selected expert (weighted) in registers, so there are no atomics and
   the output is written once, deterministically.

Decode is memory bound: each selected expert's weights are read once per step however many tokens
picked it, unselected experts are never read. Token tiles are padded to 16 rows for tl.dot; the
wasted MACs are free next to the weight traffic.

Rounding follows the reference module (projection outputs, activation and product rounded to
x.dtype), so float32 matches it to ~1e-6 and bf16 to bf16 rounding. Also runs under
TRITON_INTERPRET=1 on CPU tensors (that is how the CPU tests check it).

Shapes: T tokens, d hidden, E routed experts, m expert size, n shared size, A experts per token.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .tensors import MoETensors

MAX_DECODE_TOKENS = 32

# transformers ACT2FN names -> the activation code the kernels switch on
ACTS = {
    "silu": 0, "swish": 0, "relu": 1, "gelu": 2,
    "gelu_new": 3, "gelu_pytorch_tanh": 3, "gelu_fast": 3, "quick_gelu": 4,
}  # fmt: skip


def supports(t: MoETensors) -> bool:
    """Whether the Triton kernels (decode and prefill) handle this layer."""
    return t.act_name in ACTS and t.top_k <= t.n_routed


@triton.jit
def _act(x, ACT: tl.constexpr):
    """Activation of a float32 tile (sigmoid spelled with exp: tl.sigmoid is a helper function and
    every helper call costs the interpreter a re-patch of triton.language)."""
    if ACT == 0:
        y = x / (1.0 + tl.exp(-x))
    elif ACT == 1:
        y = tl.maximum(x, 0.0)
    elif ACT == 2:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 3:  # tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = 0.5 * x * (1.0 + (2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0))
    else:
        y = x / (1.0 + tl.exp(-1.702 * x))
    return y


@triton.jit
def _router_kernel(
    x_ptr, gate_ptr, up_ptr, scale_ptr, bias_ptr, w_out_ptr, idx_out_ptr,
    E, D,
    A: tl.constexpr, ANALYTIC: tl.constexpr, HAS_UP: tl.constexpr, NORM_TOPK: tl.constexpr,
    ACT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < E
    acc_g = tl.full([BLOCK_E], 0.0, dtype=tl.float32)
    acc_u = tl.full([BLOCK_E], 0.0, dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        xk = tl.load(x_ptr + t * D + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        w_off = offs_e[:, None] * D + offs_k[None, :]
        w_mask = e_mask[:, None] & k_mask[None, :]
        acc_g += tl.sum(tl.load(gate_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32) * xk[None, :], axis=1)
        if HAS_UP:
            acc_u += tl.sum(tl.load(up_ptr + w_off, mask=w_mask, other=0.0).to(tl.float32) * xk[None, :], axis=1)

    s = acc_g.to(dt).to(tl.float32)  # the reference rounds each projection to x.dtype
    if ANALYTIC:
        s = _act(s, ACT).to(dt).to(tl.float32)
        if HAS_UP:
            s = (s * acc_u.to(dt).to(tl.float32)).to(dt).to(tl.float32)
        s = tl.abs(s)
    s = tl.where(e_mask, s, float("-inf"))
    p = tl.exp(s - tl.max(s, axis=0))
    p = p / tl.sum(p, axis=0)  # [BLOCK_E] float32 probabilities

    # top-A of p + bias by repeated argmax; rank[e] = slot of expert e, or -1
    key = tl.where(e_mask, p + tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0), float("-inf"))
    rank = tl.full([BLOCK_E], -1, dtype=tl.int32)
    for a in tl.static_range(A):
        j = tl.argmax(key, axis=0)
        rank = tl.where(offs_e == j, a, rank)
        key = tl.where(offs_e == j, float("-inf"), key)
    chosen = rank >= 0

    scale = tl.load(scale_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    if ANALYTIC:
        w = 1.0 + p * scale
    else:
        w = p
        if NORM_TOPK:
            w = w / tl.sum(tl.where(chosen, p, 0.0), axis=0)
        w = w * (1.0 + scale)
    # scatter each chosen expert to its slot: one vector store per output
    tl.store(idx_out_ptr + t * A + rank, offs_e, mask=chosen)
    tl.store(w_out_ptr + t * A + rank, w.to(w_out_ptr.dtype.element_ty), mask=chosen)


@triton.jit(do_not_specialize=["M", "NS"])  # `rows` is M or NS: one type in both branches
def _up_kernel(
    x_ptr, w_ptr, b_ptr, ws_ptr, bs_ptr, idx_ptr, h_ptr, hs_ptr,
    T, D, M, NS, E, stride_we, stride_be,
    A: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (e, j): rows j*BLOCK_M.. of expert e for the tokens that picked e (e < E), or of the
    shared experts for every token (e == E): h[e, t, :] = act(x_t gate^T + b) * (x_t up^T + b)."""
    e = tl.program_id(0)
    pid_m = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    offs_t = tl.arange(0, BLOCK_T)
    if e < E:
        offs_a = tl.arange(0, BLOCK_A)
        a_mask = (offs_t[:, None] < T) & (offs_a[None, :] < A)
        ids = tl.load(idx_ptr + offs_t[:, None] * A + offs_a[None, :], mask=a_mask, other=-1)
        sel = tl.max((ids == e).to(tl.int32), axis=1) > 0
        w_base = w_ptr + e * stride_we  # stride_we > 2**31 arrives as int64
        b_base = b_ptr + e * stride_be
        h_base = h_ptr + e * T * M
        rows = M
    else:
        sel = offs_t < T
        w_base = ws_ptr
        b_base = bs_ptr
        h_base = hs_ptr
        rows = NS
    # skip experts no token picked (their weights stay unread) and row blocks past this expert
    if (tl.max(sel.to(tl.int32), axis=0) > 0) & (pid_m * BLOCK_M < rows):
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < rows
        acc_g = tl.full([BLOCK_T, BLOCK_M], 0.0, dtype=tl.float32)
        acc_u = tl.full([BLOCK_T, BLOCK_M], 0.0, dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            xt = tl.load(x_ptr + offs_t[:, None] * D + offs_k[None, :], mask=sel[:, None] & k_mask[None, :], other=0.0)
            w_off = offs_m[:, None] * D + offs_k[None, :]
            w_mask = m_mask[:, None] & k_mask[None, :]
            wg = tl.load(w_base + w_off, mask=w_mask, other=0.0)
            if UPCAST:
                xt = xt.to(tl.float32)
                wg = wg.to(tl.float32)
            acc_g = tl.dot(xt, tl.trans(wg), acc_g, input_precision=DOT_PREC)
            if GATED:  # up rows follow the gate rows
                wu = tl.load(w_base + rows * D + w_off, mask=w_mask, other=0.0)
                if UPCAST:
                    wu = wu.to(tl.float32)
                acc_u = tl.dot(xt, tl.trans(wu), acc_u, input_precision=DOT_PREC)
        if HAS_BIAS:
            acc_g += tl.load(b_base + offs_m, mask=m_mask, other=0.0).to(tl.float32)[None, :]
        h = _act(acc_g.to(dt).to(tl.float32), ACT).to(dt)
        if GATED:
            if HAS_BIAS:
                acc_u += tl.load(b_base + rows + offs_m, mask=m_mask, other=0.0).to(tl.float32)[None, :]
            h = (h.to(tl.float32) * acc_u.to(dt).to(tl.float32)).to(dt)
        tl.store(h_base + offs_t[:, None] * rows + offs_m[None, :], h, mask=sel[:, None] & m_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, hs_ptr, ws_ptr, b_ptr, idx_ptr, cw_ptr, y_ptr,
    T, D, M, NS, E, stride_we,
    A: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[t, n] = hs_t ws_n + sum_{e picked by t} w_te h_et W_e,n + b_n for BLOCK_N features n."""
    pid_n = tl.program_id(0)
    offs_t = tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    acc = tl.full([BLOCK_T, BLOCK_N], 0.0, dtype=tl.float32)
    offs_a = tl.arange(0, BLOCK_A)
    a_off = offs_t[:, None] * A + offs_a[None, :]
    a_mask = t_mask[:, None] & (offs_a[None, :] < A)
    ids = tl.load(idx_ptr + a_off, mask=a_mask, other=-1)  # [BLOCK_T, BLOCK_A] routing of all tokens
    if HAS_SHARED:
        for k0 in range(0, NS, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < NS
            hs_mask = t_mask[:, None] & k_mask[None, :]
            hs = tl.load(hs_ptr + offs_t[:, None] * NS + offs_k[None, :], mask=hs_mask, other=0.0)
            ws_mask = n_mask[:, None] & k_mask[None, :]
            ws = tl.load(ws_ptr + offs_n[:, None] * NS + offs_k[None, :], mask=ws_mask, other=0.0)
            if UPCAST:
                hs = hs.to(tl.float32)
                ws = ws.to(tl.float32)
            acc = tl.dot(hs, tl.trans(ws), acc, input_precision=DOT_PREC)
    for e in range(0, E):
        hit = ids == e
        if tl.max(hit.to(tl.int32)) > 0:  # else expert e is never read
            sel = tl.max(hit.to(tl.int32), axis=1) > 0
            cw = tl.load(cw_ptr + a_off, mask=hit, other=0.0).to(tl.float32)
            cw = tl.sum(cw, axis=1)  # [BLOCK_T] the weight of e for each token, 0 if not picked
            acc_e = tl.full([BLOCK_T, BLOCK_N], 0.0, dtype=tl.float32)
            w_base = w_ptr + e * stride_we
            h_base = h_ptr + e * T * M
            for k0 in range(0, M, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < M
                he_mask = sel[:, None] & k_mask[None, :]
                he = tl.load(h_base + offs_t[:, None] * M + offs_k[None, :], mask=he_mask, other=0.0)
                we_mask = n_mask[:, None] & k_mask[None, :]
                we = tl.load(w_base + offs_n[:, None] * M + offs_k[None, :], mask=we_mask, other=0.0)
                if UPCAST:
                    he = he.to(tl.float32)
                    we = we.to(tl.float32)
                acc_e = tl.dot(he, tl.trans(we), acc_e, input_precision=DOT_PREC)
            acc += acc_e * cw[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_mask = t_mask[:, None] & n_mask[None, :]
    tl.store(y_ptr + offs_t[:, None] * D + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


def _dot_opts(x: torch.Tensor) -> dict:
    """float32: IEEE dots (no TF32), to match the reference. Off-GPU (the interpreter, which cannot
    multiply bf16 tiles: numpy has no bf16) tiles are upcast to float32 first; same products."""
    upcast = x.device.type != "cuda"
    return dict(DOT_PREC="ieee" if upcast or x.dtype == torch.float32 else "tf32", UPCAST=upcast)


def _route(
    x: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], scale: torch.Tensor, bias: torch.Tensor,
    top_k: int, analytic: bool, norm_topk_prob: bool, act: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    T, D = x.shape
    E = gate.shape[0]
    w = torch.empty(T, top_k, device=x.device, dtype=x.dtype)
    idx = torch.empty(T, top_k, device=x.device, dtype=torch.int32)
    _router_kernel[(T,)](
        x, gate, gate if up is None else up, scale, bias, w, idx, E, D,
        A=top_k, ANALYTIC=analytic, HAS_UP=up is not None, NORM_TOPK=norm_topk_prob, ACT=ACTS.get(act, 0),
        BLOCK_E=_pow2(E), BLOCK_K=min(128, _pow2(D, 16)),
    )  # fmt: skip
    return w, idx


@torch.library.custom_op("moecarve::route", mutates_args=())
def route_op(
    x: torch.Tensor, gate: torch.Tensor, up: Optional[torch.Tensor], scale: torch.Tensor, bias: torch.Tensor,
    top_k: int, analytic: bool, norm_topk_prob: bool, act: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Fused router: x [T, d] -> (weights [T, A] x.dtype, idx [T, A] int32)."""
    return _route(x.contiguous(), gate, up, scale, bias, top_k, analytic, norm_topk_prob, act)


@route_op.register_fake
def _(x, gate, up, scale, bias, top_k, analytic, norm_topk_prob, act):
    T = x.shape[0]
    return x.new_empty(T, top_k), x.new_empty(T, top_k, dtype=torch.int32)


@torch.library.custom_op("moecarve::experts_decode", mutates_args=())
def experts_op(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
    in_proj: torch.Tensor, out_proj: torch.Tensor, in_bias: Optional[torch.Tensor],
    shared_in: Optional[torch.Tensor], shared_out: Optional[torch.Tensor], shared_in_bias: Optional[torch.Tensor],
    out_bias: Optional[torch.Tensor], gated: bool, act: str,
) -> torch.Tensor:  # fmt: skip
    """Shared + routed experts for routed tokens: x [T, d], idx/weights [T, A] -> y [T, d]."""
    x = x.contiguous()
    idx = idx.to(torch.int32).contiguous()
    weights = weights.contiguous()
    T, D = x.shape
    E = in_proj.shape[0]
    M = out_proj.shape[-1]
    A = idx.shape[1]
    has_shared = shared_in is not None
    NS = shared_out.shape[-1] if has_shared else 0
    h = torch.empty(E, T, M, device=x.device, dtype=x.dtype)  # [E, T, m], only picked (e, t) written
    hs = torch.empty(T, NS, device=x.device, dtype=x.dtype) if has_shared else h  # [T, n]
    ws = shared_in if has_shared else in_proj
    BLOCK_T, BLOCK_A, dot = _pow2(T, 16), _pow2(A), _dot_opts(x)
    BLOCK_M = 32 if max(M, NS) <= 64 else 16  # 16 rows: enough programs to stream a 7B expert
    _up_kernel[(E + has_shared, triton.cdiv(max(M, NS), BLOCK_M))](
        x, in_proj, in_proj if in_bias is None else in_bias, ws, ws if shared_in_bias is None else shared_in_bias,
        idx, h, hs, T, D, M, NS, E, in_proj[0].numel(), in_proj.shape[1],
        A=A, GATED=gated, HAS_BIAS=in_bias is not None, ACT=ACTS.get(act, 0), **dot,
        BLOCK_T=BLOCK_T, BLOCK_A=BLOCK_A, BLOCK_M=BLOCK_M, BLOCK_K=min(128, _pow2(D, 16)),
    )  # fmt: skip
    y = torch.empty_like(x)
    BLOCK_N = min(64, _pow2(D, 16)) if D <= 1024 else 16
    _down_kernel[(triton.cdiv(D, BLOCK_N),)](
        h, out_proj, hs, out_proj if shared_out is None else shared_out, out_proj if out_bias is None else out_bias,
        idx, weights, y, T, D, M, NS, E, D * M,
        A=A, HAS_SHARED=has_shared, HAS_BIAS=out_bias is not None, **dot,
        BLOCK_T=BLOCK_T, BLOCK_A=BLOCK_A, BLOCK_N=BLOCK_N, BLOCK_K=min(64, _pow2(max(M, NS), 16)),
    )  # fmt: skip
    return y


@experts_op.register_fake
def _(x, idx, weights, in_proj, out_proj, in_bias, shared_in, shared_out, shared_in_bias, out_bias, gated, act):
    return torch.empty_like(x)


def route_triton(x: torch.Tensor, t: MoETensors) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d] -> (combine weights [T, A] x.dtype, expert indices [T, A] int32)."""
    return route_op(
        x, t.router_gate, t.router_up, t.router_scale, t.router_bias,
        t.top_k, t.router == "analytic", t.norm_topk_prob, t.act_name,
    )  # fmt: skip


def experts_triton(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """Shared + routed experts (+ output bias) for x [T, d] routed by idx/weights [T, A] -> [T, d]."""
    return experts_op(
        x, idx, weights, t.in_proj, t.out_proj, t.in_bias,
        t.shared_in, t.shared_out, t.shared_in_bias, t.out_bias, t.gated, t.act_name,
    )  # fmt: skip


def moe_decode_triton(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """The carved FFN for decode: x [T <= 32, d] -> [T, d], three kernel launches, no host sync."""
    weights, idx = route_triton(x, t)
    return experts_triton(x, idx, weights, t)
