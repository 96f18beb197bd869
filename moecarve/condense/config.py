"""CondenseConfig: how many MoE layers to condense and how many routed experts each keeps."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import MoecarveError


WEIGHTINGS = ("mean", "expected")


class CondenseError(MoecarveError, ValueError):
    """A condensing request that cannot work (bad config, too few layers or experts)."""


@dataclass(frozen=True)
class CondenseConfig:
    """What to condense (CD-MoE).

    Attributes:
        n_layers: L, MoE layers to condense into dense layers (chosen greedily).
        n_experts: R, routed experts made always-on per condensed layer (0: shared experts only,
            CD-MoE-S; needs shared experts).
        beam: states kept by the greedy layer search (1: plain greedy).
        max_tokens: calibration tokens used by the per-layer expert search (a seeded subsample;
            None: all). The layer search always uses every calibration token.
        weighting: each kept expert's constant weight w_e. "mean" (the paper): its mean routing
            weight over the tokens that selected it. "expected": its routing weight averaged over
            every token (0 where not selected), i.e. "mean" times its selection rate; the
            least-squares choice when the expert's output does not depend on the token.
        seed: seeds the token subsample.
    """

    n_layers: int = 1
    n_experts: int = 0
    beam: int = 1
    max_tokens: int | None = None
    weighting: str = "mean"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise CondenseError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.n_experts < 0:
            raise CondenseError(f"n_experts must be >= 0, got {self.n_experts}")
        if self.beam < 1:
            raise CondenseError(f"beam must be >= 1, got {self.beam}")
        if self.weighting not in WEIGHTINGS:
            raise CondenseError(f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise CondenseError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CondenseConfig":
        return cls(**d)
