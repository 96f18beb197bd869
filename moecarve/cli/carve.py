"""`moecarve carve MODEL --config S2A2E8 --out DIR`: check everything, carve, save, summarise."""

from __future__ import annotations

import argparse

from ..config import ALLOCATIONS, METHODS, ROUTERS, SCORE_WEIGHTS, SELECTIONS
from .common import (
    add_calib_args, add_command, add_model_args, add_output_args, add_ppl_args, add_seed_arg, at_least, bold, card_info,
    check_load_args, console, fmt_params, in_range, load_kwargs, routed, table,
)  # fmt: skip

# without --config or --expert-size: single-neuron experts, a quarter of the FFN per token (the
# quality/speed frontier's default carve on the reference model: bench/frontier.py, bench/RESULTS.md)
DEFAULT_EXPERT_SIZE, DEFAULT_ACTIVE = 1, 0.25
DEFAULT_ALLOCATION = "uniform"
DEFAULT_SAMPLES, DEFAULT_SEQLEN = 16, 512


def register(sub) -> None:
    p = add_command(
        sub, "carve",
        help="convert a dense causal LM into an MoE model (training-free)",
        description="Convert every FFN of a dense Hugging Face causal LM into an MoE layer: N_s shared experts "
        "plus routed experts picked per token by a router built from activation statistics on calibration text "
        "(CMoE). Configurations are S<shared>A<active>E<experts>: S2A2E8 keeps 4 of 8 experts (50%) active per "
        "token. Every check that can fail (paths, config.json, the configuration against the model, --export, "
        "the output folder) runs before the model loads.",
    )  # fmt: skip
    p.add_argument("model", help="a local model folder, a GGUF file (dequantised as it loads) or a hub id")
    p.add_argument("--config", default=None,
                   help="S<shared>A<active>E<experts>, e.g. S2A2E8 (default: --expert-size "
                   f"{DEFAULT_EXPERT_SIZE} --active {DEFAULT_ACTIVE}: single-neuron experts, a quarter of the FFN per token)")  # fmt: skip
    p.add_argument("--expert-size", type=at_least(1), default=None, metavar="M",
                   help="instead of --config: experts of M neurons (M divides the intermediate size; needs --active), "
                   f"with --active and --shared giving the fraction of the FFN active per token and always on (default: {DEFAULT_EXPERT_SIZE})")  # fmt: skip
    p.add_argument("--active", type=in_range(0.0, 1.0), default=None, metavar="F",
                   help="instead of --config: fraction of the FFN active per token, shared experts included, in experts "
                   f"of --expert-size neurons (default: {DEFAULT_ACTIVE}; --active alone: single-neuron experts)")  # fmt: skip
    p.add_argument("--shared", type=in_range(0.0, 1.0), default=None, metavar="F",
                   help="instead of --config: fraction of the FFN in always-on shared experts, at most --active (default: 0)")  # fmt: skip
    add_output_args(p)
    # 16 windows of 512 tokens: on SmolLM2 as good as 8 x 2048 at half the tokens (and shorter attention),
    # better than 8 x 512 (bench/real_models.py, README)
    add_calib_args(p, samples=DEFAULT_SAMPLES, seqlen=DEFAULT_SEQLEN)
    p.add_argument("--k-act", type=at_least(1), default=10, help="neurons marked active per token for activation rates")
    add_seed_arg(p)
    p.add_argument("--method", choices=list(METHODS), default="fitted",
                   help="fitted: |h|-profile grouping, a shadow router that tracks the oracle's choice and a ridge "
                   "refit of down_proj (training-free); cmoe: the paper's algorithm exactly")  # fmt: skip
    p.add_argument("--shadow-bits", type=int, default=None,
                   help="fitted: bits of the shadow router's copy of the experts' input rows (2-8); 0: the cheaper "
                   "probe router (faster, lower quality) (default: 4, or 8 where half or more of the routed experts "
                   "are active: a threshold among many similar scores needs the finer copy)")  # fmt: skip
    p.add_argument("--selection", choices=["auto", *SELECTIONS], default="auto",
                   help="fitted with the shadow router: topk, exactly A routed experts per token; threshold, every "
                   "expert scoring above a per-layer threshold calibrated to pick A per token on average (at most 2A), "
                   "so that tokens that need more neurons get more at the same average; auto: threshold with the "
                   "shadow router, else topk (default: auto)")  # fmt: skip
    p.add_argument("--score-weight", choices=list(SCORE_WEIGHTS), default="fisher",
                   help="fitted with the shadow router: what each neuron's estimated |h| is weighted by when the "
                   "router picks: fisher, its down_proj column's norm under the loss's Fisher metric (one forward "
                   "and backward of the dense model on 1024 calibration tokens; streamed carves use down); down, "
                   "the column's plain norm; none, |h| alone (default: fisher)")  # fmt: skip
    p.add_argument("--shadow-bias", action=argparse.BooleanOptionalAction, default=True,
                   help="fitted with the shadow router: correct each quantised row's estimate by its rounding error on "
                   "the calibration inputs' mean (one float per row; default: on)")  # fmt: skip
    p.add_argument("--tail", type=in_range(0.0, 1.0), default=None, metavar="F",
                   help="fitted with the shadow router: a further fraction F of the FFN's neurons per token, on "
                   "average, added from the router's own estimates (the neurons just below the cut, each with a 4-bit "
                   "output column: a twelfth of an exact neuron's bf16 bytes); 0: none (default: 0.25, or what is left "
                   "where fewer neurons remain unpicked)")  # fmt: skip
    p.add_argument("--allocation", choices=list(ALLOCATIONS), default=DEFAULT_ALLOCATION,
                   help="how the active experts are spread over the layers: uniform, the same A in every layer; "
                   "sensitivity, more where the calibration text shows a layer loses more, fewer where it loses less, "
                   "at the same total (the same bytes read per token); in-memory carves only")  # fmt: skip
    p.add_argument("--router", choices=list(ROUTERS), default="analytic",
                   help="cmoe only: analytic, CMoE's training-free router; linear, a softmax-over-linear-gate router "
                   "fitted on the calibration tokens (needed by --export)")  # fmt: skip
    p.add_argument("--export", dest="export_fmt", default=None, metavar="FORMAT",
                   help="also export the carved model as a standard HF MoE model (qwen2_moe) to --export-out; "
                   "needs --method cmoe --router linear")  # fmt: skip
    p.add_argument("--export-out", default=None, metavar="DIR", help="folder for --export (default: OUT-FORMAT)")
    add_ppl_args(p, chars=200_000, seqlen=512, what="also report dense vs carved perplexity on this text "
                 "(a .txt file, a save_to_disk folder, wikitext2 or c4)")  # fmt: skip
    p.add_argument("--offload", choices=["auto", "none", "disk"], default="auto",
                   help="disk: stream one decoder layer at a time from the safetensors (models larger than memory); "
                   "auto: stream when the model would not fit in memory; none: always in memory")  # fmt: skip
    p.add_argument("--resume", action="store_true", help="continue a streamed carve interrupted by a crash (state in OUT.partial/)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model*.bin weights (pickle can run code) when streaming")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard of the output")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    """Check everything that can be checked (nothing loaded, nothing written), then carve."""
    import torch

    from ..calibration import read_text
    from ..config import CalibConfig, CarveConfig
    from ..errors import UsageError
    from ..eval.data import load_eval_text
    from ..io.atomic import check_output
    from ..io.loading import check_files, check_model, resolve_device, resolve_dtype
    from ..stream.shards import parse_size

    settings = dict(k_act=args.k_act, seed=args.seed, router=args.router, method=args.method, shadow_bits=args.shadow_bits,
                    selection=args.selection, allocation=args.allocation, score_weight=args.score_weight,
                    shadow_bias=args.shadow_bias, tail=args.tail)  # fmt: skip
    check_config_args(args)
    if args.config is None:  # the granular flags, each with its default
        args.expert_size = DEFAULT_EXPERT_SIZE if args.expert_size is None else args.expert_size
        args.active = DEFAULT_ACTIVE if args.active is None else args.active
    # a bad spec or setting fails before the model is looked at; --expert-size needs the model's FFN width
    cfg = None if args.expert_size is not None else CarveConfig.from_string(args.config, **settings)
    calib_cfg = CalibConfig(source=args.calib, n_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    parse_size(args.max_shard_size)
    ref = check_model(args.model, args.revision, files=False)  # config.json first: the architecture decides
    check_load_args(args, [ref])
    skeleton = model_skeleton(ref, dtype)
    cfg = cfg or config_from_granularity(args, skeleton, **settings)
    check_carvable(skeleton, cfg)
    check_export_args(args, skeleton)
    check_files(ref)  # then complete weights and a tokenizer
    streamed = wants_streaming(args, ref, device, dtype)
    if streamed and cfg.allocation != "uniform" and not cfg.static:  # the sensitivity pass runs the whole model
        console.print("streamed carve: the active experts are spread uniformly over the layers (--allocation "
                      f"{cfg.allocation} measures the whole model in memory)")  # fmt: skip
        cfg = cfg.replace(allocation="uniform")
    if streamed and cfg.fisher_pass:  # the Fisher pass runs the whole model backward
        console.print("streamed carve: the router's scores are weighted by the plain down_proj norms "
                      "(score_weight 'down'; 'fisher' measures the whole model in memory)")  # fmt: skip
        cfg = cfg.replace(score_weight="down")
    check_output(args.out, args.overwrite, inputs=[ref.path, args.calib, args.ppl])
    if args.export_fmt is not None:
        check_output(args.export_out, args.overwrite, inputs=[ref.path, args.out])
    if streamed:
        check_resume(args)
    calib_text = read_text(calib_cfg.source)  # a missing, empty or binary source fails before the model loads
    ppl_text = load_eval_text(args.ppl) if args.ppl else None
    torch.manual_seed(args.seed)
    if streamed:  # larger than memory: one decoder layer at a time from disk
        return run_streamed(args, ref, cfg, calib_cfg, calib_text, ppl_text, device, dtype) or export_carved(args)
    return run_in_memory(args, ref, cfg, calib_cfg, calib_text, ppl_text) or export_carved(args)


def check_config_args(args) -> None:
    """--config, or the granular flags --expert-size / --active / --shared, not both. Without
    --config, --expert-size defaults to 1 and --active to 0.25 (--active 0.5 alone: single-neuron
    experts at half the FFN); --expert-size M needs --active F (which fraction of M-neuron experts)."""
    from ..errors import UsageError

    granular = [f for f, v in (("--expert-size", args.expert_size), ("--active", args.active), ("--shared", args.shared))
                if v is not None]  # fmt: skip
    if args.config is not None and granular:
        raise UsageError(f"pass either --config or {'/'.join(granular)} (--expert-size, --active, --shared), not both")
    if args.expert_size is not None and args.active is None:
        raise UsageError("--expert-size needs --active F: the fraction of the FFN active per token, e.g. --active 0.25")


def model_skeleton(ref, dtype):
    """A dense model's skeleton on the meta device (no weights read); a carved folder or an unknown
    family is refused before transformers builds anything."""
    from types import SimpleNamespace

    from .. import adapters
    from ..errors import UsageError
    from ..stream.skeleton import build_skeleton

    if ref.carved:
        raise UsageError(f"{ref.name} is already carved (its config.json has a 'moecarve' entry); carve its dense "
                         "source model instead (moecarve condense shrinks carved layers)")  # fmt: skip
    adapters.adapter_for(SimpleNamespace(**ref.config))
    return build_skeleton(ref.config_dir, dtype)


def intermediate_size(skeleton) -> int:
    """The FFN width of the skeleton's first decoder layer (what --expert-size divides)."""
    from .. import adapters

    return adapters.read_ffn(skeleton.config, adapters.decoder_layers(skeleton)[0]).intermediate_size


def config_from_granularity(args, skeleton, **settings):
    """--expert-size M --active F [--shared F] as the S/A/E configuration it stands for, printed."""
    from ..config import CarveConfig

    width = intermediate_size(skeleton)
    cfg = CarveConfig.from_granularity(width, args.expert_size, args.active, args.shared or 0.0, **settings)
    console.print(f"--expert-size {args.expert_size} on intermediate size {width}: [bold]{cfg.name}[/] "
                  f"({cfg.n_shared} shared + {cfg.n_active} routed of {cfg.n_experts} experts per token, "
                  f"{cfg.active_fraction:.1%} active)")  # fmt: skip
    return cfg


def check_carvable(skeleton, cfg) -> None:
    """The skeleton checked against the carve config exactly as moecarve.carve checks the real
    model: architecture, N dividing every FFN, k_act."""
    import torch

    from ..carve import validate

    validate(skeleton, cfg, torch.zeros(1, 2, dtype=torch.long))


def wants_streaming(args, ref, device, dtype) -> bool:
    """--offload disk or --resume, or (auto) a local model that would not fit in memory.

    Refuses the streamed-only options where they would be ignored (--offload none).
    """
    from ..errors import UsageError
    from ..stream import would_not_fit

    if args.offload == "none":
        for flag, given in (("--resume", args.resume), ("--allow-pickle", args.allow_pickle)):
            if given:
                raise UsageError(f"{flag} applies to streamed carves only; drop it, or use --offload disk instead of none")
        return False
    if args.offload == "disk" or args.resume:
        if args.device_map is not None:
            raise UsageError("--device-map applies to in-memory carves; a streamed carve (--offload disk, --resume) "
                             "places one layer at a time on --device")  # fmt: skip
        if ref.path is None:
            raise UsageError(f"a streamed carve (--offload disk, --resume) reads a local folder; {args.model!r} is a hub "
                             "id: download it first (hf download) and pass the folder")  # fmt: skip
        return True
    return ref.path is not None and would_not_fit(ref.path, dtype, device)


def check_export_args(args, skeleton) -> None:
    """--export needs the linear router and a source the format can express (its folder is checked with --out)."""
    import importlib

    from ..export import FORMATS, ExportError, check_format

    if args.export_fmt is None:
        if args.export_out is not None:
            raise ExportError("--export-out names the folder of --export FORMAT; pass --export too")
        return
    check_format(args.export_fmt)
    if args.method != "cmoe" or args.router != "linear":
        raise ExportError(f"--export {args.export_fmt} needs --method cmoe --router linear (the other routers "
                          "have no standard-architecture equivalent)")  # fmt: skip
    importlib.import_module(FORMATS[args.export_fmt].__module__).check_source(skeleton)
    args.export_out = args.export_out or f"{str(args.out).rstrip('/')}-{args.export_fmt}"


def check_resume(args) -> None:
    """The unfinished streamed carve in OUT.partial/: refused without --resume or --overwrite, and
    with --resume its state and every finished layer's file checked (a truncated file fails now)."""
    import logging

    from ..io.loading import DamagedFile, read_json
    from ..stream.carve import HIDDEN_FILE, OUTSIDE_FILE, STATE_FILE, ResumeError, layer_file, partial_dir
    from ..stream.shards import TruncatedFile, read_header

    part = partial_dir(args.out)
    state_file = part / STATE_FILE
    if not state_file.is_file():
        if args.resume:
            logging.getLogger("moecarve").warning(f"{part} holds no unfinished carve; --resume starts from the first layer")
        return
    if not args.resume:
        if args.overwrite:
            return  # carve_streamed starts over
        raise ResumeError(f"{part} holds an unfinished carve: pass --resume to continue it or --overwrite to start over")
    restart = "rerun with --overwrite instead of --resume to start over"
    state = read_json(state_file, "the unfinished carve's state")
    done = state.get("done")
    if not isinstance(done, int) or "fingerprint" not in state:
        raise DamagedFile(f"{state_file} is not the state of a streamed carve; {restart}")
    names = [OUTSIDE_FILE, HIDDEN_FILE, *map(layer_file, range(done))] if done else []
    for name in names:
        path = part / name
        if not path.is_file():
            raise ResumeError(f"{path} is missing: the unfinished carve cannot continue; {restart}")
        try:
            read_header(path)
        except TruncatedFile as e:
            raise ResumeError(f"{path} is truncated (the run was killed while writing it?): {restart}") from e


def prepare_windows(args, config, tok, calib_cfg, calib_text, ppl_text):
    """(calibration windows, --ppl windows or None), both clipped to the model's max positions."""
    from ..adapters import clip_seqlen
    from ..calibration import tokenize_windows
    from ..eval.perplexity import eval_windows

    seqlen = clip_seqlen(config, calib_cfg.seqlen)
    windows = tokenize_windows(tok, calib_text, calib_cfg.n_samples, seqlen, calib_cfg.seed)
    ev = None
    if ppl_text is not None:
        ev = eval_windows(tok, args.ppl, clip_seqlen(config, args.ppl_seqlen), args.ppl_chars, ppl_text)
    return windows, ev


def run_in_memory(args, ref, cfg, calib_cfg, calib_text, ppl_text) -> int:
    from ..carve import carve
    from ..eval.perplexity import perplexity
    from ..io.loading import load_any
    from ..io.save import save
    from ..stream.shards import parse_size

    model, tok = load_any(ref, args.dtype, args.device, **load_kwargs(args))
    windows, ev = prepare_windows(args, model.config, tok, calib_cfg, calib_text, ppl_text)
    ppl_dense = ppl_carved = None
    if ev is not None:
        console.print(f"perplexity of the dense model on {ev.shape[0]}x{ev.shape[1]} tokens")
        ppl_dense = perplexity(model, ev, batch_size=8, progress=True)
    console.print(f"carving {bold(args.model)} at [bold]{cfg.name}[/] on {windows.shape[0]}x{windows.shape[1]} calibration tokens")
    report = carve(model, cfg, windows, device=next(model.parameters()).device)
    if ev is not None:
        console.print("perplexity of the carved model")
        ppl_carved = perplexity(model, ev, batch_size=8, progress=True)
    card = card_info(args, ppl_windows=ev, ppl_before=ppl_dense, ppl_after=ppl_carved)
    save(model, args.out, tokenizer=tok, report=report, overwrite=args.overwrite, max_shard_size=parse_size(args.max_shard_size),
         card=card)  # fmt: skip
    print_summary(report, ppl_dense, ppl_carved)
    console.print(f"saved to {bold(args.out)}")
    return 0


def run_streamed(args, ref, cfg, calib_cfg, calib_text, ppl_text, device, dtype) -> int:
    """The streamed carve (moecarve.stream.carve_streamed) and, with --ppl, layer-by-layer perplexities.

    When it stops (an error, Ctrl-C), the finished layers stay in OUT.partial/ and the message says
    that --resume continues from there.
    """
    import sys

    from transformers import AutoConfig, AutoTokenizer

    from ..errors import MoecarveError
    from ..eval.streaming import layerwise_perplexity
    from ..stream import Checkpoint, carve_streamed

    Checkpoint(args.model, args.allow_pickle)  # pickle only / missing shard: fail before any work
    config = AutoConfig.from_pretrained(ref.path)
    tok = AutoTokenizer.from_pretrained(ref.path)
    windows, ev = prepare_windows(args, config, tok, calib_cfg, calib_text, ppl_text)
    ppl_dense = ppl_carved = None
    if ev is not None:
        console.print(f"perplexity of the dense model on {ev.shape[0]}x{ev.shape[1]} tokens, layer by layer")
        ppl_dense = layerwise_perplexity(args.model, ev, device, dtype=dtype, allow_pickle=args.allow_pickle, progress=True)
    console.print(f"carving {bold(args.model)} at [bold]{cfg.name}[/] on {windows.shape[0]}x{windows.shape[1]} calibration "
                  "tokens, streamed layer by layer")  # fmt: skip
    try:
        report = carve_streamed(args.model, cfg, windows, args.out, tokenizer=tok, device=device, dtype=dtype,
                                overwrite=args.overwrite, resume=args.resume, allow_pickle=args.allow_pickle,
                                max_shard_size=args.max_shard_size, card=card_info(args, ppl_windows=ev,
                                ppl_before=ppl_dense))  # fmt: skip
    except KeyboardInterrupt:
        print(f"interrupted; {_resume_hint(args.out) or 'nothing was kept'}", file=sys.stderr)
        return 130
    except (MoecarveError, OSError) as e:
        hint = _resume_hint(args.out)
        if not hint:
            raise
        raise MoecarveError(f"{e}; {hint}") from e
    if ev is not None:
        console.print("perplexity of the carved model, layer by layer")
        ppl_carved = layerwise_perplexity(args.out, ev, device, dtype=dtype, progress=True)
    print_summary(report, ppl_dense, ppl_carved)
    console.print(f"saved to {bold(args.out)}")
    return 0


def _resume_hint(out) -> str:
    """What an interrupted streamed carve left, and how to continue it ("" when it left nothing)."""
    import json

    from ..stream.carve import STATE_FILE, partial_dir

    part = partial_dir(out)
    try:
        done = json.loads((part / STATE_FILE).read_text())["done"]
    except (OSError, ValueError, KeyError):
        return ""
    return f"{part} keeps {done} finished layer(s): rerun the same command with --resume to continue"


def export_carved(args) -> int:
    """Export the carved folder just written (--export), from disk: the same path for streamed carves."""
    from ..export import export

    if args.export_fmt is None:
        return 0
    export(args.out, args.export_fmt, args.export_out, overwrite=args.overwrite)
    console.print(f"exported {args.export_fmt} to {bold(args.export_out)}; serve it with: vllm serve {args.export_out}")
    return 0


def print_summary(report, ppl_dense=None, ppl_carved=None) -> None:
    stat = report.layers[0].statistic if report.layers else "activation rate"
    rows = [
        [r.layer, f"{r.seconds:.2f}", r.expert_size, r.router or "-", f"{r.active_fraction:.1%}", f"{r.shared_rate:.4f}",
         routed(r, f"{r.routed_rate:.4f}"), routed(r, f"{r.load_imbalance:.2f}")]
        for r in report.layers
    ]  # fmt: skip
    columns = ["layer", "seconds", "m", "router", "active", f"shared {stat}", f"routed {stat}", "load max/mean"]
    console.print(table("per layer", columns, rows))
    lowest, highest = report.active_range
    active = f"{report.active_fraction:.1%} on average (lowest layer {lowest:.1%}, highest {highest:.1%})"
    if report.config.selection == "threshold":
        active += ", calibrated: per token it varies"
    summary = [
        ["config", f"{report.config.name} ({report.config.method})"],
        ["FFN active per token", active],
        ["FFN bytes read per token", f"{report.ffn_bytes_per_token / 2**20:.1f} MiB of {report.ffn_dense_bytes / 2**20:.1f} "
         f"MiB dense ({report.ffn_bytes_per_token / max(report.ffn_dense_bytes, 1):.1%}: active experts, shared, router, tail)"],
        ["parameters (dense)", fmt_params(report.params_dense)],
        ["parameters (carved, total)", fmt_params(report.params_total)],
        ["parameters active per token", f"{fmt_params(report.params_active)} ({report.params_active / report.params_dense:.1%})"],
        ["carve time", f"{report.seconds:.1f} s" + (f" (allocation {report.allocation_seconds:.1f} s)" if report.allocation_seconds else "")],
        ["router load max/mean (worst layer)",
         "- (static pruning: no router)" if report.config.static else f"{report.load_imbalance:.2f}"],
    ]
    if ppl_dense is not None:
        summary += [["perplexity dense", f"{ppl_dense:.3f}"], ["perplexity carved", f"{ppl_carved:.3f}"]]
    console.print(table("carve summary", ["", "value"], summary))
