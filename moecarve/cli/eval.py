"""`moecarve eval MODEL_OR_DIR --ppl wikitext2|c4|PATH [--tasks ...]`: perplexity and harness tasks."""

from __future__ import annotations

import json
from pathlib import Path

from .common import (
    add_command, add_model_args, add_ppl_args, add_seed_arg, alias, at_least, check_load_args, console, load_kwargs, table,
)  # fmt: skip


def register(sub) -> None:
    p = add_command(
        sub, "eval",
        help="perplexity (GPTQ protocol) and lm-evaluation-harness tasks",
        description="Evaluate a dense model or a carved folder. Perplexity follows the GPTQ / SparseGPT / Wanda "
        "protocol: the test documents joined with a blank line, tokenized once, cut into non-overlapping "
        "windows of --ppl-seqlen tokens, exp of the mean NLL over every predicted token. wikitext2 and c4 are "
        "read from the local datasets cache only (never downloaded). Tasks run through lm_eval on the in-memory model.",
    )  # fmt: skip
    p.add_argument("model", help="a local model folder (dense or carved), a GGUF file or a hub id")
    add_ppl_args(p, chars=None, seqlen=2048, what="perplexity text: wikitext2, c4, a .txt file or a save_to_disk folder")
    alias(p, "--seqlen", dest="ppl_seqlen", type=at_least(2))
    p.add_argument("--batch-size", type=at_least(1), default=4, help="windows / harness requests per forward pass")
    p.add_argument("--layerwise", action="store_true", help="perplexity with weights moved to the device one decoder "
                   "layer at a time (needs moecarve.eval.streaming)")  # fmt: skip
    add_task_args(p)
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE",
                   help="also write the results as JSON (an existing FILE is replaced only if it is an earlier "
                   "result of moecarve eval)")  # fmt: skip
    add_kernels_arg(p)
    add_seed_arg(p)
    add_model_args(p)
    p.set_defaults(func=run)


def add_task_args(p) -> None:
    """lm-evaluation-harness options (eval and compare)."""
    p.add_argument("--tasks", default=None, help="comma-separated lm_eval tasks, e.g. piqa,arc_easy,hellaswag")
    p.add_argument("--fewshot", type=at_least(0), default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=at_least(1), default=None, help="examples per task, for quick runs (default: all)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="a folder of extra lm_eval task YAMLs")


def add_kernels_arg(p) -> None:
    """--kernels: how a carved model's MoE layers run (eval and compare)."""
    p.add_argument("--kernels", default="none",
                   help="carved folders: run the MoE layers through moecarve's fast paths, same results to float "
                   "rounding: none, auto (CPU path on CPU, Triton on CUDA), cpu, triton (CUDA only), torch")  # fmt: skip


def task_config(args):
    """The harness settings of add_task_args' options (validated), or None without --tasks."""
    from ..eval.tasks import TaskConfig

    if args.tasks is None:
        return None
    return TaskConfig.parse(args.tasks, num_fewshot=args.fewshot, limit=args.limit, batch_size=args.batch_size,
                            include_path=args.include_path, seed=args.seed)  # fmt: skip


def check_json_out(path: str) -> None:
    """--json FILE: a writable location, and an existing file only if it is an earlier eval result."""
    from ..io.atomic import UnsafeOutput, check_writable

    path = Path(path)
    if path.is_dir():
        raise UnsafeOutput(f"--json {path} is a folder; name a file, e.g. {path / 'eval.json'}")
    if path.exists():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and "model" in earlier):
            raise UnsafeOutput(f"refusing to replace {path}: it is not an earlier result of moecarve eval; "
                               "choose another --json file")  # fmt: skip
    check_writable(path.absolute().parent, path)


def run(args) -> int:
    import importlib.util

    from ..errors import MoecarveError, UsageError
    from ..eval.data import load_eval_text
    from ..eval.perplexity import eval_perplexity
    from ..eval.tasks import run_tasks, task_report
    from ..io.loading import check_kernels, check_model, load_any, resolve_device, resolve_dtype

    if args.ppl is None and args.tasks is None:
        raise UsageError("nothing to evaluate: pass --ppl and/or --tasks")
    if args.layerwise and args.ppl is None:
        raise UsageError("--layerwise evaluates perplexity: pass --ppl too")
    task_cfg = task_config(args)  # validated before loading the model
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    check_kernels(args.kernels, device)
    if args.json_out:
        check_json_out(args.json_out)
    ref = check_model(args.model, args.revision)
    check_load_args(args, [ref])
    if args.kernels != "none" and not ref.carved:
        raise UsageError(f"--kernels runs a carved folder's MoE layers; {args.model!r} is a dense model (drop --kernels)")
    layerwise = None
    if args.layerwise:
        if importlib.util.find_spec("moecarve.eval.streaming") is None:
            raise MoecarveError("--layerwise needs moecarve.eval.streaming, which this installation lacks")
        if ref.path is None:
            raise UsageError(f"--layerwise reads a local folder; {args.model!r} is a hub id: download it first")
        layerwise = importlib.import_module("moecarve.eval.streaming").layerwise_perplexity
    text = load_eval_text(args.ppl) if args.ppl is not None else None  # fails before any model loads
    out: dict = {"model": args.model}
    rows = []
    if layerwise is not None:
        ppl = _layerwise(args, ref, layerwise, text)
        out["perplexity"] = ppl.to_dict()
        rows.append([f"perplexity ({ppl.source}, seq {ppl.seqlen}, {ppl.n_windows} windows, layer-wise)", f"{ppl.perplexity:.4f}"])
    if (args.ppl is not None and layerwise is None) or task_cfg is not None:
        model, tok = load_any(ref, args.dtype, args.device, kernels=args.kernels, **load_kwargs(args))
        if args.ppl is not None and layerwise is None:
            console.print("perplexity")
            ppl = eval_perplexity(model, tok, args.ppl, args.ppl_seqlen, args.ppl_chars, args.batch_size, progress=True, text=text)
            out["perplexity"] = ppl.to_dict()
            rows.append([f"perplexity ({ppl.source}, seq {ppl.seqlen}, {ppl.n_windows} windows)", f"{ppl.perplexity:.4f}"])
        if task_cfg is not None:
            results = run_tasks(model, tok, task_cfg)
            out["tasks"] = task_report(results, task_cfg)
            rows += task_rows(results)
    console.print(table(f"eval {args.model}", ["", "value"], rows))
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(path)
        console.print(f"wrote {path}")
    return 0


def task_rows(results) -> list[list[str]]:
    """Table rows of harness results: "acc ± stderr" per task, acc_norm beside it where reported."""

    def cell(r, metric: str) -> str:
        err = r.stderr.get(metric)
        return f"{r.metrics[metric]:.4f}" + ("" if err is None else f" ± {err:.4f}")

    return [[f"{t} acc" + (" / acc_norm" if "acc_norm" in r.metrics else ""),
             " / ".join(cell(r, m) for m in ("acc", "acc_norm") if m in r.metrics) or "-"]
            for t, r in results.items()]  # fmt: skip


def _layerwise(args, ref, layerwise_perplexity, text: str):
    """Perplexity through the streaming evaluator: only the tokenizer and config are loaded here
    (both readable from a carved folder without its remote code)."""
    from ..adapters import clip_seqlen
    from ..eval.perplexity import PerplexityResult, eval_windows
    from ..io.loading import resolve_device
    from ..io.save import load_tokenizer, model_config

    tok = load_tokenizer(ref.path)
    seqlen = clip_seqlen(model_config(ref.path), args.ppl_seqlen)
    windows = eval_windows(tok, args.ppl, seqlen, args.ppl_chars, text)
    console.print("perplexity, layer by layer")
    ppl = float(layerwise_perplexity(args.model, windows, resolve_device(args.device), progress=True))
    return PerplexityResult(args.ppl, seqlen, windows.shape[0], windows.shape[0] * (seqlen - 1), ppl)
