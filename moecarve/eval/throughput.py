"""Tokens per second of a short greedy generation (a rough speed figure for side-by-side reports)."""

from __future__ import annotations

import time

import torch
from torch import nn

DEFAULT_PROMPT = "The configuration file is read when the server starts. To change"


@torch.no_grad()
def generation_speed(
    model: nn.Module, tokenizer, new_tokens: int = 32, prompt: str = DEFAULT_PROMPT, seed: int = 0
) -> float:
    """New tokens per second of greedy decoding `new_tokens` tokens after `prompt` (batch 1, KV cache on).

    One warm-up token first, so that lazy initialisation is not timed. On a shared or busy machine
    this number is noisy: compare models measured in the same run only.
    """
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    kw = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - t0)
