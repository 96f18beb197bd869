"""`moecarve condense MODEL --layers L --experts R --out DIR [--finetune-steps N]`: condense MoE layers
(CD-MoE), optionally fine-tune the condensed layers, save, summarise."""

from __future__ import annotations

import argparse

import torch

from .. import adapters
from ..calibration import load_windows, read_text
from ..condense import MOECARVE_SAVE_FORMAT, CondenseConfig, condense, save_condensed
from ..config import CalibConfig
from ..eval.perplexity import perplexity, test_windows
from ..io.atomic import check_output
from ..io.loading import is_carved, load_any
from ..io.save import load_report
from .common import add_model_args, console, fmt_params, table


def register(sub) -> None:
    p = sub.add_parser(
        "condense",
        help="shrink MoE layers into small dense layers (CD-MoE; optional fine-tune of those layers)",
        description="Condense L MoE layers of a model with shared experts (a moecarve carved model, Qwen2-MoE, "
        "DeepSeek-V2/V3; Mixtral, OLMoE, Qwen3-MoE with --experts >= 1) into dense layers: the shared experts "
        "plus R routed experts made always-on, the router removed. Experts and layers are chosen greedily by "
        "the Jensen-Shannon divergence of hidden states on calibration text. With --finetune-steps the condensed "
        "layers alone are then trained by next-token loss on --calib text (everything else stays frozen). The "
        "result saves in the source architecture where its config can hold the condensed layers as dense layers, "
        "else in moecarve's format.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="a carved moecarve folder, a local MoE model folder or a hub id")
    p.add_argument("--layers", type=int, required=True, help="L: MoE layers to condense")
    p.add_argument("--experts", type=int, default=0, help="R: routed experts kept always-on per condensed layer")
    p.add_argument("--beam", type=int, default=1, help="beam size of the greedy layer search")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--calib", default=None, help="calibration text file or local datasets folder (default: the corpus shipped with moecarve)")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (clipped to the model's max positions)")
    p.add_argument("--max-tokens", type=int, default=None, help="calibration tokens used by the per-layer expert search (default: all)")
    p.add_argument("--weighting", default="mean", choices=["mean", "expected"],
                   help="kept experts' weight: mean routing weight over the tokens that chose them (paper), or over all tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-steps", type=int, default=0, help="AdamW steps training only the condensed layers (0: training-free)")
    p.add_argument("--finetune-samples", type=int, default=64,
                   help="windows of --calib text (--seqlen tokens) to fine-tune on; the first --samples are the search's")
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-batch-size", type=int, default=4)
    p.add_argument("--finetune-lora-r", type=int, default=0, help="0: train the condensed layers fully; r: a rank-r LoRA on them")
    p.add_argument("--eval", dest="eval_text", default=None, metavar="TEXT", help="also report perplexity before and after on this text file")
    p.add_argument("--eval-chars", type=int, default=200_000, help="characters of --eval text to use")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = CondenseConfig(n_layers=args.layers, n_experts=args.experts, beam=args.beam, max_tokens=args.max_tokens,
                         weighting=args.weighting, seed=args.seed, finetune_steps=args.finetune_steps,
                         finetune_lr=args.finetune_lr, finetune_batch_size=args.finetune_batch_size,
                         finetune_lora_r=args.finetune_lora_r)  # fmt: skip
    check_output(args.out, args.overwrite)
    n_windows = max(args.samples, args.finetune_samples if cfg.finetune_steps else 0)
    # one seeded draw: its first --samples windows are exactly those a plain `--samples` run searches on
    calib_cfg = CalibConfig(source=args.calib, n_samples=n_windows, seqlen=args.seqlen, seed=args.seed)
    eval_text = read_text(args.eval_text) if args.eval_text else None
    torch.manual_seed(args.seed)
    model, tok = load_any(args.model, args.dtype, args.device)
    all_windows = load_windows(tok, calib_cfg, adapters.max_positions(model.config))
    windows, tune_windows = all_windows[: args.samples], all_windows[: args.finetune_samples]
    ppl = {}
    if eval_text is not None:
        ev = test_windows(tok, eval_text, adapters.clip_seqlen(model.config, args.eval_seqlen), args.eval_chars)
        with console.status("perplexity before"):
            ppl["before"] = perplexity(model, ev, batch_size=8)
    console.print(f"condensing [bold]{args.model}[/]: {cfg.n_layers} layers, R={cfg.n_experts}, beam {cfg.beam}, "
                  f"on {windows.shape[0]}x{windows.shape[1]} calibration tokens")  # fmt: skip
    report = condense(model, cfg, windows, finetune_windows=tune_windows)
    if eval_text is not None:
        with console.status("perplexity after"):
            ppl["after"] = perplexity(model, ev, batch_size=8)
    carve_report = load_report(args.model) if is_carved(args.model) else None
    save_condensed(model, args.out, report, tokenizer=tok, carve_report=carve_report, overwrite=args.overwrite)
    print_summary(report, ppl)
    native = report.format != MOECARVE_SAVE_FORMAT
    fmt = f"its own {report.format} format (plain transformers)" if native else "moecarve's format"
    console.print(f"saved to [bold]{args.out}[/] in {fmt}: {report.format_reason}", soft_wrap=True, highlight=False)
    return 0


def print_summary(report, ppl: dict) -> None:
    rows = [
        [k + 1, s.layer, " ".join(map(str, s.experts)) or "-", " ".join(f"{w:.3f}" for w in s.expert_weights) or "-",
         " → ".join(f"{j:.4f}" for j in s.js_layer), f"{s.js_model:.4f}"]
        for k, s in enumerate(report.steps)
    ]  # fmt: skip
    console.print(table("condensed layers, in the order chosen", ["step", "layer", "experts kept", "weights", "layer JS", "model JS"], rows))
    summary = [
        ["parameters before / after", f"{fmt_params(report.params_before)} / {fmt_params(report.params_after)}"],
        ["memory before / after", f"{report.bytes_before / 2**20:.1f} MiB / {report.bytes_after / 2**20:.1f} MiB"],
        ["search time", f"{report.seconds:.1f} s"],
    ]
    if report.finetune is not None:
        ft = report.finetune
        kind = "full" if not ft.lora_r else f"LoRA r={ft.lora_r}"
        summary += [
            ["fine-tune", f"{ft.steps} steps ({kind}, {fmt_params(ft.trainable_params)} trainable) "
                          f"on {ft.train_windows} windows, {ft.seconds:.1f} s"],
            ["calibration loss before / after fine-tune", f"{ft.loss_before:.4f} / {ft.loss_after:.4f}"],
        ]  # fmt: skip
    if ppl:
        summary += [["perplexity before", f"{ppl['before']:.3f}"], ["perplexity after", f"{ppl['after']:.3f}"]]
    console.print(table("condense summary", ["", "value"], summary))
