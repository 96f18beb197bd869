"""The k-th largest of many values, by a sampled bracket (the carve's thresholds)."""

from __future__ import annotations

import torch

# Values kth_largest brackets the answer with before it selects exactly.
KTH_SAMPLE = 1 << 16


def kth_largest(v: torch.Tensor, k: int) -> float:
    """The k-th largest of the flat tensor v (1 <= k <= v.numel()), exactly as v.kthvalue(n - k + 1).

    A random sample brackets it, one pass counts what lies above the bracket, and the selection
    runs on the values inside it only: a few passes over v instead of one selection over all of it
    (the threshold of a carve at 50% ranks T * 2A = 12.6M scores per SmolLM2 layer)."""
    n = v.numel()
    if n <= 4 * KTH_SAMPLE:
        return float(v.kthvalue(n - k + 1).values)
    # random positions, seeded (a stride can fall in step with rows of the scores and miss)
    pos = torch.randint(n, (KTH_SAMPLE,), generator=torch.Generator().manual_seed(0)).to(v.device)
    sample = v[pos].sort(descending=True).values  # [KTH_SAMPLE]
    at = k * sample.numel() / n  # where the answer sits in the sample
    margin = 4.0 * (at + 1) ** 0.5 + 8  # a few standard deviations of a sampled rank
    hi = float(sample[max(int(at - margin), 0)])  # above the answer (or +inf below)
    lo = float(sample[min(int(at + margin), sample.numel() - 1)])
    above = int(torch.count_nonzero(v > hi)) if int(at - margin) > 0 else 0  # (count_nonzero: 3x a bool sum)
    band = v[(v >= lo) & (v <= hi)] if above else v[v >= lo]
    if above < k <= above + band.numel():
        return float(band.kthvalue(band.numel() - (k - above) + 1).values)
    return float(v.kthvalue(n - k + 1).values)  # the bracket missed: select over all of v
