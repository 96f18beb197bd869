"""One native step per call: a model packed for the runtime (runtime/weights.py), its KV cache and
thread pool (runtime/csrc), and the Python face of `rt_step`.

A step takes any tokens of any sequences: each token names its sequence's cache slot and its
position there, and the rows that want logits. Prefill is a step over a prompt's tokens (in chunks
of `max_tokens`), decode a step over one token of each running sequence. The cache is preallocated
(`max_slots` sequences of `max_ctx` positions); a slot is reused by writing from position 0 again.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from ..errors import MoecarveError
from . import native as N
from .weights import Weights, load_weights


class RuntimeError_(MoecarveError, RuntimeError):
    """A step the runtime cannot take (a position past the context, a slot it does not have, ...)."""


def default_threads() -> int:
    """Physical cores available to this process (SMT siblings share a core's load/store units, which
    a memory-bound decode step saturates)."""
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        avail = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or avail
    except ImportError:
        physical = avail
    return max(1, min(avail, physical))


class Runtime:
    """A model in the native runtime.

    precision: "bf16" (default), "int8" (Q8_0-style blocks) or "fp32" (the reference).
    threads: worker threads (default: the physical cores). max_ctx: positions per sequence
    (default: the model's, at most 4096). max_slots: sequences decoded together. max_tokens: tokens
    per step (prompt chunks).

    Carved models: a carve reads less per token than the dense model only where few tokens share a
    step; a prompt chunk or a large batch picks nearly every expert anyway, and then one dense
    product over all of them is faster than routing. So by default prompt tokens (prefill="dense")
    and decode steps of at least `dense_batch` sequences run each carved layer with every expert
    (its shared and routed neurons as one dense MLP, combine weight 1: between the carve and the
    source model in quality, the dense model's speed), and decode steps of fewer sequences are
    routed. prefill="routed" and dense_batch=None route every token: the carved model's own
    function, as transformers computes it. Carves whose combine weights are not all 1 (the linear
    router, a trained combine scale) are routed always.
    """

    def __init__(self, model: nn.Module, precision: str = "bf16", threads: int | None = None,
                 max_ctx: int | None = None, max_slots: int = 1, max_tokens: int = 256, prefill: str = "dense",
                 dense_batch: int | None = 8):  # fmt: skip
        threads = default_threads() if threads is None else threads
        if threads < 1:
            raise RuntimeError_(f"threads must be at least 1 (got {threads})")
        if max_slots < 1 or max_tokens < 1:
            raise RuntimeError_("max_slots and max_tokens must be at least 1")
        if prefill not in ("dense", "routed"):
            raise RuntimeError_(f"prefill must be 'dense' or 'routed' (got {prefill!r})")
        if dense_batch is not None and dense_batch < 1:
            raise RuntimeError_(f"dense_batch must be at least 1 or None (got {dense_batch})")
        self.dense_prefill = prefill == "dense"
        self.dense_batch = dense_batch if dense_batch is not None and dense_batch <= max_slots else None
        all_experts = self.dense_prefill or self.dense_batch is not None
        self.weights: Weights = load_weights(model, precision, max_ctx, max_slots, max_tokens, all_experts)
        lib = N.library()
        self._lib = lib
        self._ctx = lib.rt_create(ctypes.byref(self.weights.desc), threads)
        if not self._ctx:
            raise MemoryError("the decode runtime could not allocate its cache and buffers")
        D = self.weights.desc
        self.vocab, self.max_ctx, self.max_slots, self.max_tokens = D.vocab, D.max_ctx, D.max_slots, D.max_tokens
        self.threads = lib.rt_threads(self._ctx)
        self.precision = precision
        self._ld = (D.vocab + N.PANEL_ROWS - 1) // N.PANEL_ROWS * N.PANEL_ROWS
        self._logits = torch.empty(max_tokens, self._ld, dtype=torch.float32)
        # tokens, positions, slots, output rows: filled and checked through a numpy view of the same memory
        # (a few us a step; torch.as_tensor and tensor min / max took ~40 us, 4% of a small model's step)
        self._ints = torch.zeros(4, max_tokens, dtype=torch.int32)
        self._ints_np = self._ints.numpy()
        self._int_ptrs = [self._ints[i].data_ptr() for i in range(4)]

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lib.rt_free(self._ctx)
            self._ctx = None

    def __del__(self):
        self.close()

    def step(self, tokens, positions, slots, out_rows, routed: int | None = None) -> torch.Tensor:
        """Run one step: tokens[i] at positions[i] of sequence slots[i] (lists or int tensors of
        T <= max_tokens); returns logits [len(out_rows), vocab] float32 of the token rows
        out_rows, a view into a buffer the next step overwrites. Carved layers route the first
        `routed` tokens (default: all) and run the rest with every expert, where packed."""
        T, n_out = len(tokens), len(out_rows)
        routed = T if routed is None else routed
        if not 0 < T <= self.max_tokens or not 0 <= n_out <= T:
            raise RuntimeError_(f"a step takes 1..{self.max_tokens} tokens and at most as many logit rows (got {T}, {n_out})")
        if len(positions) != T or len(slots) != T:  # numpy (as torch) would broadcast a single value
            raise RuntimeError_(f"a step takes {T} tokens, positions and slots (got {len(positions)} positions, {len(slots)} slots)")
        ints = self._ints_np
        try:
            ints[0, :T], ints[1, :T], ints[2, :T] = tokens, positions, slots
            ints[3, :n_out] = out_rows
        except (OverflowError, TypeError, ValueError) as e:
            raise RuntimeError_(f"a step takes {T} tokens, positions and slots and {n_out} output rows, as int32 ({e})") from None
        lo, hi = ints[:3, :T].min(axis=1).tolist(), ints[:3, :T].max(axis=1).tolist()  # tokens, positions, slots
        if lo[1] < 0 or hi[1] >= self.max_ctx:
            raise RuntimeError_(f"position {hi[1]} is beyond the context of {self.max_ctx} positions")
        if lo[2] < 0 or hi[2] >= self.max_slots:
            raise RuntimeError_(f"slot {hi[2]} does not exist (max_slots={self.max_slots})")
        if lo[0] < 0 or hi[0] >= self.vocab:
            raise RuntimeError_(f"token id {hi[0]} is outside the vocabulary of {self.vocab}")
        if n_out and (int(ints[3, :n_out].min()) < 0 or int(ints[3, :n_out].max()) >= T):
            raise RuntimeError_("an output row names a token outside the step")
        tk, pos, sl, rows = self._int_ptrs
        rc = self._lib.rt_step(self._ctx, T, tk, pos, sl, routed, n_out, rows, self._logits.data_ptr(), self._ld)
        if rc:
            raise MemoryError(f"the decode runtime failed a step (code {rc})")
        return self._logits[:n_out, : self.vocab]

    def profile(self, on: bool = True) -> dict[str, float]:
        """Switch per-phase timing on or off; returns the seconds spent per phase since the last call
        (embed, qkv, attention, wo, ffn_norm, router, ffn, lm_head: thread 0's wall time between the
        barriers that end each phase, summed over steps and layers)."""
        out = (ctypes.c_double * len(N.PHASES))()
        self._lib.rt_profile(self._ctx, int(on), out)
        return dict(zip(N.PHASES, out))

    def prompt_routed(self, n: int) -> int:
        """How many of n prompt tokens the carved layers route (0 with dense prefill)."""
        return 0 if self.dense_prefill else n

    def decode_routed(self, n: int) -> int:
        """How many of n decode tokens of one step the carved layers route (0 from dense_batch on)."""
        return 0 if self.dense_batch is not None and n >= self.dense_batch else n

    def prefill(self, token_ids: list[int], slot: int = 0, start: int = 0) -> torch.Tensor:
        """Feed a sequence's tokens from position `start` in chunks; logits [vocab] of the last one."""
        if not token_ids:
            raise RuntimeError_("an empty prompt")
        if start + len(token_ids) > self.max_ctx:
            raise RuntimeError_(f"a prompt of {start + len(token_ids)} tokens is longer than the context of {self.max_ctx}")
        logits = None
        for i in range(0, len(token_ids), self.max_tokens):
            chunk = token_ids[i : i + self.max_tokens]
            last = i + len(chunk) == len(token_ids)
            logits = self.step(chunk, range(start + i, start + i + len(chunk)), [slot] * len(chunk),
                               [len(chunk) - 1] if last else [], self.prompt_routed(len(chunk)))  # fmt: skip
        return logits[0]
