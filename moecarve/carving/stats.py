"""Activation statistics of an FFN on calibration inputs (tensors in, tensors out).

Shapes: T calibration tokens, d hidden size, I intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ffn import DenseFFN


def normalized_rows(ffn: DenseFFN) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The L2-normalised input rows (up [I, d], gate [I, d] or None), float32: computed once per
    layer, not once per token chunk."""
    up = F.normalize(ffn.up.float(), dim=-1)
    return up, (F.normalize(ffn.gate.float(), dim=-1) if ffn.gated else None)


def normalized_hidden(
    ffn: DenseFFN, x: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor | None] | None = None
) -> torch.Tensor:
    """CMoE's scale-free activations h = act(x^ G^T) * (x^ U^T) [T, I] (float32).

    x^ and the weight rows are L2-normalised, so a neuron's |h| measures how aligned the token is
    with it rather than how large the token or the row happens to be. `rows`: normalized_rows(ffn),
    when the caller already has them.
    """
    up, gate = normalized_rows(ffn) if rows is None else rows
    xn = F.normalize(x.float(), dim=-1)
    u = F.linear(xn, up)
    if gate is None:
        return ffn.act_fn(u)
    return ffn.act_fn(F.linear(xn, gate)).mul_(u)  # in place: one [T, I] temporary fewer


# Tokens per chunk of activation_markers: its [chunk, I] float32 temporaries stay at
# 8 MiB each for I = 4096 (the whole [T, I] would be 32 MiB per copy at T = 2048, and the
# float32 h, |h| and act(gate) copies exist at once). The chunking does not change the result:
# each token's row of h is computed on its own.
MARKER_CHUNK = 512


def activation_markers(ffn: DenseFFN, x: torch.Tensor, k_act: int, chunk: int = MARKER_CHUNK) -> torch.Tensor:
    """Per token, mark the top-k_act neurons by |h| as active: bool [T, I].

    Computed in token chunks so that h [T, I] never exists whole in float32.
    """
    if k_act > ffn.intermediate_size:
        raise ValueError(f"k_act={k_act} exceeds the intermediate size {ffn.intermediate_size}")
    T = x.shape[0]
    markers = torch.zeros(T, ffn.intermediate_size, dtype=torch.bool, device=x.device)
    rows = normalized_rows(ffn)
    for s in range(0, T, chunk):
        h = normalized_hidden(ffn, x[s : s + chunk], rows).abs_()  # [t, I]
        top = h.topk(k_act, dim=-1).indices  # [t, k_act]
        del h
        markers[s : s + chunk].scatter_(1, top, True)
    return markers


def activation_rates(markers: torch.Tensor, chunk: int = MARKER_CHUNK) -> torch.Tensor:
    """mu_i: the fraction of tokens on which neuron i is marked, float32 [I].

    Counted as integers over token chunks (a bool sum converts its whole input: [T, I] int64),
    then divided once: equal to markers.float().mean(0), as integer counts are exact in float32.
    """
    counts = torch.zeros(markers.shape[1], dtype=torch.int64, device=markers.device)
    for s in range(0, markers.shape[0], chunk):
        counts += markers[s : s + chunk].sum(dim=0)
    return counts.float() / markers.shape[0]


def rate_histogram(rates: torch.Tensor, bins: int = 50) -> dict:
    """A histogram of activation rates over [0, max rate] for the carve report (JSON-able)."""
    hi = max(float(rates.max()), 1e-6)
    counts = torch.histc(rates.float().cpu(), bins=bins, min=0.0, max=hi)
    return {"max": hi, "bins": bins, "counts": [int(c) for c in counts.tolist()]}
