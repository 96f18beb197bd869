"""CondenseConfig: how many MoE layers to condense, how many routed experts each keeps, and the
optional fine-tune of the condensed layers afterwards."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DictConfig
from ..errors import MoecarveError


WEIGHTINGS = ("mean", "expected")


class CondenseError(MoecarveError, ValueError):
    """A condensing request that cannot work (bad config, too few layers or experts)."""


@dataclass(frozen=True)
class CondenseConfig(DictConfig):
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
        seed: seeds the token subsample, and the fine-tune's window order and LoRA initialisation.
        finetune_steps: optimizer steps of next-token training of the condensed layers only, after
            condensing (0: training-free, the paper's CD-MoE without its fine-tuning stage).
            Every other parameter of the model stays bitwise unchanged.
        finetune_lr: AdamW learning rate of that fine-tune.
        finetune_batch_size: windows per optimizer step.
        finetune_lora_r: 0 trains every parameter of the condensed layers; r > 0 trains a rank-r
            LoRA (alpha = 2r) on their weight matrices instead, merged into them at the end.
    """

    n_layers: int = 1
    n_experts: int = 0
    beam: int = 1
    max_tokens: int | None = None
    weighting: str = "mean"
    seed: int = 0
    finetune_steps: int = 0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 4
    finetune_lora_r: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.n_layers >= 1, f"n_layers must be >= 1, got {self.n_layers}"),
            (self.n_experts >= 0, f"n_experts must be >= 0, got {self.n_experts}"),
            (self.beam >= 1, f"beam must be >= 1, got {self.beam}"),
            (self.weighting in WEIGHTINGS, f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1 or None, got {self.max_tokens}"),
            (self.finetune_steps >= 0, f"finetune_steps must be >= 0 (0: no fine-tuning), got {self.finetune_steps}"),
            (self.finetune_lr > 0, f"finetune_lr must be > 0, got {self.finetune_lr}"),
            (self.finetune_batch_size >= 1, f"finetune_batch_size must be >= 1, got {self.finetune_batch_size}"),
            (self.finetune_lora_r >= 0, f"finetune_lora_r must be >= 0 (0: train the layers fully), got {self.finetune_lora_r}"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise CondenseError(msg)

