"""Side-by-side evaluation of a dense model and its carved versions.

Each model is loaded, measured (perplexity, harness tasks, parameters, generation speed) and
freed before the next, so only one model is in memory at a time. The first model is the
reference for the Δ% column. Each row names its model by a label unique among the rows, says
which method made it, and records the perplexity window actually used (clipped to the model's
maximum positions).
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
    dtype / device / kernels / revision / trust_remote_code / device_map: how every model loads
    (moecarve.io.loading.load_any; kernels apply to carved folders only).
    """

    ppl: str | None = None
    seqlen: int = 2048
    max_chars: int | None = None
    batch_size: int = 4
    tasks: TaskConfig | None = None
    gen_tokens: int = 32
    dtype: str = "auto"
    device: str = "auto"
    kernels: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    device_map: str | None = None

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

    name: str  # a label unique among the compared models (see unique_labels)
    path: str
    config: str  # the carve configuration, "condensed", or "dense"
    params_total: int
    params_active: int
    perplexity: float | None = None
    delta_pct: float | None = None  # perplexity change vs the first model, in percent
    tasks: dict[str, float] = field(default_factory=dict)  # task -> acc
    carve_seconds: float | None = None
    tokens_per_s: float | None = None
    method: str = "dense"  # what made it: "fitted, shadow 4-bit router", "cmoe, analytic router", "CD-MoE", ...
    seqlen: int | None = None  # the perplexity window used: cfg.seqlen clipped to the model's max positions


def unique_labels(paths: list[str]) -> list[str]:
    """Short labels that tell the paths apart: each one's last folder name, with as many parent
    folders as it takes where names repeat ("a/S2A2E8", "b/S2A2E8"); "#k" for a path given twice."""
    parts = [Path(p).resolve().parts if Path(p).exists() else tuple(str(p).rstrip("/").split("/")) for p in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clashes = [i for i, lab in enumerate(labels) if depth[i] < len(parts[i])
                   and any(labels[j] == lab and parts[j] != parts[i] for j in range(len(paths)))]  # fmt: skip
        if not clashes:
            break
        for i in clashes:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        seen[lab] = seen.get(lab, 0) + 1
        labels[i] = lab if seen[lab] == 1 else f"{lab} #{seen[lab]}"
    return labels


def method_of(config, path: str) -> str:
    """What made a model, from its config's `moecarve` entry and a condense report beside it:
    "fitted, shadow 4-bit router", "cmoe, analytic router", "... + CD-MoE", "CD-MoE", or "dense"."""
    meta = getattr(config, "moecarve", None) or {}
    parts = []
    if carve := meta.get("carve"):
        moes = [e for e in meta.get("modules", {}).values() if e.get("type", "moe") == "moe"]
        router = moes[0].get("router", carve.get("router")) if moes else carve.get("router")
        if router == "shadow":
            router = f"shadow {moes[0].get('shadow_bits')}-bit"
        parts.append(f"{carve.get('method', 'cmoe')}, {router} router")
    if meta.get("condense") or (Path(path) / "condense_report.json").exists():
        parts.append("CD-MoE")
    return " + ".join(parts) or "dense"


def describe(cfg: CompareConfig, rows: list[CompareRow]) -> str:
    """The measurement settings in one line for titles: "test.txt, seq 1024, first 200,000 chars",
    with the windows the rows really used ("seq 1024/2048" when models clip differently)."""
    if cfg.ppl is None:
        return ""
    used = sorted({r.seqlen for r in rows if r.seqlen is not None}) or [cfg.seqlen]
    chars = f", first {cfg.max_chars:,} chars" if cfg.max_chars else ""
    return f"{Path(cfg.ppl).name}, seq {'/'.join(map(str, used))}{chars}"


def evaluate_one(path: str, cfg: CompareConfig, text: str | None = None, name: str | None = None) -> CompareRow:
    """Load one model (dense or carved folder), measure it, free it (text: cfg.ppl's text, if
    already read; name: its label, default the folder name)."""
    from ..carve import count_params
    from ..io.loading import is_carved, load_any
    from ..io.save import load_report
    from .throughput import generation_speed

    model, tok = load_any(path, cfg.dtype, cfg.device, cfg.kernels, revision=cfg.revision,
                          trust_remote_code=cfg.trust_remote_code, device_map=cfg.device_map)  # fmt: skip
    try:
        total, active = count_params(model)
        report = load_report(path) if is_carved(path) else None
        method = method_of(model.config, path)
        config = report.config.name if report else "condensed" if "CD-MoE" in method else "dense"
        row = CompareRow(
            name=name or Path(path).name or str(path), path=str(path), config=config, method=method,
            params_total=total, params_active=active, carve_seconds=report.seconds if report else None,
        )  # fmt: skip
        if cfg.ppl is not None:
            result = eval_perplexity(model, tok, cfg.ppl, cfg.seqlen, cfg.max_chars, cfg.batch_size, text=text)
            row.perplexity, row.seqlen = result.perplexity, result.seqlen
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
    for p, name in zip(paths, unique_labels(paths)):
        row = evaluate_one(p, cfg, text, name)
        base = rows[0].perplexity if rows else row.perplexity
        if row.perplexity is not None and base:
            row.delta_pct = 100.0 * (row.perplexity - base) / base
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def write_json(rows: list[CompareRow], cfg: CompareConfig, path: str | Path) -> Path:
    """The rows and the settings that produced them, written atomically. settings.seqlen is the
    window asked for; each row's seqlen is the one its perplexity used."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = asdict(cfg)
    doc = {"settings": settings, "models": [asdict(r) for r in rows]}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path
