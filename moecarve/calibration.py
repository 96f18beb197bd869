"""Calibration windows: text -> token windows [n_samples, seqlen], seeded.

Sources: the corpus shipped with moecarve (4 MB of technical English, package data), a text
file, or a local Hugging Face `datasets` folder saved with `save_to_disk` (a "text" column).
"""

from __future__ import annotations

import gzip
import logging
import re
from importlib import resources
from pathlib import Path

import torch

from .config import CalibConfig
from .errors import MoecarveError


log = logging.getLogger(__name__)

_SAMPLE_CHARS = 1 << 20  # characters inspected to tell text from binary data
_MAX_BAD = 0.3  # more control / undecodable characters than this: not text (random bytes ~55%, Latin-1 French ~20%)
_BAD_CHARS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")  # control characters but \t\n\v\f\r, and U+FFFD


class CalibrationError(MoecarveError, ValueError):
    """The calibration source is missing, empty or too short."""


def _bad_fraction(text: str) -> float:
    """The fraction of `text` (its first _SAMPLE_CHARS) that is control characters or U+FFFD."""
    sample = text[:_SAMPLE_CHARS]
    return len(_BAD_CHARS.findall(sample)) / max(len(sample), 1)


def read_text_file(path: str | Path, what: str = "text", error: type[MoecarveError] = CalibrationError) -> str:
    """The text of a file, refusing what is not text.

    NUL bytes or mostly control / undecodable characters raise `error` (a binary file read as text
    gives meaningless tokens, not an error). Bytes that are not UTF-8 are replaced by U+FFFD, with
    one warning on the "moecarve" logger.
    """
    path = Path(path)
    raw = path.read_bytes()
    if b"\0" in raw:
        raise error(f"{what} {str(path)!r} is not a text file (it contains NUL bytes); pass a UTF-8 text file")
    try:
        text, bad_utf8 = raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text, bad_utf8 = raw.decode("utf-8", errors="replace"), e.start
    bad = _bad_fraction(text)
    if bad > _MAX_BAD:
        raise error(f"{what} {str(path)!r} does not look like text ({bad:.0%} of its characters are control "
                    "or undecodable bytes); pass a UTF-8 text file")  # fmt: skip
    if bad_utf8 is not None:
        log.warning(f"{what} {str(path)!r} is not valid UTF-8 (first bad byte at offset {bad_utf8}); "
                    f"{text.count(chr(0xFFFD))} undecodable byte sequences were read as U+FFFD")  # fmt: skip
    return text


def embedded_corpus() -> str:
    """The calibration corpus shipped with moecarve."""
    with resources.files("moecarve.data").joinpath("calib.txt.gz").open("rb") as f:
        return gzip.decompress(f.read()).decode("utf-8")


def read_text(source: str | None) -> str:
    """The text of a calibration source (None: the embedded corpus); an empty one fails here, before
    any model is loaded."""
    if source is None:
        return embedded_corpus()
    text = _read_source(source)
    if not text.strip():
        raise CalibrationError(f"the calibration text is empty ({source})")
    return text


def _read_source(source: str) -> str:
    """The raw text of a calibration file or local datasets folder."""
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
    return read_text_file(path, "calibration source")


# Characters per piece a long text is tokenized in (a fast tokenizer encodes a batch on every core).
PIECE_CHARS = 1 << 16


def paragraph_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """text cut into pieces of about `size` characters, each ending after a blank line ("\n\n") (a
    text without blank lines stays one piece). Tokens almost never span a blank line; tokenizers
    that merge runs of newlines may cut one there differently (49 of SmolLM2's 1.46M tokens of the
    shipped corpus), which calibration does not notice and which costs no determinism."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n\n", start + size)
        end = len(text) if end < 0 else end + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def tokenize_windows(tokenizer, text: str, n_samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Tokenize `text` (in paragraph_pieces, as one batch) and draw n_samples windows of seqlen
    tokens at seeded offsets.

    Returns a LongTensor [n_samples, seqlen]. Windows are drawn without replacement from the
    non-overlapping grid when the text is long enough, else at random offsets.
    """
    if not text or not text.strip():
        raise CalibrationError("the calibration text is empty")
    ids = torch.tensor([i for piece in tokenizer(paragraph_pieces(text), add_special_tokens=False).input_ids for i in piece])
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


def load_windows(tokenizer, cfg: CalibConfig, max_positions: int | None = None, model=None) -> torch.Tensor:
    """Calibration windows [n_samples, seqlen] for a tokenizer.

    seqlen is clipped to the model's maximum positions, as the CLI does: pass `model` (a model or
    its config; moecarve.adapters.clip_seqlen reads the limit) or `max_positions` directly.
    """
    seqlen = min(cfg.seqlen, max_positions) if max_positions else cfg.seqlen
    if model is not None:
        from .adapters import clip_seqlen

        seqlen = clip_seqlen(getattr(model, "config", model), seqlen)
    return tokenize_windows(tokenizer, read_text(cfg.source), cfg.n_samples, seqlen, cfg.seed)
