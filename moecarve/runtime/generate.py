"""Token streams over the runtime, one sequence or many.

`Engine` is the batch scheduler: requests join and leave at any step. Each step carries one decode
token of every running sequence plus the next chunk of any prompt still being read (a step mixes
both, so a new request starts without pausing the others), up to the runtime's `max_tokens`; every
sequence owns a cache slot from its first prompt token to its last generated one. `generate` is
the one-sequence case, `TextStream` turns token ids into text deltas with stop strings.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import MoecarveError
from .sample import Sampler, SamplingParams
from .step import Runtime


class RequestError(MoecarveError, ValueError):
    """A request the engine cannot serve (an empty prompt, one longer than the context, ...)."""


@dataclass
class Request:
    """One sequence: its prompt, limits and what it produced. `on_token(request, token_id)` is
    called from the engine's thread for every generated token; `done` is set when it finishes,
    with `finish_reason` "length", "stop" (an end-of-sequence token) or "cancelled"."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_ids: frozenset[int] = frozenset()
    on_token: Callable[["Request", int], None] | None = None
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    # timings (time.perf_counter): submitted, first token, finished
    t_submit: float = 0.0
    t_first: float | None = None
    t_done: float | None = None
    # engine state
    slot: int = -1
    fed: int = 0  # prompt tokens already in the cache
    cancelled: bool = False
    sampler: Sampler | None = None

    def cancel(self) -> None:
        """Stop at the next step and free the slot (safe from any thread)."""
        self.cancelled = True

    @property
    def ttft(self) -> float | None:
        return None if self.t_first is None else self.t_first - self.t_submit


class Engine:
    """Runs requests on a Runtime, batched. Thread-safe `submit`; `step` (or the background thread
    of `start`) advances every running request by one token."""

    def __init__(self, runtime: Runtime, eos_ids: set[int] | frozenset[int] = frozenset()):
        self.rt = runtime
        self.eos_ids = frozenset(eos_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.free_slots = list(range(runtime.max_slots - 1, -1, -1))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None  # what stopped the background thread, if anything

    # ------------------------------------------------------------------ requests
    def check(self, prompt: list[int], max_new_tokens: int) -> None:
        """RequestError unless the prompt and the generation fit this runtime."""
        if not prompt:
            raise RequestError("the prompt is empty")
        if max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        if len(prompt) >= self.rt.max_ctx:
            raise RequestError(f"the prompt has {len(prompt)} tokens; the context holds {self.rt.max_ctx}")
        if len(prompt) + max_new_tokens > self.rt.max_ctx:
            raise RequestError(f"{len(prompt)} prompt tokens + {max_new_tokens} new ones exceed the context of "
                               f"{self.rt.max_ctx} tokens")  # fmt: skip
        if max(prompt) >= self.rt.vocab or min(prompt) < 0:
            raise RequestError("the prompt holds a token id outside the vocabulary")

    def submit(self, prompt: list[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               stop_ids=(), on_token=None) -> Request:  # fmt: skip
        self.check(prompt, max_new_tokens)
        req = Request(list(prompt), max_new_tokens, sampling, frozenset(stop_ids) | self.eos_ids, on_token)
        req.sampler = Sampler(sampling)
        req.t_submit = time.perf_counter()
        with self._lock:
            self.waiting.append(req)
            self._wake.notify()
        return req

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ one step
    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.t_done = time.perf_counter()
        self.running.remove(req)
        self.free_slots.append(req.slot)
        req.done.set()

    def step(self) -> int:
        """One runtime step over every running request (and prompt chunks); returns the number of
        tokens it generated (0 when idle)."""
        with self._lock:
            while self.waiting and self.free_slots:
                req = self.waiting.popleft()
                req.slot = self.free_slots.pop()
                self.running.append(req)
            for req in [r for r in self.running if r.cancelled]:
                self._finish(req, "cancelled")
            batch = list(self.running)
        if not batch:
            return 0
        tokens, pos, slots, out_rows, emit = [], [], [], [], []
        for req in batch:  # decode tokens first: every running sequence advances each step
            if req.fed == len(req.prompt):
                n = len(req.prompt) + len(req.output) - 1
                out_rows.append(len(tokens))
                emit.append(req)
                tokens.append(req.output[-1])
                pos.append(n)
                slots.append(req.slot)
        n_decode = len(tokens)
        budget = self.rt.max_tokens - len(tokens)
        for req in batch:  # then prompt chunks, oldest request first
            if req.fed < len(req.prompt) and budget > 0:
                take = min(budget, len(req.prompt) - req.fed)
                tokens.extend(req.prompt[req.fed : req.fed + take])
                pos.extend(range(req.fed, req.fed + take))
                slots.extend([req.slot] * take)
                req.fed += take
                budget -= take
                if req.fed == len(req.prompt):
                    out_rows.append(len(tokens) - 1)
                    emit.append(req)
        # the decode tokens come first: routed unless the batch is large; prompt tokens by the runtime's
        # prefill policy (a step with a dense decode group runs its prompt tokens dense too)
        routed = self.rt.decode_routed(n_decode)
        if routed == n_decode:
            routed += self.rt.prompt_routed(len(tokens) - n_decode)
        logits = self.rt.step(tokens, pos, slots, out_rows, routed)
        now = time.perf_counter()
        for row, req in enumerate(emit):
            tok = req.sampler(logits[row])
            req.output.append(tok)
            if req.t_first is None:
                req.t_first = now
            if req.on_token is not None:
                req.on_token(req, tok)
            with self._lock:
                if tok in req.stop_ids:
                    self._finish(req, "stop")
                elif len(req.output) >= req.max_new_tokens:
                    self._finish(req, "length")
        return len(emit)

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()

    # ------------------------------------------------------------------ background thread
    def start(self) -> None:
        """Step in a background thread whenever there is work (the server's loop)."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="moecarve-engine", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    while not self._stop and not (self.waiting or self.running):
                        self._wake.wait()
                    if self._stop:
                        return
                self.step()
        except BaseException as e:  # a failed step ends every request rather than hanging them
            self.error = e
            with self._lock:
                for req in list(self.running) + list(self.waiting):
                    req.finish_reason = "error"
                    req.done.set()
                self.running.clear()
                self.waiting.clear()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def generate(runtime: Runtime, prompt: list[int], max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
             stop_ids=()) -> Iterator[int]:  # fmt: skip
    """Tokens of one sequence as they are produced (slot 0 of the runtime)."""
    engine = Engine(runtime)
    req = engine.submit(prompt, max_new_tokens, sampling, stop_ids)
    seen = 0
    while not req.done.is_set():
        engine.step()
        while seen < len(req.output):
            yield req.output[seen]
            seen += 1
    while seen < len(req.output):
        yield req.output[seen]
        seen += 1


class TextStream:
    """Token ids in, text out as it becomes final: a token is only shown once the text decoded so
    far no longer ends in an incomplete character, and with stop strings, text that could still
    grow into one is held back; `finished` tells whether a stop string was met (the text before
    it is everything that is returned).

    Decoding is incremental: each token decodes a short window (the tokens since the last final
    text, with the one before as context, as tokenizers join pieces differently at the start of a
    text), so a long generation costs O(1) per token, not O(length)."""

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.stop = [s for s in stop if s]
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # the final text decoded so far
        self.sent = 0  # characters of it already returned
        self.finished = False
        self._prefix = 0  # ids[_prefix:_read] decode to context already in self.text
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def _advance(self) -> None:
        """Append to self.text what the tokens since the last read add, if it is complete."""
        prefix = self._decode(self.ids[self._prefix : self._read])
        full = self._decode(self.ids[self._prefix :])
        if full.endswith("\ufffd") or len(full) < len(prefix):  # an incomplete UTF-8 sequence: wait
            return
        self.text += full[len(prefix) :]
        self._prefix, self._read = self._read, len(self.ids)

    def _release(self) -> str:
        """The text that can be returned now: up to a stop string (then finished), or short of any
        tail that may still grow into one."""
        for s in self.stop:
            at = self.text.find(s, max(0, self.sent - len(s) + 1))
            if at >= 0:
                self.finished = True
                out, self.sent = self.text[self.sent : at], at
                return out
        hold = 0  # the longest tail that is a proper prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = len(self.text) - hold
        out = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def push(self, token_id: int) -> str:
        """The new text this token makes final ("" if none yet)."""
        if self.finished:
            return ""
        self.ids.append(token_id)
        self._advance()
        return self._release()

    def flush(self) -> str:
        """What is left at the end of the generation (held-back text that never became a stop)."""
        if self.finished:
            return ""
        prefix = self._decode(self.ids[self._prefix : self._read])
        self.text += self._decode(self.ids[self._prefix :])[len(prefix) :]
        self._prefix = self._read = len(self.ids)
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


def logits_of(runtime: Runtime, prompt: list[int], routed: bool = True) -> torch.Tensor:
    """Logits [len(prompt), vocab] of every prompt position (slot 0), carved layers routed (or with
    every expert): a perplexity / test helper."""
    out = []
    for i in range(0, len(prompt), runtime.max_tokens):
        chunk = prompt[i : i + runtime.max_tokens]
        n = len(chunk)
        out.append(runtime.step(chunk, range(i, i + n), [0] * n, range(n), n if routed else 0).clone())
    return torch.cat(out)
