"""`moecarve compare DENSE CARVED [CARVED ...] --out DIR`: one side-by-side table; DIR gets
compare.json and compare.png."""

from __future__ import annotations

from .common import (
    add_command, add_model_args, add_ppl_args, add_seed_arg, alias, at_least, bold, check_load_args, console, fmt_params,
    load_kwargs, table,
)  # fmt: skip
from .eval import add_kernels_arg, add_task_args, task_config

JSON_FILE = "compare.json"
PLOT_FILE = "compare.png"


def register(sub) -> None:
    p = add_command(
        sub, "compare",
        help="side-by-side table of a dense model and carved versions",
        description="Evaluate a dense model and one or more carved folders one after the other and print one "
        "table: perplexity, change vs the first model, task accuracies, total and active parameters per token, "
        "carve time (from carve_report.json) and tokens/s of a short greedy generation. Every model is checked "
        f"before the first is measured. --out gets the table as {JSON_FILE} and a quality-vs-active-parameters "
        f"plot as {PLOT_FILE}.",
    )  # fmt: skip
    p.add_argument("models", nargs="+", metavar="MODEL", help="the dense model (a folder, a GGUF file or a hub id) first, then carved folders")
    add_ppl_args(p, chars=None, seqlen=2048, what="perplexity text: wikitext2, c4, a .txt file or a save_to_disk folder")
    alias(p, "--seqlen", dest="ppl_seqlen", type=at_least(2))
    p.add_argument("--batch-size", type=at_least(1), default=4, help="windows / harness requests per forward pass")
    add_task_args(p)
    p.add_argument("--gen-tokens", type=at_least(0), default=32, help="tokens generated for tokens/s (0: skip)")
    p.add_argument("--out", default="compare", metavar="DIR", help=f"output folder for {JSON_FILE} and {PLOT_FILE} (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a folder moecarve wrote (or an empty one)")
    add_kernels_arg(p)
    add_seed_arg(p)
    add_model_args(p)
    p.set_defaults(func=run)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(rows, title: str = "compare"):
    """The rich table of compare rows."""
    task_names = list(dict.fromkeys(t for r in rows for t in r.tasks))
    cols = ["model", "config", "method", "perplexity", "Δ% vs dense", *task_names, "params total", "active / token", "carve s",
            "tokens/s"]  # fmt: skip
    body = [
        [r.name, r.config, r.method, _fmt(r.perplexity, ".3f"), "-" if r.delta_pct is None else f"{r.delta_pct:+.1f}%",
         *[_fmt(r.tasks.get(t), ".4f") for t in task_names], fmt_params(r.params_total),
         f"{fmt_params(r.params_active)} ({r.params_active / r.params_total:.0%})", _fmt(r.carve_seconds, ".1f"),
         _fmt(r.tokens_per_s, ".1f")]
        for r in rows
    ]  # fmt: skip
    return table(title, cols, body)


def run(args) -> int:
    from ..eval.compare import CompareConfig, CompareError, compare, describe, write_json
    from ..eval.plots import plot_quality
    from ..io.atomic import atomic_dir, check_output
    from ..io.loading import check_kernels, check_model, resolve_device, resolve_dtype

    if len(args.models) < 2:
        raise CompareError("compare needs a dense model and at least one carved model")
    cfg = CompareConfig(ppl=args.ppl, seqlen=args.ppl_seqlen, max_chars=args.ppl_chars, batch_size=args.batch_size,
                        tasks=task_config(args), gen_tokens=args.gen_tokens, dtype=args.dtype, device=args.device,
                        kernels=args.kernels, **load_kwargs(args))  # fmt: skip
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    check_kernels(args.kernels, device)
    refs = [check_model(m, args.revision) for m in args.models]  # every model, before the first is measured
    check_load_args(args, refs)
    check_output(args.out, args.overwrite, inputs=[*(r.path for r in refs), args.ppl])

    def on_row(row) -> None:  # long runs: each model's numbers reach the log as soon as they exist
        ppl = "" if row.perplexity is None else f": perplexity {row.perplexity:.3f}"
        console.print(f"measured {bold(row.name)}{ppl}")

    rows = compare(args.models, cfg, on_row=on_row)
    src = describe(cfg, rows)  # the windows the rows really used, not only the one asked for
    console.print(render(rows, f"compare ({src})" if src else "compare"))
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_json(rows, cfg, tmp / JSON_FILE)
        plot_quality([vars(r) for r in rows], tmp / PLOT_FILE,
                     title=f"quality vs active parameters ({src})" if src else "quality vs active parameters")  # fmt: skip
    console.print(f"wrote {bold(args.out)}: {JSON_FILE}, {PLOT_FILE}")
    return 0
