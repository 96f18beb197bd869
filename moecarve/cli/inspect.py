"""`moecarve inspect DIR`: what a carved folder holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .common import add_command, console, fmt_params, routed, table


def register(sub) -> None:
    p = add_command(sub, "inspect", help="print what a carved folder holds",
                    description="Print the carve settings, the carved modules and the carve report of a moecarve folder.")  # fmt: skip
    p.add_argument("dir", help="a carved model folder")
    p.add_argument("--plot", action="store_true", help="write the per-layer histograms of the carve's neuron statistic "
                   "and the expert-load bars of the carve report as PNG files")  # fmt: skip
    p.add_argument("--plot-dir", default=".", metavar="DIR", help="folder for the PNG files (default: the current folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..io.atomic import check_writable
    from ..io.gguf import is_gguf
    from ..io.loading import read_json
    from ..io.save import REPORT_FILE, ModelNotFound, load_report, read_config

    folder = Path(args.dir)
    if not (folder / "config.json").is_file():
        if folder.is_file() and is_gguf(folder):
            raise ModelNotFound(f"{args.dir} is a GGUF file, a dense model: carve it first (moecarve carve {args.dir} --out DIR)")
        raise ModelNotFound(f"{args.dir} is not a model folder (no config.json)")
    own = read_json(folder / "config.json", "the model's config")  # a damaged file: one line naming it
    if (folder / REPORT_FILE).is_file():
        read_json(folder / REPORT_FILE, "the carve report")
    if args.plot:
        check_writable(args.plot_dir)  # before any work: an unwritable or file --plot-dir fails now
    config = read_config(args.dir)
    meta = config.moecarve
    entries = meta["modules"].values()
    kinds = Counter(e.get("type", "moe") for e in entries)
    routers = Counter(router_label(e) for e in entries)
    rows = [["model_type", f"{own.get('model_type')} ({', '.join(own.get('architectures') or ['-'])}), "
                           f"from {config.model_type} ({meta.get('base_class')})"],
            ["provenance", provenance_line(meta.get("provenance") or {})],
            ["carve settings", ", ".join(carve_settings(meta["carve"])) if meta.get("carve") else "-"],
            ["modules", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))],
            ["router", ", ".join(f"{k} ({n} layers)" for k, n in sorted(routers.items()))]]  # fmt: skip
    report = load_report(args.dir)
    if report is not None:
        rows += [
            ["config", f"{report.config.name} ({report.config.method})"],
            ["parameters total / active", f"{fmt_params(report.params_total)} / {fmt_params(report.params_active)}"],
            ["calibration", f"{report.n_windows} x {report.seqlen} tokens"],
            ["carve time", f"{report.seconds:.1f} s"],
            ["router load max/mean (worst layer)", "-" if report.config.static else f"{report.load_imbalance:.2f}"],
        ]
    console.print(table(f"moecarve folder {args.dir}", ["", ""], rows))
    if report is not None and report.layers:
        stat = report.layers[0].statistic
        lrows = [[r.layer, r.expert_size, f"{r.shared_rate:.4f}", routed(r, f"{r.routed_rate:.4f}"), " ".join(map(str, r.load)) or "-"]
                 for r in report.layers]  # fmt: skip
        console.print(table("layers", ["layer", "m", f"shared {stat}", f"routed {stat}", "calibration load per routed expert"], lrows))
    if args.plot:
        write_plots(args.dir, report, args.plot_dir)
    return 0


def router_label(entry: dict) -> str:
    """What routes a carved module, from its config entry: "shadow 4-bit", "fitted probe",
    "analytic", "linear", or "none" (a dense module: static pruning or a condensed layer)."""
    if entry.get("type", "moe") != "moe":
        return "none"
    kind = entry.get("router", "analytic")
    return {"shadow": f"shadow {entry.get('shadow_bits')}-bit", "fitted": "fitted probe"}.get(kind, kind)


def carve_settings(carve: dict) -> list[str]:
    """The configuration's name, then only the carve settings its method reads ("key=value"):
    cmoe's k_act, router and k-means; fitted's profile grouping, shadow bits with their selection,
    score weights, bias and tail, or probes, refit; the routing ones only where experts are routed (A > 0)."""
    method = carve.get("method", "cmoe")
    routed_layers = carve.get("n_active", 1) > 0
    if method == "cmoe":
        keys = ["k_act", *(["router", "kmeans_iters", "bias_gamma"] if routed_layers else [])]
    else:
        router = ["selection", "score_weight", "shadow_bias", "tail"] if carve.get("shadow_bits") else ["probes_per_expert"]
        keys = [*(["profile_iters", "shadow_bits", *router, "bias_gamma"] if routed_layers else []), "refit", "holdout"]
    name = f"S{carve.get('n_shared')}A{carve.get('n_active')}E{carve.get('n_experts')}"
    return [name, f"method={method}", *(f"{k}={carve[k]}" for k in [*keys, "seed"] if k in carve)]


def provenance_line(prov: dict) -> str:
    """Where the folder's model comes from and which versions wrote it, on one line."""
    source = prov.get("source") or "not recorded"
    revision = f" (revision {prov['revision']})" if prov.get("revision") else ""
    written = ", ".join(f"{n} {prov[n]}" for n in ("moecarve", "torch", "transformers") if prov.get(n))
    return f"{source}{revision}" + (f"; written by {written}" if written else "")


def write_plots(folder: str, report, plot_dir: str) -> list[Path]:
    """<name>-rates.png (the statistic's histograms, CMoE Fig. 3) and <name>-load.png in plot_dir."""
    from ..errors import MoecarveError
    from ..eval.plots import plot_expert_load, plot_rate_histograms

    if report is None:
        raise MoecarveError(f"{folder} has no carve report (carve_report.json): nothing to plot")
    name = Path(folder).resolve().name
    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    paths = [plot_rate_histograms(report, Path(plot_dir) / f"{name}-rates.png"),
             plot_expert_load(report, Path(plot_dir) / f"{name}-load.png")]  # fmt: skip
    console.print("wrote " + ", ".join(map(str, paths)))
    return paths
