"""Side-by-side evaluation of a dense model and its carved versions.

Each model is loaded, measured (perplexity, harness tasks, parameters, generation speed) and
freed before the next, so only one model is in memory at a time. The first model is the
reference for the Δ% column.
"""

from __future__ import annotations

import gc
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import MoecarveError
from .data import load_eval_text
from .perplexity import eval_perplexity
from .tasks import TaskConfig, run_tasks


class CompareError(MoecarveError, ValueError):
    """Bad compare settings."""


@dataclass(frozen=True)
class CompareConfig:
    """What to measure for every model.

    ppl: perplexity source ('wikitext2', 'c4', a .txt file or a dataset folder), None to skip.
    tasks: harness settings, None to skip. gen_tokens: tokens generated for the speed figure (0 skips).
    """

    ppl: str | None = None
    seqlen: int = 2048
    max_chars: int | None = None
    batch_size: int = 4
    tasks: TaskConfig | None = None
    gen_tokens: int = 32
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        if self.seqlen < 2:
            raise CompareError(f"seqlen must be >= 2, got {self.seqlen}")
        if self.max_chars is not None and self.max_chars < 1:
            raise CompareError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.batch_size < 1:
            raise CompareError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.gen_tokens < 0:
            raise CompareError(f"gen_tokens must be >= 0, got {self.gen_tokens}")


@dataclass
class CompareRow:
    """One model's measurements (None: not measured or not applicable)."""

    name: str
    path: str
    config: str  # the carve configuration, or "dense"
    params_total: int
    params_active: int
    perplexity: float | None = None
    delta_pct: float | None = None  # perplexity change vs the first model, in percent
    tasks: dict[str, float] = field(default_factory=dict)  # task -> acc
    carve_seconds: float | None = None
    tokens_per_s: float | None = None


def evaluate_one(path: str, cfg: CompareConfig, text: str | None = None) -> CompareRow:
    """Load one model (dense or carved folder), measure it, free it (text: cfg.ppl's text, if already read)."""
    from ..carve import count_params
    from ..io.loading import is_carved, load_any
    from ..io.save import load_report
    from .throughput import generation_speed

    model, tok = load_any(path, cfg.dtype, cfg.device)
    try:
        total, active = count_params(model)
        report = load_report(path) if is_carved(path) else None
        row = CompareRow(
            name=Path(path).name or str(path), path=str(path), config=report.config.name if report else "dense",
            params_total=total, params_active=active, carve_seconds=report.seconds if report else None,
        )  # fmt: skip
        if cfg.ppl is not None:
            result = eval_perplexity(model, tok, cfg.ppl, cfg.seqlen, cfg.max_chars, cfg.batch_size, text=text)
            row.perplexity = result.perplexity
        if cfg.tasks is not None:
            row.tasks = {t: r.accuracy for t, r in run_tasks(model, tok, cfg.tasks).items()}
        if cfg.gen_tokens:
            row.tokens_per_s = generation_speed(model, tok, cfg.gen_tokens)
        return row
    finally:
        del model
        gc.collect()


def compare(
    paths: list[str], cfg: CompareConfig, on_row: Callable[[CompareRow], None] | None = None
) -> list[CompareRow]:
    """Measure every model in `paths` (the first is the reference for delta_pct)."""
    if len(paths) < 2:
        raise CompareError("compare needs a dense model and at least one carved model")
    text = load_eval_text(cfg.ppl) if cfg.ppl is not None else None  # read once; fails before any model loads
    rows: list[CompareRow] = []
    for p in paths:
        row = evaluate_one(p, cfg, text)
        base = rows[0].perplexity if rows else row.perplexity
        if row.perplexity is not None and base:
            row.delta_pct = 100.0 * (row.perplexity - base) / base
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def write_json(rows: list[CompareRow], cfg: CompareConfig, path: str | Path) -> Path:
    """The rows and the settings that produced them, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = asdict(cfg)
    doc = {"settings": settings, "models": [asdict(r) for r in rows]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path
