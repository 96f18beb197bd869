"""FinetuneConfig: how to fine-tune a carved model with LoRA, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, DictConfig


@dataclass(frozen=True)
class FinetuneConfig(DictConfig):
    """A short LoRA fine-tune that recovers the quality lost by carving (CMoE, section 4).

    Attributes:
        epochs: passes over the training windows.
        batch_size: windows per optimizer step.
        lr: AdamW learning rate of the LoRA factors.
        router_lr: AdamW learning rate of the routers' scale s (its own group, as the paper).
        weight_decay: AdamW weight decay (LoRA factors and scales).
        lora_r, lora_alpha, lora_dropout: LoRA rank, alpha (scaling alpha / r) and input dropout.
            Dropout applies to the attention LoRA (PEFT); the stacked expert factors act on the
            weights, so they have no input dropout (PEFT's own parameter LoRA refuses it too).
        target_attention: LoRA on every nn.Linear of the decoder layers (attention projections;
            on a dense model also the MLP projections).
        target_experts: stacked LoRA on the routed and shared expert weights of carved layers.
        train_router_scale: train each router's scale s.
        bias_gamma: step of the load-balancing bias update; None reads the carve's bias_gamma
            (model.config.moecarve["carve"]["bias_gamma"]), else 1e-3. 0 disables the update.
        max_grad_norm: gradient clipping (0 disables).
        gradient_checkpointing: recompute decoder layers in backward (less memory, ~1.3x time).
        checkpoint_every: save a resumable checkpoint every N optimizer steps (0: only at the end
            or at max_steps, when a checkpoint folder is given).
        max_steps: stop after this many optimizer steps in all (None: run every epoch); a later
            run with resume=True continues from there.
        max_minutes: stop training once this much wall time has passed since the run started
            (None: no limit); the step in progress finishes, then evaluation and saving run.
            What a time budget trains depends on the machine, so a budgeted run is not
            deterministic across machines.
        seed: seeds LoRA initialisation, window order and dropout.
    """

    epochs: int = 1
    batch_size: int = 4
    lr: float = 2e-4
    router_lr: float = 1e-3
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    target_attention: bool = True
    target_experts: bool = True
    train_router_scale: bool = True
    bias_gamma: float | None = None
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    checkpoint_every: int = 0
    max_steps: int | None = None
    max_minutes: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.router_lr >= 0, f"router_lr must be >= 0, got {self.router_lr}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
            (self.bias_gamma is None or self.bias_gamma >= 0, f"bias_gamma must be >= 0, got {self.bias_gamma}"),
            (self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}"),
            (self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}"),
            (self.max_minutes is None or self.max_minutes > 0, f"max_minutes must be > 0, got {self.max_minutes}"),
            (self.target_attention or self.target_experts or self.train_router_scale,
             "nothing to train: enable target_attention, target_experts or train_router_scale"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_r

