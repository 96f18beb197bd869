"""Choosing the next token from logits: greedy, or temperature / top-k / top-p sampling, seeded.

The same order of filters as transformers' generate (temperature, then top-k, then top-p), so a
seeded request is reproducible run to run; greedy takes the first maximum, as argmax does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MoecarveError


class SamplingError(MoecarveError, ValueError):
    """Sampling settings out of range."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off; seed None draws one."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise SamplingError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1] (got {self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Picks tokens for one sequence; owns its random generator (seeded per request)."""

    def __init__(self, params: SamplingParams = SamplingParams()):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator()
            if params.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [vocab] float32 -> a token id."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        z = logits / p.temperature
        ids = None
        if p.top_k and p.top_k < z.numel():
            z, ids = torch.topk(z, p.top_k)  # sorted, descending
        if p.top_p < 1.0:
            if ids is None:
                z, ids = torch.sort(z, descending=True)
            probs = torch.softmax(z, dim=-1)
            keep = torch.cumsum(probs, dim=-1) - probs < p.top_p  # the smallest prefix reaching top_p (at least one)
            z = z[keep]
            ids = ids[keep]
        choice = int(torch.multinomial(torch.softmax(z, dim=-1), 1, generator=self.generator))
        return choice if ids is None else int(ids[choice])
