"""`moecarve finetune DIR --calib TEXT --out OUT`: LoRA recovery fine-tune, merged, saved."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .common import (
    add_calib_args, add_command, add_model_args, add_output_args, add_ppl_args, add_seed_arg, alias, at_least, bold,
    card_info, check_load_args, console, in_range, load_kwargs, positive, table,
)  # fmt: skip

REPORT_FILE = "finetune_report.json"
DIVERGED = 2.0  # held-out perplexity rising by more than this factor: warn that the fine-tune diverged


def register(sub) -> None:
    p = add_command(
        sub, "finetune",
        help="recover quality with a short LoRA fine-tune (merged into the weights on save)",
        description="Fine-tune a carved (or dense) model with LoRA on the attention projections and the "
        "stacked expert weights, the routers' scale s with its own learning rate, and the load-balancing "
        "bias updated by +-gamma from each batch's expert counts (CMoE). Base weights stay frozen; the "
        "adapters are merged on save, so OUT is an ordinary carved folder.",
    )  # fmt: skip
    p.add_argument("model", help="a carved folder (or a dense model folder or GGUF file)")
    add_output_args(p)
    add_calib_args(p, samples=2048, seqlen=2048, what="training", required=True)
    alias(p, "--data", dest="calib")
    p.add_argument("--heldout", type=at_least(0), default=16,
                   help="extra windows of --calib held out for perplexity / expert load before and after")  # fmt: skip
    p.add_argument("--epochs", type=at_least(1), default=1, help="passes over the training windows")
    p.add_argument("--batch-size", type=at_least(1), default=4, help="training windows per step")
    p.add_argument("--lr", type=positive(), default=2e-4, help="LoRA learning rate")
    p.add_argument("--router-lr", type=at_least(0.0, float), default=1e-3, help="learning rate of the routers' scale s")
    p.add_argument("--lora-r", type=at_least(1), default=8, help="LoRA rank")
    p.add_argument("--lora-alpha", type=positive(), default=32.0, help="LoRA scaling numerator (scale = alpha / r)")
    p.add_argument("--lora-dropout", type=in_range(0.0, 1.0, hi_open=True), default=0.1, help="dropout on the LoRA input")
    p.add_argument("--bias-gamma", type=at_least(0.0, float), default=None,
                   help="load-balancing bias step (default: 0 where every carved layer routes by the shadow "
                   "router, whose scores are what the experts add; else the carve's bias_gamma)")  # fmt: skip
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    p.add_argument("--checkpoint-every", type=at_least(0), default=100,
                   help="save a resumable checkpoint every N steps (0: only at the end)")  # fmt: skip
    p.add_argument("--checkpoint-dir", default=None, metavar="DIR", help="checkpoint folder (default: OUT.ckpt)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--max-steps", type=at_least(1), default=None, help="stop after this many steps in all (resume later)")
    p.add_argument("--max-minutes", type=float, default=None, metavar="M",
                   help="stop training after M minutes of wall time (then evaluate and save; resume later)")
    p.add_argument("--no-merge", action="store_true",
                   help="save the LoRA adapter alone (PEFT format) to OUT instead of the merged model; apply it with "
                   "moecarve.finetune.load_adapter(MODEL, OUT)")  # fmt: skip
    add_seed_arg(p)
    add_ppl_args(p, chars=200_000, seqlen=512, what="also report perplexity before / after on this text "
                 "(a .txt file, a save_to_disk folder, wikitext2 or c4)")  # fmt: skip
    add_model_args(p)
    p.set_defaults(func=run)


def check_checkpoints(args, ckpt_dir: Path, inputs: list) -> None:
    """An earlier run's checkpoint is continued (--resume), discarded on request (--overwrite), or
    refused; with --resume it is checked (state readable, tensors complete) before any work."""
    from ..errors import UsageError
    from ..finetune.checkpoint import latest
    from ..io.atomic import check_not_protected, check_writable
    from ..io.loading import read_json
    from ..stream.shards import read_header

    check_not_protected(ckpt_dir, inputs)
    check_writable(ckpt_dir)
    found = latest(ckpt_dir)
    if args.resume:
        if found is None:
            raise UsageError(f"--resume: {ckpt_dir} holds no checkpoint to continue from; drop --resume to start a new fine-tune")
        read_json(found / "state.json", "the checkpoint's state")
        read_header(found / "state.safetensors")  # truncated: "X is truncated"
    elif found is not None and not args.overwrite:
        raise UsageError(f"{ckpt_dir} holds a checkpoint of an earlier fine-tune ({found.name}): pass --resume to "
                         "continue it, or --overwrite to start over and discard it")  # fmt: skip


def run(args) -> int:
    import shutil

    import torch

    from ..adapters import clip_seqlen
    from ..calibration import read_text, tokenize_windows
    from ..errors import UsageError
    from ..eval.data import load_eval_text
    from ..eval.perplexity import eval_windows
    from ..finetune import FinetuneConfig, finetune
    from ..finetune.adapter import save_adapter
    from ..finetune.checkpoint import latest
    from ..io.atomic import atomic_dir, check_output
    from ..io.loading import check_model, load_any, resolve_device, resolve_dtype
    from ..io.save import load_report, ordinary_permissions, save

    if args.calib is None:
        raise UsageError("finetune needs --calib TEXT: the training text (a text file or a local datasets folder)")
    cfg = FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, router_lr=args.router_lr, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias_gamma=args.bias_gamma,
        gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
        max_steps=args.max_steps, max_minutes=args.max_minutes, seed=args.seed,
    )  # fmt: skip  (validated before loading anything)
    resolve_dtype(args.dtype, resolve_device(args.device))
    ref = check_model(args.model, args.revision)
    check_load_args(args, [ref])
    inputs = [ref.path, args.calib, args.ppl]
    check_output(args.out, args.overwrite, inputs)
    ckpt_dir = Path(args.checkpoint_dir or f"{str(args.out).rstrip('/')}.ckpt")
    check_checkpoints(args, ckpt_dir, inputs)
    text = read_text(args.calib)
    ppl_text = load_eval_text(args.ppl) if args.ppl else None
    if not args.resume and latest(ckpt_dir) is not None:  # --overwrite: the earlier run's checkpoints go
        for step in ckpt_dir.glob("step-*"):
            shutil.rmtree(step)
    torch.manual_seed(args.seed)
    model, tok = load_any(ref, args.dtype, args.device, **load_kwargs(args))
    seqlen = clip_seqlen(model.config, args.seqlen)
    all_windows = tokenize_windows(tok, text, args.samples + args.heldout, seqlen, args.seed)
    held, train = all_windows[: args.heldout], all_windows[args.heldout :]
    ev = None
    if ppl_text is not None:
        ev = eval_windows(tok, args.ppl, clip_seqlen(model.config, args.ppl_seqlen), args.ppl_chars, ppl_text)
        console.print("perplexity on --ppl before fine-tuning")
        ev_before = eval_text_metrics(model, ev, args.batch_size)
    console.print(f"fine-tuning {bold(args.model)} on {train.shape[0]}x{train.shape[1]} tokens, {cfg.epochs} epoch(s)")
    report = finetune(model, cfg, train, eval_windows=held if args.heldout else None, checkpoint_dir=ckpt_dir,
                      resume=args.resume, merge=not args.no_merge)  # fmt: skip
    warn_if_diverged(report, args.lr)
    rows = [["steps", f"{report.steps} (resumed at {report.start_step})" if report.start_step else report.steps],
            ["trainable parameters", f"{report.trainable_params:,}"], ["time", f"{report.seconds:.1f} s"]]  # fmt: skip
    carved = ref.carved  # a dense model has no expert load to show
    if args.heldout:
        rows += [["held-out perplexity before / after", f"{report.ppl_before:.3f} / {report.ppl_after:.3f}"]]
        if carved:
            rows += [["held-out load max/mean worst layer before / after", f"{report.load_before[0]:.2f} / {report.load_after[0]:.2f}"],
                     ["held-out load max/mean layer mean before / after", f"{report.load_before[1]:.2f} / {report.load_after[1]:.2f}"]]  # fmt: skip
    summary = report.to_dict()
    if ev is not None:
        console.print("perplexity on --ppl after fine-tuning")
        ev_after = eval_text_metrics(model, ev, args.batch_size)
        summary["eval"] = {"text": args.ppl, "chars": args.ppl_chars, "seqlen": ev.shape[1], "before": ev_before, "after": ev_after}
        name = Path(args.ppl).name
        rows += [[f"{name} perplexity before / after", f"{ev_before['ppl']:.3f} / {ev_after['ppl']:.3f}"]]
        if carved:
            rows += [[f"{name} load worst layer before / after", f"{ev_before['load_worst']:.2f} / {ev_after['load_worst']:.2f}"]]
    extra = {REPORT_FILE: json.dumps(summary, indent=2)}
    if args.no_merge:
        save_adapter(model, args.out, cfg, base_model=args.model, overwrite=args.overwrite, extra_files=extra)
    elif carved:
        card = card_info(args, calibration=False, ppl_windows=ev, ppl_before=ev_before["ppl"] if ev is not None else None,
                         ppl_after=ev_after["ppl"] if ev is not None else None, notes=[finetune_note(args, cfg, report, train)])  # fmt: skip
        save(model, args.out, tokenizer=tok, report=load_report(args.model), overwrite=args.overwrite, extra_files=extra,
             card=card)  # fmt: skip
    else:  # a dense model: an ordinary Hugging Face folder
        with atomic_dir(args.out, args.overwrite) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for file, body in extra.items():
                (tmp / file).write_text(body)
            ordinary_permissions(tmp)
    console.print(table("finetune summary", ["", "value"], rows))
    what = "the adapter" if args.no_merge else "the fine-tuned model"
    console.print(f"saved {what} to {bold(args.out)} (checkpoints in {ckpt_dir})")
    return 0


def finetune_note(args, cfg, report, train) -> str:
    """The model card's line about the fine-tune: what was trained, on what, and what it changed."""
    from pathlib import Path

    held = ""
    if report.ppl_before is not None and report.ppl_after is not None:
        held = f"; held-out perplexity {report.ppl_before:.3f} → {report.ppl_after:.3f}"
    return (f"Fine-tuned by `moecarve finetune`: LoRA r={cfg.lora_r} (alpha {cfg.lora_alpha:g}) on the attention "
            f"projections and the expert weights, router scales and load-balancing bias, {report.steps} "
            f"step{'' if report.steps == 1 else 's'} on "
            f"{train.shape[0]} × {train.shape[1]} tokens of `{Path(args.calib).name}`, merged into the weights{held}.")


def warn_if_diverged(report, lr: float) -> None:
    """One warning line when training made the model worse: a non-finite loss, or held-out
    perplexity up by more than DIVERGED times (the result is saved all the same)."""
    import logging

    log = logging.getLogger("moecarve")
    before, after = report.ppl_before, report.ppl_after
    if report.losses and not all(math.isfinite(x) for x in report.losses):
        log.warning(f"the training loss became {report.losses[-1]}: the fine-tune diverged; try a lower --lr (now {lr})")
    elif before is not None and after is not None and (not math.isfinite(after) or after > DIVERGED * before):
        log.warning(f"held-out perplexity rose from {before:.2f} to {after:.2f}: the fine-tune diverged; "
                    f"try a lower --lr (now {lr}) or fewer steps")  # fmt: skip


def eval_text_metrics(model, windows, batch_size: int) -> dict:
    """Perplexity and expert load (max/mean: worst layer, layer mean) on windows [n, L]."""
    from ..eval.perplexity import perplexity
    from ..finetune.balance import LoadTracker, summarize

    tracker = LoadTracker(model)
    try:
        ppl = perplexity(model, windows, batch_size=batch_size, progress=True)
        worst, mean = summarize(tracker.imbalance())
    finally:
        tracker.remove()
    return {"ppl": ppl, "load_worst": worst, "load_mean": mean}
