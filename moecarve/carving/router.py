"""Router construction (tensors in, tensors out).

The analytic CMoE router scores expert e by its representative neuron's own activation,
|(up_r . x) * act(gate_r . x)|, with the representative's gate/up rows L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ffn import DenseFFN


def analytic_router(ffn: DenseFFN, representatives: torch.Tensor) -> dict[str, torch.Tensor]:
    """Router weights from the representative neurons [k]: {"gate": [k, d], "up": [k, d] or None}.

    For plain MLPs (no gate) the representative's fc1 row plays the gate's part and there is no
    up row: score_e(x) = |act(w_r . x)|.
    """
    reps = representatives.to(ffn.up.device)
    if ffn.gated:
        return {"gate": F.normalize(ffn.gate[reps].float(), dim=-1), "up": F.normalize(ffn.up[reps].float(), dim=-1)}
    return {"gate": F.normalize(ffn.up[reps].float(), dim=-1), "up": None}


def router_load(indices: torch.Tensor, n_experts: int, kept: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert: indices [T, A] -> counts [E] (int64); with kept [T, A] bool
    (threshold selection) only the slots it marks (counted as weights: no [kept] copy of indices)."""
    if kept is None:
        return torch.bincount(indices.reshape(-1), minlength=n_experts)
    counts = torch.bincount(indices.reshape(-1), weights=kept.reshape(-1).double(), minlength=n_experts)
    return counts.round().long()
