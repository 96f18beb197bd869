"""Progress that shows in logs: tqdm bars as plain lines when stderr is not a terminal.

tqdm redraws a bar in place with "\\r"; in a pipe or a log file those redraws pile up on one
line nobody sees until the end (and rich's spinners print nothing at all). `log_lines()` wraps
stderr so that a bar prints as a line when it starts, then at most every `every` seconds, and
once more with its final state; everything else passes through unchanged.
"""

from __future__ import annotations

import io
import sys
import time
from contextlib import contextmanager


def _progress(bar: str | None) -> str | None:
    """A bar without its timing part ("[00:14<00:04, 4.81s/it]"), which changes on every redraw."""
    return bar if bar is None else bar.split("[", 1)[0]


class LogLines(io.TextIOBase):
    """A text stream that turns tqdm's carriage-return redraws into throttled plain lines."""

    def __init__(self, stream, every: float = 10.0):
        self.stream = stream
        self.every = every
        self._bar: str | None = None  # the latest state of the bar being drawn
        self._shown: str | None = None  # the last state printed
        self._last = float("-inf")  # when it was printed

    def _emit(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()
        self._shown, self._last = line, time.monotonic()

    def write(self, s: str) -> int:
        if s.startswith("\r"):  # tqdm redraws its bar
            self._bar = s.strip()
            if self._bar and time.monotonic() - self._last >= self.every:
                self._emit(self._bar)
            return len(s)
        if s == "\n" and self._bar is not None:  # tqdm closes its bar: show the final state once
            if self._bar and _progress(self._bar) != _progress(self._shown):
                self._emit(self._bar)
            self._bar, self._last = None, float("-inf")
            return len(s)
        return self.stream.write(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")


@contextmanager
def log_lines(every: float = 10.0):
    """Within the block, sys.stderr prints progress bars as lines when it is not a terminal."""
    if sys.stderr.isatty():
        yield
        return
    saved = sys.stderr
    sys.stderr = LogLines(saved, every)
    try:
        yield
    finally:
        sys.stderr = saved
