"""The tail: neurons just below the router's cut, added from the router's own estimates (tensors in,
tensors out; the module is modules.moe.TailNeurons).

A carve keeps each token's picked experts exact and drops the rest. Most of what it drops lies in
the neurons that scored just below the cut, and the shadow router has already estimated their
activations (est, 4-bit rows against the int8 token). The tail adds est * output column for the
`n_tail` best-scoring neurons outside the picks, per token on average (one threshold on |est|,
calibrated like the router's), the columns stored in 4 bits. Measured at 25% active with the
next 25% of the neurons as a tail (bench/RESULTS.md): test perplexity SmolLM2-135M 22.15 -> 19.29,
Gemma-3-270M 77.04 -> 71.43, for 4% more FFN bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..modules.moe import pack_nibbles, quantize_rows, unpack_nibbles
from .ffn import DenseFFN
from .kth import kth_largest
from .reconstruct import Selection

TAIL_BITS = 4  # the columns' bits (two codes per byte, as the shadow router's nibbles)


@dataclass
class Tail:
    """What modules.moe.TailNeurons stores, and what the carve needs of it."""

    codes: torch.Tensor  # uint8 [N, ceil(d/2)] the output columns, packed nibbles
    scale: torch.Tensor  # [N] float32 each column's step over the neuron's out_weight
    threshold: float  # |est| above which a free neuron joins the tail
    mean_neurons: float  # tail neurons per calibration token (MoESpec.tail_neurons)
    outputs: torch.Tensor  # [T, d] float32 the tail's output on the calibration tokens


def picked_experts(selection: Selection, n_experts: int) -> torch.Tensor:
    """bool [T, E]: the experts each calibration token picked (threshold selection: the kept slots)."""
    T = selection.idx.shape[0]
    src = torch.ones_like(selection.idx, dtype=torch.bool) if selection.slots is None else selection.slots.bool()
    return torch.zeros(T, n_experts, dtype=torch.bool, device=selection.idx.device).scatter_(1, selection.idx, src)


def quantize_columns(ffn: DenseFFN, neurons: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The output columns of `neurons` [N] in TAIL_BITS bits: (packed codes uint8 [N, ceil(d/2)],
    steps [N] float32). importance [d] (the loss's weight of each output, e.g. the Fisher diagonal):
    each column's clip is chosen by the error it weights."""
    cols = ffn.down[:, neurons.to(ffn.down.device)].t().float()  # [N, d]
    codes, step = quantize_rows(cols, TAIL_BITS, importance)
    if codes.shape[1] % 2:  # nibbles pair element k with k + d/2: pad d to even with a zero code
        codes = torch.nn.functional.pad(codes, (0, 1))
    return pack_nibbles(codes), step


@torch.no_grad()
def fit_tail(
    ffn: DenseFFN, est: torch.Tensor, selection: Selection, neurons: torch.Tensor, n_tail: int,
    out_weight: torch.Tensor | None = None, importance: torch.Tensor | None = None, chunk: int = 1024,
) -> Tail:
    """The tail of a carved FFN from the shadow router's estimates on its calibration tokens.

    est [T, N]: the router's neuron estimates (ShadowRouter.estimates, flattened), selection: its
    picks, neurons [N]: the routed neurons in expert order (grouping.experts flattened), n_tail:
    tail neurons per token on average, out_weight [N] or None: the weights the estimates carry
    (folded out of the columns' steps here), importance [d]: what quantize_columns weighs."""
    T, N = est.shape
    n_experts = selection.experts.shape[0]
    free = ~picked_experts(selection, n_experts).repeat_interleave(N // n_experts, dim=1)  # [T, N]
    k = min(T * n_tail, int(torch.count_nonzero(free)))
    score = est.abs().masked_fill_(~free, -1.0)  # picked neurons never join the tail
    del free
    threshold = kth_largest(score.flatten(), k) if k > 0 else float("inf")
    codes, step = quantize_columns(ffn, neurons, importance)
    scale = step if out_weight is None else step / out_weight.to(step).clamp_min(1e-30)
    cols = unpack_nibbles(codes)[:, : ffn.hidden_size].float()  # [N, d]
    outs, count = [], 0
    for s in range(0, T, chunk):
        keep = score[s : s + chunk] > threshold  # free and above it: the threshold is >= 0, picked scores -1
        count += int(torch.count_nonzero(keep))
        outs.append((est[s : s + chunk] * keep * scale) @ cols)
    return Tail(codes=codes, scale=scale, threshold=threshold, mean_neurons=count / max(T, 1), outputs=torch.cat(outs))
