"""A condensed MoE layer (CD-MoE): shared experts + a few always-on routed experts, no router.

y = shared(x) + sum_{e in kept} w_e * expert_e(x) (+ b), computed as ONE dense MLP: the kept
experts' neurons are concatenated after the shared ones and each w_e is folded into its experts'
columns of out_proj, so the layer runs at dense-kernel speed.

Shapes: d hidden size, n intermediate neurons (shared + kept experts). A gated MLP keeps gate and
up rows stacked as `in_proj` [2n, d] (gate rows first, the layout of moe.SharedExpert); a plain MLP
keeps `in_proj` [n, d]. `out_proj` is [d, n].

Qwen2-MoE scales its shared expert by sigmoid(shared_gate . x) per token; that is kept exactly by
scaling the first `gated_neurons` neurons (the shared ones) before out_proj.

This file imports only torch and transformers and registers itself into moe.MODULE_TYPES. It is
also concatenated after moe.py into carved folders' `modeling_moecarve.py` (see io/remote.py), where
its `from .` imports are dropped and moe.py's names are in scope.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from .moe import MODULE_TYPES


@dataclass
class CondensedSpec:
    """Everything needed to build an (empty) CondensedMLP; stored in config.json."""

    hidden_size: int
    intermediate_size: int  # n = shared neurons + kept experts' neurons
    act: str  # a transformers ACT2FN name
    gated: bool = True
    in_bias: bool = False
    out_bias: bool = False
    gated_neurons: int = 0  # the first neurons scaled by sigmoid(shared_gate . x); 0: no gate

    def to_dict(self) -> dict:
        return {"type": "condensed", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "CondensedSpec":
        return cls(**{k: v for k, v in d.items() if k != "type"})


class CondensedMLP(nn.Module):
    """One dense MLP replacing an MoE layer: [..., d] -> [..., d]."""

    def __init__(self, spec: CondensedSpec):
        super().__init__()
        self.spec = spec
        n, d = spec.intermediate_size, spec.hidden_size
        rows = 2 * n if spec.gated else n
        self.in_proj = nn.Parameter(torch.empty(rows, d))  # [2n, d] gate rows then up rows
        self.out_proj = nn.Parameter(torch.empty(d, n))  # [d, n], routing weights folded in
        self.in_bias = nn.Parameter(torch.empty(rows)) if spec.in_bias else None
        self.out_bias = nn.Parameter(torch.empty(d)) if spec.out_bias else None
        self.shared_gate = nn.Parameter(torch.empty(1, d)) if spec.gated_neurons else None  # [1, d]
        self.act = ACT2FN[spec.act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        h = F.linear(hidden_states, self.in_proj, self.in_bias)  # [..., 2n]
        if self.spec.gated:
            g, u = h.chunk(2, dim=-1)
            h = self.act(g) * u
        else:
            h = self.act(h)
        if self.shared_gate is not None:
            k = self.spec.gated_neurons
            s = torch.sigmoid(F.linear(hidden_states, self.shared_gate))  # [..., 1]
            h = torch.cat([h[..., :k] * s, h[..., k:]], dim=-1)
        return F.linear(h, self.out_proj, self.out_bias)

    def extra_repr(self) -> str:
        s = self.spec
        gate = bool(s.gated_neurons)
        return f"d={s.hidden_size}, n={s.intermediate_size}, act={s.act}, gated={s.gated}, shared_gate={gate}"


MODULE_TYPES["condensed"] = (CondensedSpec, CondensedMLP)
