"""`moecarve carve MODEL --config S2A2E8 --out DIR`: carve, save, summarise."""

from __future__ import annotations

import argparse

import torch

from .. import adapters
from ..calibration import read_text, tokenize_windows
from ..carve import carve
from ..config import METHODS, ROUTERS, CalibConfig, CarveConfig
from ..export import FORMATS, ExportError, export
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
    p.add_argument("--method", choices=list(METHODS), default="fitted",
                   help="fitted (default): |h|-profile grouping, a shadow router that tracks the oracle's choice and "
                   "a ridge refit of down_proj (training-free); cmoe: the paper's algorithm exactly")
    p.add_argument("--shadow-bits", type=int, default=4,
                   help="fitted: bits of the shadow router's copy of the experts' input rows (2-8); 0: the cheaper "
                   "probe router (faster, lower quality)")
    p.add_argument("--router", choices=list(ROUTERS), default="analytic",
                   help="cmoe only: analytic, CMoE's training-free router; linear, a softmax-over-linear-gate router "
                   "fitted on the calibration tokens (needed by --export)")  # fmt: skip
    p.add_argument("--export", dest="export_fmt", default=None, choices=sorted(FORMATS), metavar="FORMAT",
                   help=f"also export the carved model as a standard HF MoE model ({', '.join(sorted(FORMATS))}) to "
                   "--export-out")  # fmt: skip
    p.add_argument("--export-out", default=None, help="folder for --export (default: OUT-FORMAT)")
    p.add_argument("--eval", dest="eval_text", default=None, metavar="TEXT", help="also report dense vs carved perplexity on this text file")
    p.add_argument("--eval-chars", type=int, default=200_000, help="characters of --eval text to use")
    p.add_argument("--eval-seqlen", type=int, default=512, help="perplexity window length")
    p.add_argument("--offload", choices=["auto", "none", "disk"], default="auto",
                   help="disk: stream one decoder layer at a time from the safetensors (models larger than memory); "
                   "auto: stream when the model would not fit in memory")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue a streamed carve interrupted by a crash (state in OUT.partial/)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model*.bin weights (pickle can run code) when streaming")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard of a streamed carve")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    cfg = CarveConfig.from_string(args.config, k_act=args.k_act, seed=args.seed, router=args.router,
                                  method=args.method, shadow_bits=args.shadow_bits)  # fmt: skip  # fails before loading
    check_output(args.out, args.overwrite)
    check_export_args(args)
    calib_cfg = CalibConfig(source=args.calib, n_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    calib_text = read_text(calib_cfg.source)  # a missing or empty source fails before the model loads
    eval_text = read_text(args.eval_text) if args.eval_text else None
    torch.manual_seed(args.seed)
    if wants_streaming(args):  # larger than memory: one decoder layer at a time from disk
        return run_streamed(args, cfg, calib_cfg, calib_text, eval_text) or export_carved(args)
    model, tok = load_any(args.model, args.dtype, args.device)
    windows, ev = prepare_windows(args, model.config, tok, calib_cfg, calib_text, eval_text)
    ppl_dense = ppl_carved = None
    if eval_text is not None:
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
    return export_carved(args)


def prepare_windows(args, config, tok, calib_cfg, calib_text, eval_text):
    """(calibration windows, --eval windows or None), both clipped to the model's max positions."""
    adapters.adapter_for(config)
    seqlen = adapters.clip_seqlen(config, calib_cfg.seqlen)
    windows = tokenize_windows(tok, calib_text, calib_cfg.n_samples, seqlen, calib_cfg.seed)
    ev = None
    if eval_text is not None:
        ev = test_windows(tok, eval_text, adapters.clip_seqlen(config, args.eval_seqlen), args.eval_chars)
    return windows, ev


def check_export_args(args) -> None:
    """--export needs the linear router and a free output folder: fail before any work."""
    if args.export_fmt is None:
        return
    if args.method != "cmoe" or args.router != "linear":
        raise ExportError(f"--export {args.export_fmt} needs --method cmoe --router linear (the other routers "
                          "have no standard-architecture equivalent)")  # fmt: skip
    args.export_out = args.export_out or f"{str(args.out).rstrip('/')}-{args.export_fmt}"
    check_output(args.export_out, args.overwrite)


def export_carved(args) -> int:
    """Export the carved folder just written (--export), from disk: the same path for streamed carves."""
    if args.export_fmt is None:
        return 0
    export(args.out, args.export_fmt, args.export_out, overwrite=args.overwrite)
    console.print(f"exported {args.export_fmt} to [bold]{args.export_out}[/]; serve it with: vllm serve {args.export_out}")
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


def wants_streaming(args) -> bool:
    """--offload disk or --resume, or (auto) a local model that would not fit in memory."""
    from ..io.loading import resolve_device, resolve_dtype
    from ..stream import would_not_fit

    if args.offload == "disk" or args.resume:
        return True
    device = resolve_device(args.device)
    return args.offload == "auto" and would_not_fit(args.model, resolve_dtype(args.dtype, device), device)


def run_streamed(args, cfg, calib_cfg, calib_text, eval_text) -> int:
    """The streamed carve (moecarve.stream.carve_streamed) and, with --eval, layer-by-layer perplexities."""
    from transformers import AutoConfig, AutoTokenizer

    from ..eval.streaming import layerwise_perplexity
    from ..io.loading import resolve_device, resolve_dtype
    from ..stream import Checkpoint, carve_streamed

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    Checkpoint(args.model, args.allow_pickle)  # no weights / pickle only / missing shard: fail before any work
    config = AutoConfig.from_pretrained(args.model)
    adapters.adapter_for(config)
    tok = AutoTokenizer.from_pretrained(args.model)
    windows, ev = prepare_windows(args, config, tok, calib_cfg, calib_text, eval_text)
    ppl_dense = ppl_carved = None
    if eval_text is not None:
        with console.status("perplexity of the dense model (layer by layer)"):
            ppl_dense = layerwise_perplexity(args.model, ev, device, dtype=dtype, allow_pickle=args.allow_pickle)
    console.print(f"carving [bold]{args.model}[/] at [bold]{cfg.name}[/] on {windows.shape[0]}x{windows.shape[1]} calibration tokens, streamed layer by layer")
    report = carve_streamed(args.model, cfg, windows, args.out, tokenizer=tok, device=device, dtype=dtype, overwrite=args.overwrite,
                            resume=args.resume, allow_pickle=args.allow_pickle, max_shard_size=args.max_shard_size)  # fmt: skip
    if eval_text is not None:
        with console.status("perplexity of the carved model (layer by layer)"):
            ppl_carved = layerwise_perplexity(args.out, ev, device, dtype=dtype)
    print_summary(report, ppl_dense, ppl_carved)
    console.print(f"saved to [bold]{args.out}[/]")
    return 0
