"""Perplexity, the GPTQ / SparseGPT / Wanda protocol.

Join the test documents, tokenize once, cut into non-overlapping windows of seqlen tokens, average
the next-token NLL over every predicted token of every window, exponentiate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


def test_windows(tokenizer, text: str, seqlen: int, max_chars: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] of the tokenized text (the tail shorter than seqlen is dropped)."""
    if max_chars is not None:
        text = text[:max_chars]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = False) -> float:
    """exp(mean NLL) of `model` over windows [n, seqlen]; each window predicts seqlen - 1 tokens."""
    device = model_device(model)
    nll, count = 0.0, 0
    for s in tqdm(range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress):
        ids = windows[s : s + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()  # [b, L, V]
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


@dataclass
class PerplexityResult:
    """One perplexity measurement and the protocol that produced it."""

    source: str
    seqlen: int
    n_windows: int
    n_tokens: int  # predicted tokens: n_windows * (seqlen - 1)
    perplexity: float

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(
    tokenizer, source: str, seqlen: int, max_chars: int | None = None, text: str | None = None
) -> torch.Tensor:
    """The protocol's windows [n, seqlen] for a source ('wikitext2', 'c4', a .txt file or a dataset folder).

    text: the source's text when already read (data.load_eval_text), so it is not read twice.
    """
    from .data import EvalDataError, load_eval_text

    try:
        return test_windows(tokenizer, load_eval_text(source) if text is None else text, seqlen, max_chars)
    except ValueError as e:  # too short for one window
        raise EvalDataError(f"{source}: {e}") from e


def eval_perplexity(
    model: nn.Module,
    tokenizer,
    source: str,
    seqlen: int = 2048,
    max_chars: int | None = None,
    batch_size: int = 1,
    progress: bool = False,
    text: str | None = None,
) -> PerplexityResult:
    """Perplexity of `model` on a test set with the GPTQ / SparseGPT / Wanda protocol.

    seqlen is clipped to the model's maximum positions; text: see eval_windows.
    """
    from .. import adapters

    seqlen = adapters.clip_seqlen(model.config, seqlen)
    windows = eval_windows(tokenizer, source, seqlen, max_chars, text)
    ppl = perplexity(model, windows, batch_size=batch_size, progress=progress)
    return PerplexityResult(source, seqlen, windows.shape[0], windows.shape[0] * (seqlen - 1), ppl)
