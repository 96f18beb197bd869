"""`moecarve compare DENSE CARVED [CARVED ...]`: one side-by-side table, plus JSON and a PNG plot."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..eval.compare import CompareConfig, CompareRow, compare, write_json
from ..eval.tasks import TaskConfig
from .common import add_model_args, console, fmt_params, table


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="side-by-side table of a dense model and carved versions",
        description="Evaluate a dense model and one or more carved folders one after the other and print one "
        "table: perplexity, change vs the first model, task accuracies, total and active parameters per token, "
        "carve time (from carve_report.json) and tokens/s of a short greedy generation. Also writes the table "
        "as JSON and a quality-vs-active-parameters plot as PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="the dense model first, then carved folders")
    p.add_argument("--ppl", default=None, metavar="SET", help="wikitext2, c4, a .txt file or a save_to_disk folder")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window (clipped to max positions)")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of the test text")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tasks", default=None, help="comma-separated lm_eval tasks")
    p.add_argument("--fewshot", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="examples per task")
    p.add_argument("--include-path", default=None, help="a folder of extra lm_eval task YAMLs")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens generated for tokens/s (0: skip)")
    p.add_argument("--out", default="compare", help="output stem: writes STEM.json and STEM.png")
    p.add_argument("--seed", type=int, default=0)
    add_model_args(p)
    p.set_defaults(func=run)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(rows: list[CompareRow], title: str = "compare"):
    """The rich table of compare rows."""
    task_names = list(dict.fromkeys(t for r in rows for t in r.tasks))
    cols = ["model", "config", "perplexity", "Δ% vs dense", *task_names, "params total", "active / token", "carve s", "tokens/s"]
    body = [
        [r.name, r.config, _fmt(r.perplexity, ".3f"), "-" if r.delta_pct is None else f"{r.delta_pct:+.1f}%",
         *[_fmt(r.tasks.get(t), ".4f") for t in task_names], fmt_params(r.params_total),
         f"{fmt_params(r.params_active)} ({r.params_active / r.params_total:.0%})", _fmt(r.carve_seconds, ".1f"),
         _fmt(r.tokens_per_s, ".1f")]
        for r in rows
    ]  # fmt: skip
    return table(title, cols, body)


def run(args) -> int:
    from ..eval.plots import plot_quality

    task_cfg = None
    if args.tasks is not None:
        task_cfg = TaskConfig.parse(args.tasks, num_fewshot=args.fewshot, limit=args.limit,
                                    batch_size=args.batch_size, include_path=args.include_path, seed=args.seed)  # fmt: skip
    cfg = CompareConfig(ppl=args.ppl, seqlen=args.seqlen, max_chars=args.max_chars, batch_size=args.batch_size,
                        tasks=task_cfg, gen_tokens=args.gen_tokens, dtype=args.dtype, device=args.device)  # fmt: skip
    stem = Path(args.out)
    json_path = stem.with_name(stem.name + ".json")
    done: list[CompareRow] = []

    def on_row(row: CompareRow) -> None:  # keep what is measured so far: long runs can be cut short
        done.append(row)
        write_json(done, cfg, json_path)
        console.print(f"measured [bold]{row.name}[/]")

    rows = compare(args.models, cfg, on_row=on_row)
    src = f"{args.ppl}, seq {args.seqlen}" + (f", first {args.max_chars:,} chars" if args.max_chars else "") if args.ppl else ""
    console.print(render(rows, f"compare ({src})" if src else "compare"))
    png_path = plot_quality([vars(r) for r in rows], stem.with_name(stem.name + ".png"),
                            title=f"quality vs active parameters ({src})" if src else "quality vs active parameters")  # fmt: skip
    console.print(f"wrote {json_path} and {png_path}")
    return 0
