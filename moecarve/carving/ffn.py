"""A dense feed-forward layer as plain tensors: what every carving step reads.

Shapes: d hidden size, I intermediate size. Gated (SwiGLU/GeGLU):
    y = down(act(gate x + b_g) * (up x + b_u)) + b_d
Plain (GPT-2, OPT): `gate` is None and  y = down(act(up x + b_u)) + b_d.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN


@dataclass
class DenseFFN:
    up: torch.Tensor  # [I, d] (fc1 for plain MLPs)
    down: torch.Tensor  # [d, I]
    act: str  # an ACT2FN name
    gate: torch.Tensor | None = None  # [I, d]
    up_bias: torch.Tensor | None = None  # [I]
    gate_bias: torch.Tensor | None = None  # [I]
    down_bias: torch.Tensor | None = None  # [d]

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def intermediate_size(self) -> int:
        return self.up.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.up.shape[1]

    @property
    def has_in_bias(self) -> bool:
        return self.up_bias is not None or self.gate_bias is not None

    def tensors(self) -> list[torch.Tensor]:
        """The weights and biases present (views of the model's parameters)."""
        return [t for t in (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias) if t is not None]

    def act_fn(self, x: torch.Tensor) -> torch.Tensor:
        return ACT2FN[self.act](x)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The intermediate activations h [T, I] for inputs x [T, d] (real weights, with biases)."""
        u = F.linear(x, self.up, self.up_bias)
        if not self.gated:
            return self.act_fn(u)
        return self.act_fn(F.linear(x, self.gate, self.gate_bias)) * u

    def hidden_float(self, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """hidden(x) as float32 [T, I], `chunk` tokens at a time: one [T, I] output plus [chunk, I]
        temporaries, instead of the three [T, I] intermediates (gate, up, act) of one call."""
        out = torch.empty(x.shape[0], self.intermediate_size, dtype=torch.float32, device=x.device)
        for s in range(0, x.shape[0], chunk):
            out[s : s + chunk] = self.hidden(x[s : s + chunk])
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, d]
        return F.linear(self.hidden(x), self.down, self.down_bias)
