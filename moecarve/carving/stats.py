"""Activation statistics of an FFN on calibration inputs (tensors in, tensors out).

Shapes: T calibration tokens, d hidden size, I intermediate size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ffn import DenseFFN


def normalized_hidden(ffn: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    """CMoE's scale-free activations h = act(x^ G^T) * (x^ U^T) [T, I] (float32).

    x^ and the weight rows are L2-normalised, so a neuron's |h| measures how aligned the token is
    with it rather than how large the token or the row happens to be.
    """
    xn = F.normalize(x.float(), dim=-1)
    u = F.linear(xn, F.normalize(ffn.up.float(), dim=-1))
    if not ffn.gated:
        return ffn.act_fn(u)
    return ffn.act_fn(F.linear(xn, F.normalize(ffn.gate.float(), dim=-1))) * u


def activation_markers(ffn: DenseFFN, x: torch.Tensor, k_act: int, chunk: int = 4096) -> torch.Tensor:
    """Per token, mark the top-k_act neurons by |h| as active: bool [T, I].

    Computed in token chunks so that h [T, I] never exists whole in float32.
    """
    if k_act > ffn.intermediate_size:
        raise ValueError(f"k_act={k_act} exceeds the intermediate size {ffn.intermediate_size}")
    T = x.shape[0]
    markers = torch.zeros(T, ffn.intermediate_size, dtype=torch.bool, device=x.device)
    for s in range(0, T, chunk):
        h = normalized_hidden(ffn, x[s : s + chunk])
        top = h.abs().topk(k_act, dim=-1).indices  # [t, k_act]
        markers[s : s + chunk].scatter_(1, top, True)
    return markers


def activation_rates(markers: torch.Tensor) -> torch.Tensor:
    """mu_i: the fraction of tokens on which neuron i is marked, float32 [I]."""
    return markers.float().mean(dim=0)


def rate_histogram(rates: torch.Tensor, bins: int = 50) -> dict:
    """A histogram of activation rates over [0, max rate] for the carve report (JSON-able)."""
    hi = max(float(rates.max()), 1e-6)
    counts = torch.histc(rates.float().cpu(), bins=bins, min=0.0, max=hi)
    return {"max": hi, "bins": bins, "counts": [int(c) for c in counts.tolist()]}
