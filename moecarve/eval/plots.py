"""PNG figures: quality vs active parameters (compare), activation-rate histograms and expert load
(inspect). matplotlib runs on the Agg backend (files only, no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: headless machines and CI
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: str | Path) -> Path:
    """Write a figure atomically (temporary sibling, then rename) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_quality(rows: list[dict], path: str | Path, title: str = "quality vs active parameters") -> Path:
    """Perplexity (log scale) and, when present, mean task accuracy against active parameters per token.

    rows: compare rows with "name", "params_active", and optional "perplexity" and "tasks" ({task: acc}).
    """
    with_tasks = any(r.get("tasks") for r in rows)
    fig, axes = plt.subplots(1, 2 if with_tasks else 1, figsize=(11 if with_tasks else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    pts = [(r["params_active"] / 1e6, r["perplexity"], r["name"]) for r in rows if r.get("perplexity") is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o")
    for x, y, name in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel="active parameters per token (M)", ylabel="perplexity (log)", yscale="log", title="perplexity")
    ax.grid(True, which="both", alpha=0.3)
    if with_tasks:
        ax = axes[0][1]
        scored = [r for r in rows if r.get("tasks")]
        pts = [(r["params_active"] / 1e6, sum(r["tasks"].values()) / len(r["tasks"]), r["name"]) for r in scored]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "s", color="tab:green")
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set(xlabel="active parameters per token (M)", ylabel="mean accuracy", title="tasks (mean acc)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def plot_rate_histograms(report, path: str | Path) -> Path:
    """One panel per layer: how many intermediate neurons have each activation rate (CMoE Fig. 3).

    report: a CarveReport; each LayerReport.rate_histogram = {"max", "bins", "counts"} over [0, max].
    """
    n_rows, n_cols = _grid(len(report.layers))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.6 * n_rows), squeeze=False)
    for ax in axes.flat[len(report.layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, report.layers):
        h = layer.rate_histogram
        width = h["max"] / h["bins"]
        ax.bar([i * width for i in range(h["bins"])], h["counts"], width=width, align="edge", color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(f"layer {layer.layer}", fontsize=9)
        ax.set_xlabel("activation rate", fontsize=8)
        ax.set_ylabel("neurons", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"activation rates of the FFN neurons ({report.config.name}, k_act={report.config.k_act})")
    fig.tight_layout()
    return _save(fig, path)


def plot_expert_load(report, path: str | Path) -> Path:
    """One panel per layer: calibration tokens routed to each routed expert, with the balanced level."""
    n_rows, n_cols = _grid(len(report.layers))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.4 * n_rows), squeeze=False)
    for ax in axes.flat[len(report.layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, report.layers):
        load = layer.load or []
        ax.bar(range(len(load)), load, color="tab:orange")
        if load:
            ax.axhline(sum(load) / len(load), color="k", lw=0.8, ls="--")
        ax.set_title(f"layer {layer.layer} (max/mean {layer.load_imbalance:.2f})", fontsize=9)
        ax.set_xlabel("routed expert", fontsize=8)
        ax.set_ylabel("tokens", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"routed-expert load on the calibration tokens ({report.config.name})")
    fig.tight_layout()
    return _save(fig, path)
