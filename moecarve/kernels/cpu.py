"""A CPU decode path for the carved FFN: plain GEMMs over the selected experts' own weight blocks.

Decode on CPU is a few GEMVs whose cost is reading the weights, so the carved layer wins exactly
by the fraction of weights it skips, minus Python/op overhead. Here:
  * each selected expert is `F.linear` on the view `in_proj[e]` / `out_proj[e]`: contiguous blocks
    read in place, never gathered (index_select of weights is a copy of every selected expert);
  * expert ids are read with `.tolist()`: a host sync is free on CPU and it turns routing into
    Python ints that pick views;
  * one loop over the A (T = 1) or the hit (T > 1) experts, never over tokens;
  * the combine weight scales the [., m] hidden instead of the [., d] output, and T = 1 folds
    the sum into `addmm`.
For prefill-sized T the sorted grouped-mm of the reference module is faster (one C++ call over all
groups); `use_cpu_path` says where the switch is.

Shapes: T tokens, d hidden, E routed experts, m expert size, A experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tensors import MoETensors, route

# Largest T taken by this path; above it the reference grouped-mm forward is as fast or faster
# (measured on a 2-core Zen 4, reference model shapes; see bench/speed.py).
CPU_MAX_TOKENS = 32


def use_cpu_path(n_tokens: int) -> bool:
    return n_tokens <= CPU_MAX_TOKENS


def _swiglu(h: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """[T, 2m] -> act(gate) * up [T, m] (gated), or [T, m] -> act(h)."""
    if t.gated:
        g, u = h.chunk(2, dim=-1)
        return t.act(g) * u
    return t.act(h)


def _shared(x: torch.Tensor, t: MoETensors) -> torch.Tensor | None:
    """Shared experts plus the output bias, [T, d], or None when there is neither."""
    if t.shared_in is None:
        return None if t.out_bias is None else t.out_bias.expand_as(x).clone()
    h = _swiglu(F.linear(x, t.shared_in, t.shared_in_bias), t)
    return F.linear(h, t.shared_out, t.out_bias)


def _expert_hidden(x: torch.Tensor, t: MoETensors, e: int) -> torch.Tensor:
    """Expert e's hidden activations for rows x [N, d] -> [N, m], reading in_proj[e] in place."""
    b = None if t.in_bias is None else t.in_bias[e]
    return _swiglu(F.linear(x, t.in_proj[e], b), t)


def moe_decode_cpu(x: torch.Tensor, t: MoETensors) -> torch.Tensor:
    """The carved FFN for a few tokens: x [T, d] -> [T, d], same maths as CarvedMoE.forward."""
    weights, idx = route(x, t)  # [T, A], [T, A]
    y = _shared(x, t)
    if x.shape[0] == 1:
        if y is None:
            y = torch.zeros_like(x)
        for a, e in enumerate(idx[0].tolist()):
            h = _expert_hidden(x, t, e) * weights[:, a : a + 1]  # [1, m]
            y = torch.addmm(y, h, t.out_proj[e].t())  # y + h @ out_proj[e]^T, one call
        return y

    # T > 1: tokens sorted by expert, one GEMM pair per expert that any token picked.
    A = idx.shape[1]
    flat = idx.reshape(-1)  # [T*A]
    order = flat.argsort(stable=True)
    token = order // A  # [T*A] token of each sorted slot
    w = weights.reshape(-1)[order].unsqueeze(-1)  # [T*A, 1]
    counts = torch.bincount(flat, minlength=t.n_routed).tolist()
    if y is None:
        y = torch.zeros_like(x)
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        tok = token[start : start + c]
        h = _expert_hidden(x[tok], t, e) * w[start : start + c]  # [c, m]
        y.index_add_(0, tok, F.linear(h, t.out_proj[e]))
        start += c
    return y
