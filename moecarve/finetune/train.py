"""finetune(model, FinetuneConfig, windows): a short LoRA recovery fine-tune of a carved model.

Base weights stay frozen. Trained: LoRA on the attention projections (PEFT), stacked LoRA on the
expert weights, and each router's scale s (own learning rate). After every optimizer step the
routers' load-balancing bias moves by +-gamma from that batch's expert counts (CMoE). The LoRA
is merged into the weights at the end, so the model is again an ordinary carved model, unless
merge=False keeps the adapters apart (save_adapter writes them alone, in PEFT's format).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..errors import MoecarveError
from ..eval.perplexity import perplexity
from .balance import LoadTracker, summarize
from .checkpoint import latest, load_checkpoint, save_checkpoint
from .config import FinetuneConfig
from .lora import add_expert_lora, add_linear_lora, carved_layers, merge_lora


class FinetuneError(MoecarveError, ValueError):
    """Unusable training data or model for fine-tuning."""


@dataclass
class FinetuneReport:
    """What a fine-tune did and measured (perplexity and load on the held-out windows)."""

    config: FinetuneConfig
    steps: int = 0  # optimizer steps in all, counting those before a resume
    start_step: int = 0  # > 0 when resumed from a checkpoint
    seconds: float = 0.0  # wall time of this run (training and evaluation)
    train_tokens: int = 0
    trainable_params: int = 0
    losses: list[float] = field(default_factory=list)  # per step of this run
    ppl_before: float | None = None
    ppl_after: float | None = None
    load_before: tuple[float, float] | None = None  # (worst layer, mean over layers) max/mean
    load_after: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_dict()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _gamma(model: nn.Module, cfg: FinetuneConfig) -> float:
    """The load-balancing bias step: cfg.bias_gamma, else 0 for a model whose carved layers all
    route by the shadow router, else the carve's bias_gamma.

    A shadow router scores each expert by its estimated |h| mass, the very quantity that decides
    what the expert adds to the output (and, with threshold selection, how many experts a token
    gets): a bias that evens out the load moves the picks away from the experts that matter, and
    with threshold selection changes how many experts are picked (the bytes read per token), while
    batch-1 decoding gains nothing from balance.
    """
    if cfg.bias_gamma is not None:
        return cfg.bias_gamma
    moes = carved_layers(model).values()
    if moes and all(m.spec.router == "shadow" for m in moes):
        return 0.0
    meta = getattr(model.config, "moecarve", None) or {}
    return float(meta.get("carve", {}).get("bias_gamma", 1e-3))


@torch.no_grad()
def evaluate(model: nn.Module, tracker: LoadTracker, windows: torch.Tensor, batch_size: int) -> tuple[float, tuple[float, float]]:
    """(perplexity, (worst, mean) expert load max/mean) on windows [n, L]."""
    was_training = model.training
    model.eval()
    tracker.reset()
    with parametrize.cached():  # merge each stacked adapter once, not at every forward
        ppl = perplexity(model, windows, batch_size=batch_size)
    load = summarize(tracker.imbalance())
    tracker.reset()
    model.train(was_training)
    return ppl, load


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Recompute decoder layers in backward (transformers renamed the API; use whichever exists)."""
    if on:
        kw = {"use_reentrant": False}  # non-reentrant: works with frozen inputs (embeddings not trained)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


def _autocast(device: torch.device):
    # bf16 autocast on GPU; CPU trains in float32 (CPU bf16 autocast is slow and lossy).
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _clock() -> float:
    """Seconds on a monotonic clock (the time budget's; tests replace it)."""
    return time.perf_counter()


def finetune(
    model: nn.Module,
    cfg: FinetuneConfig,
    windows: torch.Tensor,
    eval_windows: torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    merge: bool = True,
    progress: bool = True,
) -> FinetuneReport:
    """Fine-tune `model` in place on token windows [n, L]; returns a FinetuneReport.

    eval_windows [k, L'] (held out) give perplexity and expert load before and after.
    checkpoint_dir: where resumable checkpoints go (every cfg.checkpoint_every steps and at the
    end); resume=True continues from the newest one there. merge=False leaves the adapters
    unmerged: save_adapter(model, dir, cfg) writes them alone (PEFT's format), merge_lora(model)
    merges them later.
    """
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise FinetuneError(f"training windows must be [n >= 1, seqlen >= 2], got {tuple(windows.shape)}")
    if resume and checkpoint_dir is None:
        raise FinetuneError("resume needs a checkpoint folder")
    t0 = _clock()
    device = next(model.parameters()).device
    report = FinetuneReport(config=cfg)
    torch.manual_seed(cfg.seed)

    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.target_attention:
        add_linear_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    if cfg.target_experts:
        add_expert_lora(model, cfg.lora_r, cfg.lora_scaling, seed=cfg.seed)
    moes = carved_layers(model)
    scales = [m.router.scale for m in moes.values()] if cfg.train_router_scale else []
    for s in scales:
        s.requires_grad_(True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise FinetuneError("nothing to train: the model has no LoRA targets and no carved routers")
    scale_ids = {id(s) for s in scales}
    groups = [{"params": [p for p in trainable.values() if id(p) not in scale_ids], "lr": cfg.lr}]
    if scales:
        groups.append({"params": scales, "lr": cfg.router_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    report.trainable_params = sum(p.numel() for p in trainable.values())
    buffers = {f"{path}.router.bias": m.router.bias for path, m in moes.items()}
    tracker = LoadTracker(model)
    gamma = _gamma(model, cfg)

    if cfg.gradient_checkpointing:
        _checkpointing(model, True)

    start = 0
    if resume:
        ckpt = latest(checkpoint_dir)
        if ckpt is None:
            raise FinetuneError(f"no checkpoint to resume from in {checkpoint_dir}")
        info = load_checkpoint(ckpt, trainable, buffers, optimizer)
        start = info["step"]
        # batches and adapters depend on these: resuming with other values would train something else
        fixed = ("epochs", "batch_size", "lr", "router_lr", "weight_decay", "lora_r", "lora_alpha", "lora_dropout", "seed")
        saved = info.get("config", {})
        changed = [k for k in fixed if k in saved and saved[k] != getattr(cfg, k)]
        if changed:
            raise FinetuneError(f"cannot resume from {ckpt}: {', '.join(f'{k} was {saved[k]}, now {getattr(cfg, k)}' for k in changed)}")
    report.start_step = start

    if eval_windows is not None:
        report.ppl_before, report.load_before = evaluate(model, tracker, eval_windows, cfg.batch_size)

    n, L = windows.shape
    per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * per_epoch
    stop = min(total, cfg.max_steps) if cfg.max_steps else total
    model.train()
    bar = tqdm(range(start, stop), desc="finetune", disable=not progress, initial=start, total=stop)
    ema = None
    done = start
    for step in bar:
        if cfg.max_minutes is not None and _clock() - t0 > 60 * cfg.max_minutes:
            break  # the time budget is spent: evaluate and save what was trained
        epoch, i = divmod(step, per_epoch)
        # the window order depends only on (seed, epoch), so a resumed run sees the same batches
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        batch = windows[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]].to(device)
        tracker.reset()
        with _autocast(device):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tracker.update_bias(gamma)
        val = loss.item()
        report.losses.append(val)
        report.train_tokens += batch.numel()
        ema = val if ema is None else 0.9 * ema + 0.1 * val
        shown = {"loss": f"{ema:.3f}", "ppl": f"{math.exp(ema):.2f}"}
        if moes:  # worst layer's expert load (max/mean) on this batch
            shown["load"] = f"{summarize(tracker.imbalance())[0]:.2f}"
        bar.set_postfix(shown)
        done = step + 1
        if checkpoint_dir is not None and ((cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == stop):
            save_checkpoint(checkpoint_dir, done, trainable, buffers, optimizer, {"config": cfg.to_dict()})
    bar.close()
    if checkpoint_dir is not None and done not in (start, stop):  # stopped by the time budget
        save_checkpoint(checkpoint_dir, done, trainable, buffers, optimizer, {"config": cfg.to_dict()})
    report.steps = done

    if cfg.gradient_checkpointing:
        _checkpointing(model, False)
    model.eval()
    if eval_windows is not None:
        report.ppl_after, report.load_after = evaluate(model, tracker, eval_windows, cfg.batch_size)
    tracker.remove()
    if merge:
        merge_lora(model)
    report.seconds = _clock() - t0
    return report
