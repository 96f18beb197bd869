"""Step 5 of CD-MoE (optional): fine-tune the condensed layers only, by next-token loss.

Every other parameter is frozen and stays bitwise unchanged. The model stays in eval mode while
training (no dropout, no router jitter in the MoE layers left): the frozen part is a fixed
function and only the condensed layers learn. Either every parameter of the condensed layers is
trained, or (lora_r > 0) a LoRA on their weight matrices, reusing the stacked LoRA parametrization
of moecarve.finetune, merged into the weights at the end.

The window order depends only on the seed, so two runs from the same condensed model agree.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from ..eval.perplexity import perplexity
from ..finetune.lora import StackedLoRA
from .config import CondenseConfig, CondenseError

MAX_GRAD_NORM = 1.0
LOSS_WINDOWS = 64  # loss_before / loss_after are measured on at most this many training windows


@dataclass
class TuneReport:
    """What the fine-tune of the condensed layers did (losses: mean next-token NLL in nats)."""

    steps: int = 0
    lr: float = 0.0
    batch_size: int = 0
    lora_r: int = 0  # 0: full fine-tune of the condensed layers
    seed: int = 0
    trainable_params: int = 0
    train_windows: int = 0
    train_tokens: int = 0  # tokens seen in all (steps x batch x seqlen)
    loss_before: float = float("nan")  # on the first LOSS_WINDOWS training windows, before the first step
    loss_after: float = float("nan")
    losses: list[float] = field(default_factory=list)  # per optimizer step (its batch, before the update)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def window_batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices [<= batch_size] of the windows of each of `steps` steps: one seeded permutation of
    the n windows per epoch, cut into batches (the last batch of an epoch may be smaller)."""
    per_epoch = math.ceil(n / batch_size)
    out = []
    for step in range(steps):
        epoch, i = divmod(step, per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        out.append(order[i * batch_size : (i + 1) * batch_size])
    return out


def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    """Mean next-token NLL (nats) of `model` over windows [n, L]."""
    return math.log(perplexity(model, windows, batch_size=batch_size))


def _lora_targets(modules: dict[str, nn.Module], r: int) -> list[tuple[nn.Module, str]]:
    """(owner, parameter name) of every weight matrix [out, in] with min(out, in) > r."""
    found = []
    for mod in modules.values():
        for owner in mod.modules():
            for name, p in owner.named_parameters(recurse=False):
                if p.dim() == 2 and min(p.shape) > r:
                    found.append((owner, name))
    if not found:
        raise CondenseError(f"no weight matrix of the condensed layers is wider than finetune_lora_r = {r}")
    return found


def _add_lora(modules: dict[str, nn.Module], r: int, seed: int) -> list[nn.Parameter]:
    """Parametrize the condensed layers' matrices W -> W + 2 * B @ A (B = 0 at first); returns A, B."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for owner, name in _lora_targets(modules, r):
        W = getattr(owner, name)
        lora = StackedLoRA(W.shape, r, scaling=2.0, generator=g).to(device=W.device, dtype=W.dtype)
        parametrize.register_parametrization(owner, name, lora)
        params += [lora.A, lora.B]
    return params


def _merge_lora(modules: dict[str, nn.Module]) -> None:
    """Fold the LoRA into the weights; the parameter objects are kept (their data is replaced)."""
    for mod in modules.values():
        for owner in mod.modules():
            if parametrize.is_parametrized(owner):
                for name in list(owner.parametrizations.keys()):
                    parametrize.remove_parametrizations(owner, name, leave_parametrized=True)


def _train(model: nn.Module, trainable: list[nn.Parameter], windows: torch.Tensor, config: CondenseConfig,
           report: TuneReport, progress: bool) -> None:  # fmt: skip
    """config.finetune_steps AdamW steps of next-token loss on seeded batches of windows [n, L]."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(trainable, lr=config.finetune_lr, weight_decay=0.0)
    batches = window_batches(windows.shape[0], config.finetune_batch_size, config.finetune_steps, config.seed)
    bar = tqdm(batches, desc="fine-tuning condensed layers", unit="step", disable=not progress)
    for idx in bar:
        batch = windows[idx].to(device)  # [b, L]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report.losses.append(loss.item())
        report.train_tokens += batch.numel()
        bar.set_postfix(loss=f"{report.losses[-1]:.3f}")
    report.steps = len(report.losses)


def tune_condensed(model: nn.Module, paths: list[str], windows: torch.Tensor, config: CondenseConfig,
                   progress: bool = True) -> TuneReport:  # fmt: skip
    """Train the modules at `paths` (the condensed layers) on token windows [n, L] for
    config.finetune_steps AdamW steps of next-token loss, in place; returns a TuneReport.

    Only those modules' parameters change; requires_grad flags and train/eval mode are restored.
    """
    if windows.dim() != 2 or windows.dtype != torch.long or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise CondenseError(f"fine-tuning windows must be a LongTensor [n >= 1, seqlen >= 2], got {tuple(windows.shape)}")
    if not paths:
        raise CondenseError("nothing to fine-tune: no layer was condensed")
    t0 = time.perf_counter()
    modules = {p: model.get_submodule(p) for p in paths}
    report = TuneReport(lr=config.finetune_lr, batch_size=config.finetune_batch_size, lora_r=config.finetune_lora_r,
                        seed=config.seed, train_windows=windows.shape[0])  # fmt: skip
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()  # no dropout / router jitter: the frozen part is a fixed function
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        if config.finetune_lora_r:
            trainable = _add_lora(modules, config.finetune_lora_r, config.seed)
        else:
            trainable = [p for m in modules.values() for p in m.parameters()]
        for p in trainable:
            p.requires_grad_(True)
        report.trainable_params = sum(p.numel() for p in trainable)
        probe = windows[:LOSS_WINDOWS]
        with parametrize.cached():
            report.loss_before = mean_loss(model, probe, config.finetune_batch_size)
        _train(model, trainable, windows, config, report, progress)
        _merge_lora(modules)  # no-op for a full fine-tune
        report.loss_after = mean_loss(model, probe, config.finetune_batch_size)
    finally:
        _merge_lora(modules)  # after an error too: leave no parametrization behind
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report
