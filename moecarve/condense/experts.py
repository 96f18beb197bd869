"""Steps 1, 2 and 4 of CD-MoE for one MoE layer: expert weights, greedy expert choice, the dense layer.

1. w_e = mean routing weight of routed expert e over the calibration tokens that selected it.
2. Grow the always-on set one expert at a time, each time adding the expert that minimises the JS
   divergence between the original and the condensed decoder-layer output (residual + FFN,
   softmax over the hidden dimension, averaged over tokens). Every expert's output on the
   calibration tokens is computed once, so a candidate costs one addition and one JS.
4. Build the condensed layer: shared neurons then the kept experts' neurons in one dense MLP,
   w_e folded into out_proj.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..modules.condensed import CondensedMLP, CondensedSpec
from .config import CondenseError
from .divergence import js_divergence
from .families import MoEView, expert_output, shared_output


@dataclass
class ExpertChoice:
    """The greedy expert choice for one layer."""

    experts: list[int]  # kept routed experts, in the order they were added
    weights: list[float]  # their w_e
    js: list[float] = field(default_factory=list)  # layer-output JS: shared only, then after each addition


def mean_routing_weights(weights: torch.Tensor, idx: torch.Tensor, n_experts: int, weighting: str = "mean") -> torch.Tensor:
    """w [E] float32 from the router's weights, idx [T, A].

    "mean": sum of routing weights / selection count per expert (0 when never selected);
    "expected": sum of routing weights / T.
    """
    n_tokens = idx.shape[0]
    idx, weights = idx.reshape(-1), weights.reshape(-1).float()
    total = torch.zeros(n_experts, dtype=torch.float32, device=weights.device).index_add_(0, idx, weights)
    if weighting == "expected":
        return total / n_tokens
    count = torch.bincount(idx, minlength=n_experts).float()
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


@torch.no_grad()
def choose_experts(view: MoEView, x: torch.Tensor, layer_out: torch.Tensor, moe_out: torch.Tensor,
                   w: torch.Tensor, n_keep: int) -> ExpertChoice:  # fmt: skip
    """Greedy step 2 on tokens x [T, d] with the original layer output layer_out [T, d] and the
    original MoE output moe_out [T, d]; w [E] the mean routing weights. Ties go to the lower index."""
    if n_keep > view.n_routed:
        raise CondenseError(f"cannot keep {n_keep} routed experts: the layer has {view.n_routed}")
    residual = layer_out - moe_out  # what the decoder layer adds besides its FFN
    current = residual + shared_output(view, x)
    outs = torch.stack([expert_output(view, e, x) for e in range(view.n_routed)])  # [E, T, d]
    choice = ExpertChoice(experts=[], weights=[], js=[js_divergence(layer_out, current)])
    for _ in range(n_keep):
        best, best_js = -1, float("inf")
        for e in range(view.n_routed):
            if e in choice.experts:
                continue
            js = js_divergence(layer_out, current + w[e].to(x.dtype) * outs[e])
            if js < best_js:
                best, best_js = e, js
        choice.experts.append(best)
        choice.weights.append(float(w[best]))
        choice.js.append(best_js)
        current = current + w[best].to(x.dtype) * outs[best]
    return choice


@torch.no_grad()
def build_condensed(view: MoEView, experts: list[int], weights: list[float]) -> CondensedMLP:
    """y = g(x) shared(x) + sum_i weights[i] * expert_{experts[i]}(x) + b as one dense MLP."""
    if view.shared_out is None and not experts:
        raise CondenseError("this MoE layer has no shared experts: keep at least one routed expert (R >= 1)")
    ref = view.experts_in
    gate_rows, up_rows, in_bias, out_cols = [], [], [], []
    blocks = []  # (in rows [rows, d], in bias [rows] | None, out cols [d, n], scale)
    if view.shared_out is not None:
        blocks.append((view.shared_in, view.shared_in_bias, view.shared_out, 1.0))
    for e, we in zip(experts, weights):
        b = None if view.experts_in_bias is None else view.experts_in_bias[e]
        blocks.append((view.experts_in[e], b, view.experts_out[e], we))
    any_bias = any(b is not None for _, b, _, _ in blocks)
    for w_in, b_in, w_out, scale in blocks:
        n = w_out.shape[1]
        if view.gated:
            gate_rows.append(w_in[:n])
            up_rows.append(w_in[n:])
        else:
            up_rows.append(w_in)
        if any_bias:
            rows = w_in.shape[0]
            in_bias.append(b_in if b_in is not None else torch.zeros(rows, dtype=w_in.dtype, device=w_in.device))
        out_cols.append((w_out.float() * scale).to(w_out.dtype))  # fold w_e into the expert's columns
    if any_bias and view.gated:  # biases are stored per block as [gate | up]; regroup as all gates, then all ups
        halves = [b.chunk(2) for b in in_bias]
        in_bias = [h[0] for h in halves] + [h[1] for h in halves]
    n_total = sum(c.shape[1] for c in out_cols)
    spec = CondensedSpec(
        hidden_size=ref.shape[-1], intermediate_size=n_total, act=view.act, gated=view.gated,
        in_bias=any_bias, out_bias=view.out_bias is not None,
        gated_neurons=view.n_shared_neurons if view.shared_gate is not None else 0,
    )  # fmt: skip
    mod = CondensedMLP(spec).to(device=ref.device, dtype=ref.dtype)
    mod.in_proj.copy_(torch.cat(gate_rows + up_rows))
    mod.out_proj.copy_(torch.cat(out_cols, dim=1))
    if any_bias:
        mod.in_bias.copy_(torch.cat(in_bias))
    if view.out_bias is not None:
        mod.out_bias.copy_(view.out_bias)
    if view.shared_gate is not None:
        mod.shared_gate.copy_(view.shared_gate)
    return mod.eval()
