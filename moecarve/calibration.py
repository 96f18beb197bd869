"""Calibration windows: text -> token windows [n_samples, seqlen], seeded.

Sources: the corpus shipped with moecarve (4 MB of technical English, package data), a text
file, or a local Hugging Face `datasets` folder saved with `save_to_disk` (a "text" column).
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

import torch

from .config import CalibConfig
from .errors import MoecarveError


class CalibrationError(MoecarveError, ValueError):
    """The calibration source is missing, empty or too short."""


def embedded_corpus() -> str:
    """The calibration corpus shipped with moecarve."""
    with resources.files("moecarve.data").joinpath("calib.txt.gz").open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def read_text(source: str | None) -> str:
    """The text of a calibration source (None: the embedded corpus)."""
    if source is None:
        return embedded_corpus()
    path = Path(source)
    if not path.exists():
        raise CalibrationError(f"calibration source {source!r} does not exist")
    if path.is_dir():
        try:
            import datasets
        except ImportError as e:  # pragma: no cover - datasets is a dependency
            raise CalibrationError("reading a dataset folder needs the `datasets` package") from e
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise CalibrationError(f"{source!r} is not a dataset folder saved with save_to_disk: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if "text" not in ds.column_names:
            raise CalibrationError(f"dataset {source!r} has no 'text' column (columns: {ds.column_names})")
        return "\n\n".join(t for t in ds["text"] if t)
    return path.read_text(encoding="utf-8", errors="replace")


def tokenize_windows(tokenizer, text: str, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Tokenize `text` once and draw n_samples windows of seqlen tokens at seeded offsets.

    Returns a LongTensor [n_samples, seqlen]. Windows are drawn without replacement from the
    non-overlapping grid when the text is long enough, else at random offsets.
    """
    if not text or not text.strip():
        raise CalibrationError("the calibration text is empty")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < seqlen + 1:
        raise CalibrationError(
            f"the calibration text has {ids.numel()} tokens; a window of {seqlen} needs at least {seqlen + 1}"
        )
    g = torch.Generator().manual_seed(seed)
    n_slots = ids.numel() // seqlen
    if n_slots >= n_samples:
        starts = torch.randperm(n_slots, generator=g)[:n_samples] * seqlen
    else:
        starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def load_windows(tokenizer, cfg: CalibConfig, max_positions: int | None = None) -> torch.Tensor:
    """Calibration windows [n_samples, seqlen] for a tokenizer; seqlen clipped to max_positions."""
    seqlen = min(cfg.seqlen, max_positions) if max_positions else cfg.seqlen
    return tokenize_windows(tokenizer, read_text(cfg.source), cfg.n_samples, seqlen, cfg.seed)
