"""Oracle routing: per token, the routed experts holding the most |h| mass (a ceiling for hard routing).

Shapes: T tokens, d hidden size, I intermediate size, E routed experts of m neurons, A active.
The oracle needs every routed neuron's activation, so it costs a full dense FFN: it is a
diagnostic (what the best router could do over a given grouping), never a deployable router.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.moe import RoutedExperts


def expert_mass(h_abs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Per token and routed expert, the summed |h| of its neurons: h_abs [T, I], experts [E, m] -> [T, E]."""
    return h_abs[:, experts.to(h_abs.device)].sum(dim=-1)


def oracle_indices(mass: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top_k experts by mass per token: [T, E] -> [T, A] int64."""
    return mass.topk(top_k, dim=-1).indices


def router_recall(idx: torch.Tensor, oracle_idx: torch.Tensor, n_experts: int) -> float:
    """Mean fraction of the oracle's top-A experts that the router also picked: [T, A] x [T, A] -> float."""
    pick = torch.zeros(idx.shape[0], n_experts, dtype=torch.bool, device=idx.device)
    pick.scatter_(1, idx, True)
    return float(pick.gather(1, oracle_idx.to(idx.device)).float().mean())


class OracleRouter(nn.Module):
    """A drop-in router (x -> weights, indices) that picks the top-A experts by their true |h| mass.

    It reads the experts' own input rows, so it stays consistent with any refit of out_proj; every
    selected expert weighs 1, as in the carved models.
    """

    def __init__(self, experts: RoutedExperts, top_k: int):
        super().__init__()
        self.experts = [experts]  # a list: not a submodule, nothing is saved twice
        self.top_k = top_k

    def mass(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, E] float32
        e = self.experts[0]
        h = torch.einsum("td,erd->ter", x, e.in_proj)  # [T, E, 2m] (or [T, E, m])
        if e.in_bias is not None:
            h = h + e.in_bias
        if e.gated:
            g, u = h.chunk(2, dim=-1)
            h = e.act(g) * u
        else:
            h = e.act(h)
        return h.abs().sum(dim=-1).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = oracle_indices(self.mass(x), self.top_k)
        return torch.ones_like(idx, dtype=x.dtype), idx


class NeuronOracleFFN(nn.Module):
    """The neuron-level ceiling: each token keeps its own top `fraction` of intermediate neurons by |h|.

    Wraps a dense DenseFFN-like callable description (up, gate, down, biases, act) as a module
    replacing an MLP: y = down(h * keep) + b_d with keep the per-token top-|h| mask.
    """

    def __init__(self, ffn, fraction: float):
        super().__init__()
        self.ffn = ffn
        self.keep = max(1, round(fraction * ffn.intermediate_size))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        h = self.ffn.hidden(x)  # [T, I]
        top = h.abs().topk(self.keep, dim=-1).indices
        h = torch.zeros_like(h).scatter_(1, top, h.gather(1, top))
        return F.linear(h, self.ffn.down, self.ffn.down_bias).view(shape)
