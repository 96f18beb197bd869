"""`moecarve frontier MODEL --configs S1A1E8,S2A2E8 --methods default,cmoe --ppl TEXT --out DIR`: carve
every candidate, measure its perplexity and decode speed against the dense model, and mark the
Pareto frontier (moecarve.eval.frontier). DIR gets frontier.json after every point (an interrupted
sweep continues with --resume), then frontier.md and frontier.png."""

from __future__ import annotations

from pathlib import Path

from .common import (
    add_calib_args, add_command, add_model_args, add_output_args, add_ppl_args, add_seed_arg, at_least, bold,
    check_load_args, console, load_kwargs, table,
)  # fmt: skip

JSON_FILE = "frontier.json"
# moecarve.eval.frontier.METHODS' names, spelled out here because that module imports torch
# (`moecarve --help` must not); tests/test_frontier.py checks that the two agree
METHOD_NAMES = ("default", "topk", "probe", "cmoe")
# eval.frontier.speed_ratios decodes SPEED_BATCH --ppl windows side by side and times the FFN on
# the token at position 40 of the first one
SPEED_BATCH = 8
MIN_SEQLEN = 64
# the flags that decide what a measured point means: --resume continues only with the same ones
SETTINGS = ("model", "ppl", "ppl_chars", "ppl_seqlen", "calib", "samples", "seqlen", "seed", "dtype", "device", "kernels",
            "revision", "engine", "precision")  # fmt: skip


def register(sub) -> None:
    p = add_command(
        sub, "frontier",
        help="carve several configurations and methods, measure quality and decode speed, find the Pareto frontier",
        description="Carve the dense model at every configuration of --configs with every recipe of --methods "
        f"({', '.join(METHOD_NAMES)}), measure each carve's perplexity on --ppl and its decode speed against the "
        "dense model (timed interleaved with it, decoding the --ppl text, both on moecarve's decode runtime: what "
        "generate and serve run), and mark the "
        "carves no other point beats on both: the Pareto frontier, printed fastest first with the `moecarve carve` "
        "command that makes each. Static width pruning (A = 0, e.g. S2A0E8) and the dense model are points too. "
        f"--out gets {JSON_FILE} (rewritten after every point: an interrupted sweep keeps its finished points and "
        "continues with --resume), frontier.md and frontier.png. Every check that can fail runs before the model loads.",
    )  # fmt: skip
    p.add_argument("model", help="a dense local model folder, a GGUF file or a hub id")
    p.add_argument("--configs", required=True, metavar="LIST",
                   help="comma-separated S<shared>A<active>E<experts> configurations, e.g. S2A0E8,S1A1E8,S2A2E8")  # fmt: skip
    p.add_argument("--methods", default="default,cmoe", metavar="LIST",
                   help="comma-separated recipes: default (fitted, shadow router, threshold selection), topk (the same, exactly A "
                   "experts per token), "
                   "probe (fitted, probe router), cmoe (the paper); static configs run once per distinct recipe")  # fmt: skip
    add_output_args(p, what=f"output folder for {JSON_FILE}, frontier.md and frontier.png")
    p.add_argument("--resume", action="store_true", help=f"continue the sweep in --out from its {JSON_FILE}")
    add_ppl_args(p, chars=200_000, seqlen=512, what="perplexity text, also decoded for the speed figures (required): "
                 "a .txt file, a save_to_disk folder, wikitext2 or c4")  # fmt: skip
    add_calib_args(p, samples=8, seqlen=512)
    p.add_argument("--batch-size", type=at_least(1), default=4, help="perplexity windows per forward pass")
    p.add_argument("--speed-rounds", type=at_least(3), default=15,
                   help="interleaved timing rounds per speed figure (more: steadier on a busy machine)")  # fmt: skip
    p.add_argument("--threads", type=at_least(1), default=None, metavar="N",
                   help="CPU threads for carving and timing (default: torch's, usually one per core)")  # fmt: skip
    p.add_argument("--engine", choices=["runtime", "hf"], default="runtime",
                   help="what decodes while timed: runtime (moecarve's native decode runtime, CPU; the default) or hf "
                   "(transformers' forward with --kernels bound)")  # fmt: skip
    p.add_argument("--precision", choices=["bf16", "int8", "fp32"], default="bf16",
                   help="weights of both models on the runtime: bf16, int8 (Q8_0-style blocks) or fp32 (default: bf16)")  # fmt: skip
    p.add_argument("--kernels", default="auto",
                   help="how the carved FFNs run for the FFN-only figure (and --engine hf): auto (CPU path on CPU, "
                   "Triton on CUDA), cpu, triton (CUDA only), torch (the reference forward)")  # fmt: skip
    p.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="a llama-bench binary: its tg128 tok/s of each --gguf becomes a reference line of the plot")  # fmt: skip
    p.add_argument("--gguf", nargs="+", default=[], metavar="FILE", help="GGUF files of MODEL for --llama-bench")
    add_seed_arg(p)
    add_model_args(p)
    p.set_defaults(func=run)


def split_list(text: str, flag: str) -> list[str]:
    """The items of a comma-separated option, refusing an empty one."""
    from ..errors import UsageError

    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise UsageError(f"{flag} {text!r} has an empty item; separate the items by single commas")
    return items


def check_options(args) -> None:
    """What the options alone decide, before anything is read."""
    from ..errors import UsageError

    if args.ppl is None:
        raise UsageError("frontier measures perplexity: pass --ppl TEXT (a .txt file, a save_to_disk folder, wikitext2 or c4)")
    if args.ppl_seqlen < MIN_SEQLEN:
        raise UsageError(f"--ppl-seqlen {args.ppl_seqlen} is too short to time decoding; use at least {MIN_SEQLEN}")
    if args.resume and args.overwrite:
        raise UsageError("--resume continues the sweep in --out and --overwrite starts it over: pass one of them")
    if args.device_map is not None:
        raise UsageError("frontier carves copies of the model on one device; drop --device-map (use --device)")
    if args.kernels == "none":
        raise UsageError("frontier times the carves through kernels; use --kernels torch for the reference forward")
    if bool(args.llama_bench) != bool(args.gguf):
        raise UsageError("--llama-bench and --gguf go together: the binary and the GGUF files it times")
    for g in args.gguf:
        if not Path(g).is_file():
            raise UsageError(f"--gguf {g} does not exist")
    if args.engine == "runtime" and args.device not in ("auto", "cpu"):
        raise UsageError(f"the decode runtime runs on CPU: pass --engine hf to time on {args.device}")


def check_candidates(cands, skeleton, seed: int) -> None:
    """Every candidate's carve checked on the model's skeleton as `moecarve carve` checks it."""
    from .carve import check_carvable

    for cand in cands:
        check_carvable(skeleton, cand.carve_config(seed))


def check_out(args, inputs) -> dict | None:
    """--out: a new folder, one moecarve wrote (--overwrite), or an earlier sweep (--resume).
    Returns the earlier sweep's frontier.json with --resume, else None."""
    import logging

    from ..io.atomic import MARKER, OutputExists, UnsafeOutput, check_not_protected, check_output, check_writable
    from ..io.loading import DamagedFile, read_json

    out = Path(args.out)
    if not (args.resume and out.exists()):
        if args.resume:
            logging.getLogger("moecarve").warning(f"{out} does not exist: --resume starts a new sweep")
        try:
            check_output(out, args.overwrite, inputs)
        except OutputExists as e:
            raise OutputExists(f"{out} already exists; pass --resume to continue its sweep or --overwrite to start over") from e
        return None
    check_not_protected(out, inputs)
    if not out.is_dir() or out.is_symlink():
        raise UnsafeOutput(f"{out} exists and is not a folder; choose another output folder")
    if not (out / MARKER).is_file():
        raise UnsafeOutput(f"{out} was not written by moecarve (no {MARKER} file): --resume continues a sweep of "
                           "moecarve frontier; choose another output folder")  # fmt: skip
    check_writable(out)
    file = out / JSON_FILE
    if not file.is_file():
        logging.getLogger("moecarve").warning(f"{out} holds no measured point yet: --resume starts from the dense model")
        return None
    earlier = read_json(file, "the earlier sweep's results")
    if not (isinstance(earlier.get("points"), list) and isinstance(earlier.get("meta"), dict)
            and isinstance(earlier["meta"].get("settings"), dict) and all(map(is_point, earlier["points"]))):  # fmt: skip
        raise DamagedFile(f"{file} is not the result of moecarve frontier; rerun with --overwrite to start over")
    return earlier


def is_point(entry) -> bool:
    """Whether a frontier.json entry reads back as a Point (what the sweep reuses)."""
    from ..eval.frontier import Point

    try:
        Point(**entry)
    except TypeError:
        return False
    return True


def check_same_settings(earlier: dict, settings: dict, file: Path) -> None:
    """--resume continues only a sweep measured with the same model, texts, windows and dtype:
    its points would not be comparable with new ones otherwise."""
    import logging

    from ..errors import UsageError

    before = earlier["meta"]["settings"]
    for key in SETTINGS:
        if before.get(key) != settings[key]:
            flag = "MODEL" if key == "model" else "--" + key.replace("_", "-")
            raise UsageError(f"{file} was measured with {flag} {before.get(key)!r}, not {settings[key]!r}: pass the "
                             "same settings to continue it, or --overwrite to start over")  # fmt: skip
    threads = earlier["meta"].get("threads")
    if threads is not None and threads != settings["threads"]:
        logging.getLogger("moecarve").warning(f"{file} was timed on {threads} thread(s), this run on {settings['threads']}: "
                                              "the old and new speed figures are not comparable")  # fmt: skip


def with_earlier(cands, earlier: dict | None):
    """The candidates plus those the earlier sweep measured that the options do not list: a
    resumed sweep keeps every point it measured."""
    from ..eval.frontier import Candidate

    if earlier is None:
        return cands
    done = [Candidate(p["method"], p["config"]) for p in earlier["points"] if p.get("kind") != "dense"]
    extra = [c for c in dict.fromkeys(done) if c not in cands]
    if extra:
        console.print(f"keeping {len(extra)} point(s) measured earlier that --configs/--methods do not list: "
                      + ", ".join(f"{c.method} {c.config}" for c in extra))  # fmt: skip
    return (*cands, *extra)


def check_speed_windows(windows, args) -> None:
    """The --ppl windows are also the text the speed figures decode: SPEED_BATCH of them at once."""
    from ..eval.frontier import FrontierError

    n, length = windows.shape
    if n < SPEED_BATCH or length < MIN_SEQLEN:
        raise FrontierError(f"--ppl {args.ppl} gives {n} window(s) of {length} tokens; timing decode at batch {SPEED_BATCH} needs "
                            f"{SPEED_BATCH} of at least {MIN_SEQLEN}: pass more text (--ppl-chars) or a shorter --ppl-seqlen")  # fmt: skip


def start_folder(args) -> Path:
    """The output folder, ready for the sweep: created with moecarve's marker (so that --overwrite
    and --resume recognise it later); with --overwrite, emptied of the earlier sweep first."""
    import shutil

    from ..io.atomic import MARKER, MARKER_TEXT

    out = Path(args.out)
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(MARKER_TEXT)
    return out


def resume_hint(out: Path) -> str:
    """What an interrupted sweep kept, and how to continue it ("" when it kept nothing)."""
    import json

    try:
        n = len(json.loads((out / JSON_FILE).read_text())["points"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return f"{out / JSON_FILE} keeps {n} measured point(s): rerun the same command with --resume to continue"


def run(args) -> int:
    """Check everything (nothing loaded, nothing written), then sweep, then print the frontier."""
    import time

    import torch

    from ..calibration import read_text
    from ..config import CalibConfig
    from ..eval.data import load_eval_text
    from ..eval.frontier import FrontierConfig, candidates, pareto
    from ..io.loading import check_files, check_kernels, check_model, load_any, resolve_device, resolve_dtype
    from .carve import model_skeleton, prepare_windows

    t0 = time.perf_counter()
    check_options(args)
    cands = candidates(split_list(args.configs, "--configs"), split_list(args.methods, "--methods"))
    calib_cfg = CalibConfig(source=args.calib, n_samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    # the runtime times CPU models: --device auto is the CPU then, even where there is a GPU
    device = torch.device("cpu") if args.engine == "runtime" else resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    check_kernels(args.kernels, device)
    ref = check_model(args.model, args.revision, files=False)  # config.json first: the architecture decides
    check_load_args(args, [ref])
    check_candidates(cands, model_skeleton(ref, dtype), args.seed)
    check_files(ref)
    earlier = check_out(args, inputs=[ref.path, args.calib, args.ppl])
    calib_text = read_text(calib_cfg.source)  # missing, empty or binary texts fail before the model loads
    ppl_text = load_eval_text(args.ppl)
    threads = torch.get_num_threads()
    settings = {key: getattr(args, key) for key in SETTINGS} | {
        "dtype": str(dtype).removeprefix("torch."), "device": str(device), "threads": args.threads or threads}
    if earlier is not None:
        check_same_settings(earlier, settings, Path(args.out) / JSON_FILE)
    cfg = FrontierConfig(with_earlier(cands, earlier), ppl_batch=args.batch_size, speed_rounds=args.speed_rounds,
                         engine=args.engine, precision=args.precision, threads=args.threads, kernels=args.kernels,
                         seed=args.seed)  # fmt: skip

    torch.manual_seed(args.seed)
    torch.set_num_threads(settings["threads"])
    try:
        model, tok = load_any(ref, args.dtype, str(device), **load_kwargs(args))
        calib, ev = prepare_windows(args, model.config, tok, calib_cfg, calib_text, ppl_text)
        check_speed_windows(ev, args)
        done = f" ({sum(p.get('kind') != 'dense' for p in earlier['points'])} measured earlier)" if earlier else ""
        console.print(f"frontier of {bold(args.model)}: {len(cfg.candidates)} carves{done} on {calib.shape[0]}x{calib.shape[1]} "
                      f"calibration tokens, perplexity on {ev.shape[0]}x{ev.shape[1]} tokens, {settings['threads']} "
                      f"thread(s), {settings['dtype']} on {device}")  # fmt: skip
        title = f"{Path(args.model).name}: {settings['dtype']}, {settings['threads']} thread(s), {device}"
        points = sweep(args, model, tok, calib, ev, cfg, settings, title)
    finally:
        torch.set_num_threads(threads)  # in-process callers (tests) keep their own setting
    if points is None:
        return 130
    print_results(points, pareto(points), title)
    out = Path(args.out)
    console.print(f"wall time {time.perf_counter() - t0:.0f} s; wrote {bold(out / JSON_FILE)}, {bold(out / 'frontier.md')}, "
                  f"{bold(out / 'frontier.png')}")  # fmt: skip
    return 0


def sweep(args, model, tok, calib, ev, cfg, settings: dict, title: str):
    """The measured points, written to --out with frontier.md and frontier.png; None when
    interrupted (what was measured stays in frontier.json, and the message says how to continue)."""
    import sys
    from ..errors import MoecarveError
    from ..eval.frontier import frontier, write_outputs

    out = start_folder(args)
    try:
        points = frontier(model, tok, calib, ev, cfg, out_dir=out, model_name=args.model, meta={"settings": settings})
        write_outputs(points, out, title=title, references=references(args))
    except KeyboardInterrupt:
        print(f"interrupted; {resume_hint(out) or 'nothing was measured'}", file=sys.stderr)
        return None
    except (MoecarveError, OSError) as e:
        if not (hint := resume_hint(out)):
            raise
        raise MoecarveError(f"{e}; {hint}") from e
    return points


def references(args) -> dict[str, float]:
    """{"llama.cpp <type>": tg128 tok/s} of each --gguf by --llama-bench (median of 3 runs, at
    --threads or the physical cores): the plot's reference lines."""
    from ..eval.bench import llama_references
    from ..runtime import default_threads

    out = llama_references(args.llama_bench, args.gguf, args.threads or default_threads())
    for name, value in out.items():
        console.print(f"{name}: {value:.1f} tok/s (tg128)")
    return out


def print_results(points, front, title: str) -> None:
    """Every point as a table (dense first, then fastest first), then the frontier with the command
    that makes each of its carves."""
    order = [p for p in points if p.kind == "dense"] + sorted((p for p in points if p.kind != "dense"),
                                                              key=lambda p: -p.e2e_decode_b1)  # fmt: skip
    from ..eval.frontier import axis_tok_s, dense_tok_s

    ref = dense_tok_s(points)
    rows = [[p.method + (" (static)" if p.kind == "static" else ""), p.config, f"{p.ppl:.3f}", f"{p.ffn_decode_b1:.2f}x",
             f"{p.e2e_decode_b1:.2f}x", f"{axis_tok_s(p, ref):.1f}" if ref else "—", f"{p.e2e_decode_b8:.2f}x",
             f"{p.carve_seconds:.0f}", "yes" if p.on_frontier else ""]
            for p in order]  # fmt: skip
    columns = ["method", "config", "perplexity", "FFN decode b1", "decode b1", "tok/s b1", "decode b8", "carve s", "frontier"]
    console.print(table(f"frontier ({title}); speeds: dense ms / carved ms", columns, rows))
    console.print(f"Pareto frontier, {len(front)} of {len(points)} points, fastest first:")
    for p in front:
        what = p.command or "the dense model itself"
        console.print(f"  {p.config:14s} {p.method:9s} ppl {p.ppl:9.3f}  decode b1 {p.e2e_decode_b1:.2f}x  {what}",
                      markup=False, highlight=False, soft_wrap=True)  # fmt: skip
