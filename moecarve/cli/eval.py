"""`moecarve eval MODEL_OR_DIR --ppl wikitext2|c4|PATH [--tasks ...]`: perplexity and harness tasks."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from ..errors import MoecarveError
from ..eval.data import load_eval_text
from ..eval.perplexity import PerplexityResult, eval_perplexity, eval_windows
from ..eval.tasks import STANDARD_TASKS, TaskConfig, run_tasks
from ..io.loading import load_any, resolve_device
from ..modules.fast import BACKENDS
from .common import add_model_args, console, table


class LayerwiseUnavailable(MoecarveError, RuntimeError):
    """--layerwise asked for, but moecarve.eval.streaming is not installed."""


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity (GPTQ protocol) and lm-evaluation-harness tasks",
        description="Evaluate a dense model or a carved folder. Perplexity follows the GPTQ / SparseGPT / Wanda "
        "protocol: the test documents joined with a blank line, tokenized once, cut into non-overlapping "
        "windows of --seqlen tokens, exp of the mean NLL over every predicted token. wikitext2 and c4 are read "
        "from the local datasets cache only (never downloaded). Tasks run through lm_eval on the in-memory model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="a local model folder (dense or carved) or a hub id")
    p.add_argument("--ppl", default=None, metavar="SET", help="wikitext2, c4, a .txt file or a save_to_disk folder")
    p.add_argument("--seqlen", type=int, default=2048, help="perplexity window (clipped to the model's max positions)")
    p.add_argument("--max-chars", type=int, default=None, help="use only the first N characters of the test text")
    p.add_argument("--batch-size", type=int, default=4, help="windows / harness requests per forward pass")
    p.add_argument("--layerwise", action="store_true", help="perplexity with weights moved to the device one decoder "
                   "layer at a time (needs moecarve.eval.streaming)")  # fmt: skip
    p.add_argument("--tasks", default=None, help=f"comma-separated lm_eval tasks, e.g. {','.join(STANDARD_TASKS)}")
    p.add_argument("--fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    p.add_argument("--limit", type=int, default=None, help="examples per task (quick runs)")
    p.add_argument("--include-path", default=None, help="a folder of extra lm_eval task YAMLs")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--kernels", default="none", choices=("none", *BACKENDS),
                   help="carved folders: run the MoE layers through moecarve's fast paths (same results to "
                   "float rounding; auto = CPU path on CPU, Triton on CUDA)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.ppl is None and args.tasks is None:
        raise MoecarveError("nothing to evaluate: pass --ppl and/or --tasks")
    if args.layerwise and args.ppl is None:
        raise MoecarveError("--layerwise evaluates perplexity: pass --ppl too")
    task_cfg = None
    if args.tasks is not None:  # validate before loading the model
        task_cfg = TaskConfig.parse(args.tasks, num_fewshot=args.fewshot, limit=args.limit,
                                    batch_size=args.batch_size, include_path=args.include_path, seed=args.seed)  # fmt: skip
    layerwise = None
    if args.layerwise:
        if importlib.util.find_spec("moecarve.eval.streaming") is None:
            raise LayerwiseUnavailable("--layerwise needs moecarve.eval.streaming, which this installation lacks")
        layerwise = importlib.import_module("moecarve.eval.streaming").layerwise_perplexity
    text = load_eval_text(args.ppl) if args.ppl is not None else None  # fails before any model loads
    out: dict = {"model": args.model}
    rows = []
    if layerwise is not None:
        ppl = _layerwise(args, layerwise, text)
        out["perplexity"] = ppl.to_dict()
        label = f"perplexity ({ppl.source}, seq {ppl.seqlen}, {ppl.n_windows} windows, layer-wise)"
        rows.append([label, f"{ppl.perplexity:.4f}"])
    if (args.ppl is not None and layerwise is None) or task_cfg is not None:
        model, tok = load_any(args.model, args.dtype, args.device, kernels=args.kernels)
        if args.ppl is not None and layerwise is None:
            with console.status("perplexity"):
                ppl = eval_perplexity(model, tok, args.ppl, args.seqlen, args.max_chars, args.batch_size, text=text)
            out["perplexity"] = ppl.to_dict()
            label = f"perplexity ({ppl.source}, seq {ppl.seqlen}, {ppl.n_windows} windows)"
            rows.append([label, f"{ppl.perplexity:.4f}"])
        if task_cfg is not None:
            results = run_tasks(model, tok, task_cfg)
            out["tasks"] = {t: r.metrics for t, r in results.items()}
            rows += [[f"{t} acc" + (f" / acc_norm" if "acc_norm" in r.metrics else ""),
                      f"{r.accuracy:.4f}" + (f" / {r.metrics['acc_norm']:.4f}" if "acc_norm" in r.metrics else "")]
                     for t, r in results.items()]  # fmt: skip
    console.print(table(f"eval {args.model}", ["", "value"], rows))
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        tmp.replace(path)
        console.print(f"wrote {path}")
    return 0


def _layerwise(args, layerwise_perplexity, text: str) -> PerplexityResult:
    """Perplexity through the streaming evaluator: only the tokenizer and config are loaded here."""
    from transformers import AutoConfig, AutoTokenizer

    from .. import adapters

    tok = AutoTokenizer.from_pretrained(args.model)
    seqlen = adapters.clip_seqlen(AutoConfig.from_pretrained(args.model), args.seqlen)
    windows = eval_windows(tok, args.ppl, seqlen, args.max_chars, text)
    with console.status("layer-wise perplexity"):
        ppl = float(layerwise_perplexity(args.model, windows, resolve_device(args.device)))
    return PerplexityResult(args.ppl, seqlen, windows.shape[0], windows.shape[0] * (seqlen - 1), ppl)
