"""`moecarve inspect DIR`: what a carved folder holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..io.save import load_report, read_config
from .common import console, fmt_params, table


def register(sub) -> None:
    p = sub.add_parser("inspect", help="print what a carved folder holds", description="Print the carve settings, "
                       "the carved modules and the carve report of a moecarve folder.")  # fmt: skip
    p.add_argument("dir", help="a carved model folder")
    p.add_argument("--plot", action="store_true", help="write the per-layer activation-rate histograms and "
                   "expert-load bars of the carve report as PNG files")  # fmt: skip
    p.add_argument("--plot-dir", default=".", help="folder for the PNG files (default: the current folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    config = read_config(args.dir)
    meta = config.moecarve
    kinds = Counter(e.get("type", "moe") for e in meta["modules"].values())
    rows = [["architecture", f"{config.model_type} ({meta.get('base_class')})"],
            ["carve settings", ", ".join(f"{k}={v}" for k, v in meta.get("carve", {}).items())],
            ["modules", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))]]  # fmt: skip
    report = load_report(args.dir)
    if report is not None:
        rows += [
            ["config", report.config.name],
            ["parameters total / active", f"{fmt_params(report.params_total)} / {fmt_params(report.params_active)}"],
            ["calibration", f"{report.n_windows} x {report.seqlen} tokens"],
            ["carve time", f"{report.seconds:.1f} s"],
            ["router load max/mean (worst layer)", f"{report.load_imbalance:.2f}"],
        ]
    console.print(table(f"moecarve folder {args.dir}", ["", ""], rows))
    if report is not None:
        lrows = [[r.layer, r.expert_size, f"{r.shared_rate:.4f}", f"{r.routed_rate:.4f}", " ".join(map(str, r.load))] for r in report.layers]
        console.print(table("layers", ["layer", "m", "shared rate", "routed rate", "calibration load per routed expert"], lrows))
    if args.plot:
        write_plots(args.dir, report, args.plot_dir)
    return 0


def write_plots(folder: str, report, plot_dir: str) -> list[Path]:
    """<name>-rates.png (activation-rate histograms, CMoE Fig. 3) and <name>-load.png in plot_dir."""
    from ..errors import MoecarveError
    from ..eval.plots import plot_expert_load, plot_rate_histograms

    if report is None:
        raise MoecarveError(f"{folder} has no carve report (carve_report.json): nothing to plot")
    name = Path(folder).resolve().name
    paths = [plot_rate_histograms(report, Path(plot_dir) / f"{name}-rates.png"),
             plot_expert_load(report, Path(plot_dir) / f"{name}-load.png")]  # fmt: skip
    console.print("wrote " + ", ".join(map(str, paths)))
    return paths
