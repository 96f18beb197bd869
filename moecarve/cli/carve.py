"""`moecarve carve MODEL --config S2A2E8 --out DIR`: carve, save, summarise."""

from __future__ import annotations

import argparse

import torch

from .. import adapters
from ..calibration import read_text, tokenize_windows
from ..carve import carve
from ..config import CalibConfig, CarveConfig
from ..eval.perplexity import perplexity, test_windows
from ..io.atomic import check_output
from ..io.loading import load_any
from ..io.save import save
from .common import add_model_args, console, fmt_params, table


def register(sub) -> None:
    p = sub.add_parser(
        "carve",
        help="convert a dense causal LM into an MoE model (training-free)",
        description="Convert every FFN of a dense Hugging Face causal LM into an MoE layer: N_s shared experts "
        "plus routed experts picked per token by an analytic router built from activation statistics on "
        "calibration text (CMoE). Configurations are S<shared>A<active>E<experts>: S2A2E8 keeps 4 of 8 "
        "experts (50%) active per token.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("model", help="a local model folder or a hub id")
    p.add_argument("--config", default="S2A2E8", help="S<shared>A<active>E<experts>")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--calib", default=None, help="calibration text file or local datasets folder (default: the corpus shipped with moecarve)")
    p.add_argument("--samples", type=int, default=8, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window (clipped to the model's max positions)")
    p.add_argument("--k-act", type=int, default=10, help="neurons marked active per token for activation rates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", dest="eval_text", default=None, metavar="TEXT", help="also report dense vs carved perplexity on this text file")
    p.add_argument("--eval-chars", type=int, default=200_000, help="characters of --eval text to use")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = CarveConfig.from_string(args.config, k_act=args.k_act, seed=args.seed)  # fails before loading
    check_output(args.out, args.overwrite)
    calib_cfg = CalibConfig(source=args.calib, n_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    calib_text = read_text(calib_cfg.source)  # a missing or empty source fails before the model loads
    eval_text = read_text(args.eval_text) if args.eval_text else None
    torch.manual_seed(args.seed)
    model, tok = load_any(args.model, args.dtype, args.device)
    adapters.adapter_for(model)
    seqlen = min(calib_cfg.seqlen, adapters.max_positions(model.config) or calib_cfg.seqlen)
    windows = tokenize_windows(tok, calib_text, calib_cfg.n_samples, seqlen, calib_cfg.seed)
    ppl_dense = ppl_carved = None
    if eval_text is not None:
        ev = test_windows(tok, eval_text, min(args.eval_seqlen, adapters.max_positions(model.config) or args.eval_seqlen), args.eval_chars)
        with console.status("perplexity of the dense model"):
            ppl_dense = perplexity(model, ev, batch_size=8)
    console.print(f"carving [bold]{args.model}[/] at [bold]{cfg.name}[/] on {windows.shape[0]}x{windows.shape[1]} calibration tokens")
    report = carve(model, cfg, windows, device=next(model.parameters()).device)
    if eval_text is not None:
        with console.status("perplexity of the carved model"):
            ppl_carved = perplexity(model, ev, batch_size=8)
    save(model, args.out, tokenizer=tok, report=report, overwrite=args.overwrite)
    print_summary(report, ppl_dense, ppl_carved)
    console.print(f"saved to [bold]{args.out}[/]")
    return 0


def print_summary(report, ppl_dense=None, ppl_carved=None) -> None:
    rows = [
        [r.layer, f"{r.seconds:.2f}", r.expert_size, f"{r.shared_rate:.4f}", f"{r.routed_rate:.4f}", f"{r.load_imbalance:.2f}"]
        for r in report.layers
    ]
    console.print(table("per layer", ["layer", "seconds", "m", "shared rate", "routed rate", "load max/mean"], rows))
    summary = [
        ["config", report.config.name],
        ["parameters (dense)", fmt_params(report.params_dense)],
        ["parameters (carved, total)", fmt_params(report.params_total)],
        ["parameters active per token", f"{fmt_params(report.params_active)} ({report.params_active / report.params_dense:.1%})"],
        ["carve time", f"{report.seconds:.1f} s"],
        ["router load max/mean (worst layer)", f"{report.load_imbalance:.2f}"],
    ]
    if ppl_dense is not None:
        summary += [["perplexity dense", f"{ppl_dense:.3f}"], ["perplexity carved", f"{ppl_carved:.3f}"]]
    console.print(table("carve summary", ["", "value"], summary))
