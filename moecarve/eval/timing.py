"""Decode-speed timing shared by `moecarve frontier` and bench/speed.py.

Decode is what a carve speeds up, and it is noisy to time: medians of blocks of calls, rows
interleaved round by round (a busy machine slows every row alike), one warm-up per row. A decode
step is one new token for each of B sequences on a KV cache filled with a short prompt, through
the model as the user runs it (kernels bound or not).
"""

from __future__ import annotations

import inspect
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

Step = Callable[[], None]
PROMPT = 16  # decode: tokens already in the KV cache


def cpu_name() -> str:
    """The CPU's model name (what a timing was taken on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    rows: dict[str, tuple[Step, Step]], device: torch.device, rounds: int, inner: int, warmup: int = 2,
    interleave: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Median ms per call of each row's step; rows[name] = (setup, step).

    Per round and row: setup() (untimed), then `inner` calls timed as one block. Interleaved,
    every round visits every row, so a noisy neighbour slows all rows alike.
    """
    samples: dict[str, list[float]] = {name: [] for name in rows}
    order = [list(rows)] * rounds if interleave else [[n] for n in rows for _ in range(rounds)]
    warmed: set[str] = set()
    for names in order:
        for name in names:
            setup, step = rows[name]
            setup()
            if name not in warmed:
                for _ in range(warmup):
                    step()
                warmed.add(name)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            sync(device)
            samples[name].append((time.perf_counter() - t0) * 1e3 / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


def paired_ratio(base: Step, other: Step, device: torch.device, rounds: int, inner: int, warmup: int = 2) -> tuple[float, float, float]:
    """(median over rounds of base ms / other ms, median base ms, median other ms).

    Each round times `inner` calls of both, in alternating order (ABBA), and contributes one ratio:
    a slow minute on a shared machine slows both sides of that round, so the ratio is steadier
    than the ratio of two separately taken medians.
    """
    for step in (base, other):
        for _ in range(warmup):
            step()
    ratios, times = [], {0: [], 1: []}
    for r in range(rounds):
        t = {}
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            step = (base, other)[i]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(inner):
                step()
            sync(device)
            t[i] = (time.perf_counter() - t0) * 1e3 / inner
            times[i].append(t[i])
        ratios.append(t[0] / t[1])
    return statistics.median(ratios), statistics.median(times[0]), statistics.median(times[1])


def cache_argument(model: nn.Module) -> str:
    """The name the model's forward takes its KV cache by: "cache" in recent transformers
    (which warns about the older "past_key_values" on every call), else "past_key_values"."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decode_stepper(
    model: nn.Module, batch: int, steps: int, compile_: bool = False, seed: int = 0, text: torch.Tensor | None = None
) -> Step:
    """A step() that decodes one new token for each of `batch` sequences on `model`'s KV cache.

    The cache is filled with a PROMPT-token prompt first and holds `steps` more tokens. text: token
    windows [>= batch, >= PROMPT + steps] to decode (real text, so that routers that pick a
    variable number of experts see what they will see in use); else random tokens.
    compile_: StaticCache + torch.compile(mode="reduce-overhead") (CUDA: eager decode is
    launch-bound); else a DynamicCache and the eager forward.
    """
    from transformers import DynamicCache, StaticCache

    device = next(model.parameters()).device
    if text is None:
        gen = torch.Generator().manual_seed(seed + batch)
        text = torch.randint(0, model.config.get_text_config().vocab_size, (batch, PROMPT + 1), generator=gen)
    text = text[:batch].to(device)
    prompt = text[:, :PROMPT]
    if compile_:
        cache = StaticCache(config=model.config, max_cache_len=PROMPT + steps + 16)
        forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    else:
        cache, forward = DynamicCache(config=model.config), model.forward
    kv = {cache_argument(model): cache}
    with torch.no_grad():
        model(prompt, use_cache=True, logits_to_keep=1, cache_position=torch.arange(PROMPT, device=device), **kv)
    pos = [PROMPT]

    def step() -> None:
        cp = torch.tensor([pos[0]], device=device)
        nxt = text[:, pos[0] : pos[0] + 1] if pos[0] < text.shape[1] else text[:, -1:]  # past its end: the last token
        with torch.no_grad():
            forward(input_ids=nxt, use_cache=True, cache_position=cp, **kv)
        pos[0] += 1

    return step


def runtime_stepper(
    model: nn.Module, batch: int, steps: int, text: torch.Tensor, precision: str = "bf16", threads: int | None = None
) -> Step:
    """decode_stepper on moecarve's decode runtime (moecarve.runtime.Runtime): each call is one
    native step decoding the next token of text [>= batch, ...] for `batch` sequences, under the
    runtime's own policy (a carve routes fewer than its dense_batch sequences, runs every expert
    from it on), as generate() and serve decode. Past the end of the cache the positions start
    again after the prompt (the cache is overwritten in place; the cost of a step barely depends
    on its position at these lengths)."""
    from ..runtime import Runtime

    text = text[:batch].cpu()
    ctx = min(PROMPT + steps + 1, getattr(model.config.get_text_config(), "max_position_embeddings", None) or PROMPT + steps + 1)
    rt = Runtime(model, precision, threads=threads, max_ctx=ctx, max_slots=batch, max_tokens=max(PROMPT, batch))
    for b in range(batch):
        rt.prefill(text[b, :PROMPT].tolist(), slot=b)
    routed, pos = rt.decode_routed(batch), [PROMPT]

    def step() -> None:
        if pos[0] >= rt.max_ctx:
            pos[0] = PROMPT
        p = pos[0]
        column = text[:, p % text.shape[1]].tolist()
        rt.step(column, [p] * batch, range(batch), range(batch), routed)
        pos[0] += 1

    step.runtime = rt  # keeps the runtime alive as long as the step
    return step


def ffn_stepper(mlp: nn.Module, x: torch.Tensor) -> Step:
    """A step() that runs one FFN (dense MLP or carved module) on the hidden states x [1, T, d]."""

    def step() -> None:
        with torch.no_grad():
            mlp(x)

    return step
