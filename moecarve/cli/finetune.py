"""`moecarve finetune DIR --data TEXT --out OUT`: LoRA recovery fine-tune, merged, saved."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import adapters
from ..calibration import read_text, tokenize_windows
from ..eval.perplexity import perplexity, test_windows
from ..finetune import FinetuneConfig, finetune
from ..finetune.balance import LoadTracker, summarize
from ..io.atomic import atomic_dir, check_output
from ..io.loading import is_carved, load_any
from ..io.save import load_report, save
from .common import add_model_args, console, table

REPORT_FILE = "finetune_report.json"


def register(sub) -> None:
    p = sub.add_parser(
        "finetune",
        help="recover quality with a short LoRA fine-tune (merged into the weights on save)",
        description="Fine-tune a carved (or dense) model with LoRA on the attention projections and the "
        "stacked expert weights, the routers' scale s with its own learning rate, and the load-balancing "
        "bias updated by +-gamma from each batch's expert counts (CMoE). Base weights stay frozen; the "
        "adapters are merged on save, so OUT is an ordinary carved folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="a carved folder (or a dense model folder)")
    p.add_argument("--data", required=True, metavar="TEXT_OR_DATASET", help="training text file or local datasets folder")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--samples", type=int, default=2048, help="training windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (clipped to the model's max positions)")
    p.add_argument("--heldout", type=int, default=16, help="extra windows of --data held out for perplexity/load before and after")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4, help="LoRA learning rate")
    p.add_argument("--router-lr", type=float, default=1e-3, help="learning rate of the routers' scale s")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-dropout", type=float, default=0.1)
    p.add_argument("--bias-gamma", type=float, default=None, help="load-balancing bias step (default: the carve's bias_gamma)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=100, help="save a resumable checkpoint every N steps (0: only at the end)")
    p.add_argument("--checkpoint-dir", default=None, help="checkpoint folder (default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all (resume later)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", dest="eval_text", default=None, metavar="TEXT", help="also report perplexity before/after on this text file")
    p.add_argument("--eval-chars", type=int, default=200_000, help="characters of --eval text to use")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length for --eval")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, router_lr=args.router_lr, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias_gamma=args.bias_gamma,
        gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
        max_steps=args.max_steps, seed=args.seed,
    )  # fmt: skip  (validated before loading anything)
    check_output(args.out, args.overwrite)
    ckpt_dir = Path(args.checkpoint_dir or f"{str(args.out).rstrip('/')}.ckpt")
    text = read_text(args.data)
    eval_text = read_text(args.eval_text) if args.eval_text else None
    torch.manual_seed(args.seed)
    model, tok = load_any(args.model, args.dtype, args.device)
    seqlen = adapters.clip_seqlen(model.config, args.seqlen)
    all_windows = tokenize_windows(tok, text, args.samples + args.heldout, seqlen, args.seed)
    held, train = all_windows[: args.heldout], all_windows[args.heldout :]
    ev = None
    if eval_text is not None:
        ev = test_windows(tok, eval_text, adapters.clip_seqlen(model.config, args.eval_seqlen), args.eval_chars)
        with console.status("perplexity on --eval before fine-tuning"):
            ev_before = eval_text_metrics(model, ev, args.batch_size)
    console.print(f"fine-tuning [bold]{args.model}[/] on {train.shape[0]}x{train.shape[1]} tokens, {cfg.epochs} epoch(s)")
    report = finetune(model, cfg, train, eval_windows=held if args.heldout else None, checkpoint_dir=ckpt_dir, resume=args.resume)
    rows = [["steps", f"{report.steps} (resumed at {report.start_step})" if report.start_step else report.steps],
            ["trainable parameters", f"{report.trainable_params:,}"], ["time", f"{report.seconds:.1f} s"]]  # fmt: skip
    carved = is_carved(args.model)  # a dense model has no expert load to show
    if args.heldout:
        rows += [["held-out perplexity before / after", f"{report.ppl_before:.3f} / {report.ppl_after:.3f}"]]
        if carved:
            rows += [["held-out load max/mean worst layer before / after", f"{report.load_before[0]:.2f} / {report.load_after[0]:.2f}"],
                     ["held-out load max/mean layer mean before / after", f"{report.load_before[1]:.2f} / {report.load_after[1]:.2f}"]]  # fmt: skip
    summary = report.to_dict()
    if ev is not None:
        with console.status("perplexity on --eval after fine-tuning"):
            ev_after = eval_text_metrics(model, ev, args.batch_size)
        summary["eval"] = {"text": args.eval_text, "chars": args.eval_chars, "seqlen": ev.shape[1], "before": ev_before, "after": ev_after}
        name = Path(args.eval_text).name
        rows += [[f"{name} perplexity before / after", f"{ev_before['ppl']:.3f} / {ev_after['ppl']:.3f}"]]
        if carved:
            rows += [[f"{name} load worst layer before / after", f"{ev_before['load_worst']:.2f} / {ev_after['load_worst']:.2f}"]]
    extra = {REPORT_FILE: json.dumps(summary, indent=2)}
    if carved:
        save(model, args.out, tokenizer=tok, report=load_report(args.model), overwrite=args.overwrite, extra_files=extra)
    else:  # a dense model: an ordinary Hugging Face folder
        with atomic_dir(args.out, args.overwrite) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for name, body in extra.items():
                (tmp / name).write_text(body)
    console.print(table("finetune summary", ["", "value"], rows))
    console.print(f"saved to [bold]{args.out}[/] (checkpoints in {ckpt_dir})")
    return 0


def eval_text_metrics(model, windows: torch.Tensor, batch_size: int) -> dict:
    """Perplexity and expert load (max/mean: worst layer, layer mean) on windows [n, L]."""
    tracker = LoadTracker(model)
    try:
        ppl = perplexity(model, windows, batch_size=batch_size)
        worst, mean = summarize(tracker.imbalance())
    finally:
        tracker.remove()
    return {"ppl": ppl, "load_worst": worst, "load_mean": mean}
