"""Jensen-Shannon divergence between hidden states, read as distributions over the hidden dimension."""

from __future__ import annotations

import math

import torch


def js_divergence(a: torch.Tensor, b: torch.Tensor, chunk: int = 8192) -> float:
    """Mean over tokens of JS(softmax(a_t), softmax(b_t)); a, b [..., d]. In nats, in [0, ln 2].

    Computed in float32, `chunk` tokens at a time to bound memory.
    """
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    total = 0.0
    for s in range(0, a.shape[0], chunk):
        lp = torch.log_softmax(a[s : s + chunk].float(), dim=-1)
        lq = torch.log_softmax(b[s : s + chunk].float(), dim=-1)
        lm = torch.logaddexp(lp, lq) - math.log(2.0)  # log of the mixture (P + Q) / 2
        kl_p = (lp.exp() * (lp - lm)).sum(-1)
        kl_q = (lq.exp() * (lq - lm)).sum(-1)
        total += (0.5 * (kl_p + kl_q)).clamp_min(0).sum().item()
    return total / a.shape[0]
