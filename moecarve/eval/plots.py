"""PNG figures: quality vs active parameters (compare), histograms of the per-neuron statistic and
expert load (inspect). matplotlib runs on the Agg backend (files only, no display needed).

Labels say what is shown: the statistic each carve method measured ("activation rate" for cmoe,
"mean |h|" for fitted), the router kind, and each compared model's method; compared models are
named in a legend (one marker and colour each), so no label can overlap another.
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


MARKERS = "osD^vP*Xh<>p"


def quality_figure(rows: list[dict], title: str = "quality vs active parameters"):
    """The compare figure: perplexity (log scale) and, when present, mean task accuracy against
    active parameters per token; each model one marker and colour, named with its method in a legend.

    rows: compare rows with "name", "params_active", and optional "method", "perplexity" and "tasks" ({task: acc}).
    """
    with_tasks = any(r.get("tasks") for r in rows)
    fig, axes = plt.subplots(1, 2 if with_tasks else 1, figsize=(11 if with_tasks else 6, 4.2), squeeze=False)
    panels = [(axes[0][0], lambda r: r.get("perplexity"), "perplexity (log)", "perplexity")]
    if with_tasks:
        mean_acc = lambda r: sum(r["tasks"].values()) / len(r["tasks"]) if r.get("tasks") else None  # noqa: E731
        panels.append((axes[0][1], mean_acc, "mean accuracy", "tasks (mean acc)"))
    for k, r in enumerate(rows):
        label = f"{r['name']} ({r['method']})" if r.get("method") else r["name"]
        style = dict(marker=MARKERS[k % len(MARKERS)], color=f"C{k % 10}", linestyle="", markersize=7)
        for ax, value, _, _ in panels:
            if value(r) is not None:
                ax.plot([r["params_active"] / 1e6], [value(r)], label=label if ax is panels[0][0] else None, **style)
    for ax, _, ylabel, name in panels:
        ax.set(xlabel="active parameters per token (M)", ylabel=ylabel, title=name)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_yscale("log")
    fig.suptitle(title)
    fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, max(1, len(rows))), fontsize=8, frameon=False)
    return fig


def plot_quality(rows: list[dict], path: str | Path, title: str = "quality vs active parameters") -> Path:
    """Write quality_figure(rows, title) as a PNG."""
    return _save(quality_figure(rows, title), path)


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def statistic_title(report) -> str:
    """What the histograms show, with the settings it depends on: "activation rate of the FFN
    neurons (S2A2E8, cmoe, k_act=10)" or "mean |h| of the FFN neurons (S2A2E8, fitted)"."""
    statistic = report.layers[0].statistic if report.layers else "activation rate"
    cfg = report.config
    k_act = f", k_act={cfg.k_act}" if statistic == "activation rate" else ""
    return f"{statistic} of the FFN neurons ({cfg.name}, {cfg.method}{k_act})"


def plot_rate_histograms(report, path: str | Path) -> Path:
    """One panel per layer: how many intermediate neurons have each value of the statistic the
    carve measured (LayerReport.statistic: the activation rate for cmoe, CMoE Fig. 3; mean |h| for fitted).

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
        ax.set_xlabel(layer.statistic, fontsize=8)
        ax.set_ylabel("neurons", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(statistic_title(report))
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
    router = report.layers[0].router if report.layers else ""
    fig.suptitle(f"routed-expert load on the calibration tokens ({report.config.name}" + (f", {router} router)" if router else ")"))
    fig.tight_layout()
    return _save(fig, path)
