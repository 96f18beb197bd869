"""`moecarve bench MODEL [--carve DIR ...]`: prompt and generation tokens/s of the dense model and
its carves on the decode runtime, beside transformers' eager forward and llama.cpp, in one run."""

from __future__ import annotations

import json
from pathlib import Path

from .common import add_command, at_least, console, table


def _ints(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _precisions(text: str) -> list[str]:
    import argparse

    values = [v for v in text.split(",") if v]
    bad = [v for v in values if v not in ("bf16", "int8", "fp32")]
    if bad or not values:
        raise argparse.ArgumentTypeError(f"unknown precision {', '.join(map(repr, bad)) or repr(text)}; "
                                         "choose from bf16, int8, fp32")
    return values


def register(sub) -> None:
    p = add_command(
        sub, "bench",
        help="tokens/s of a model and its carves on the decode runtime, beside llama.cpp",
        description="Time prompt processing (pp512: one 512-token prompt) and generation (tg128: 128 decode "
        "steps from an empty cache, B sequences together at batch B) of MODEL and each --carve folder on "
        "moecarve's decode runtime, every precision, thread count and batch, rows interleaved round by round "
        "(medians). --hf-eager adds transformers' eager forward; --llama-bench with --gguf adds llama.cpp's "
        "llama-bench on the same machine in the same run (a comparison tool only, never a dependency).",
    )  # fmt: skip
    p.add_argument("model", help="the dense model: a folder, a GGUF file or a hub id in the local cache")
    p.add_argument("--carve", nargs="+", default=None, metavar="DIR", help="carved folders of MODEL to time beside it")
    p.add_argument("--threads", type=_ints, default=None, metavar="N[,N]",
                   help="thread counts (default: the physical cores)")  # fmt: skip
    p.add_argument("--batch", type=_ints, default=[1], metavar="B[,B]", help="sequences decoded together (default: 1)")
    p.add_argument("--precision", type=_precisions, default=["bf16"], metavar="P[,P]",
                   help="bf16, int8 (Q8_0-style blocks), fp32 (default: bf16)")  # fmt: skip
    p.add_argument("--rounds", type=at_least(1), default=3, help="timed rounds; each figure is their median")
    p.add_argument("--hf-eager", action="store_true", help="also time transformers' eager forward (fp32 / bf16)")
    p.add_argument("--llama-bench", default=None, metavar="PATH", help="a llama-bench binary, for llama.cpp rows")
    p.add_argument("--gguf", nargs="+", default=None, metavar="FILE", help="GGUF files of MODEL for llama-bench")
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="also write every figure as JSON rows")
    p.set_defaults(func=run)


def _check(args) -> list:
    """Everything that can be checked before a model loads; returns the model references."""
    from ..errors import UsageError
    from ..io.atomic import check_writable
    from ..io.loading import check_model

    args.carve, args.gguf = args.carve or [], args.gguf or []
    if bool(args.llama_bench) != bool(args.gguf):
        raise UsageError("--llama-bench and --gguf go together (the binary and the GGUF files it times)")
    if args.llama_bench and not Path(args.llama_bench).is_file():
        raise UsageError(f"--llama-bench {args.llama_bench}: no such file (build it with ../shared/tools/llama-bench.sh)")
    for g in args.gguf:
        if not Path(g).is_file():
            raise UsageError(f"--gguf {g}: no such file")
    refs = [check_model(args.model)] + [check_model(c) for c in args.carve]
    for ref in refs[1:]:
        if not ref.carved:
            raise UsageError(f"--carve {ref.name}: not a carved folder (config.json has no moecarve entry)")
    if args.json_out:
        out = Path(args.json_out)
        if out.is_dir():
            raise UsageError(f"--json {out} is a folder; name a file")
        check_writable(out.absolute().parent, out)
    return refs


def run(args) -> int:
    refs = _check(args)
    import torch

    from ..eval import bench
    from ..io.loading import load_any
    from ..runtime import Runtime, default_threads

    threads = args.threads or [default_threads()]
    rows: list[bench.Row] = []
    cases: list[bench.Case] = []
    keep = []  # the models and runtimes alive for the run
    profiles = []  # (tg128 row, runtime, batch): profiled after the timed rounds
    text = None
    need = bench.text_needed(max(args.batch))
    for ref in refs:
        console.print(f"loading {ref.name}")
        model, tok = load_any(ref, dtype="float32", device="cpu")
        text = text or bench.text_tokens(tok, need)
        name, label = Path(ref.name).name, bench.carve_label(model)
        for prec in args.precision:
            for th in threads:
                rt = Runtime(model, prec, threads=th, max_ctx=need + 8, max_slots=max(args.batch), max_tokens=bench.PP)
                keep.append(rt)
                bpt = sum(rt.weights.bytes_per_token.values())
                for b in args.batch:
                    tests = ["pp512", "tg128"] if b == 1 else ["tg128"]
                    case_rows = {t: bench.Row(name, "moecarve", label, prec, th, b, t, bytes_per_token=bpt) for t in tests}
                    rows += case_rows.values()
                    cases.append(bench.Case(case_rows, bench.runtime_tests(rt, text, b)))
                    profiles.append((case_rows["tg128"], rt, b))
        if args.hf_eager:
            for prec in [p for p in args.precision if p != "int8"]:
                m = model if prec == "fp32" else load_any(ref, dtype="bfloat16", device="cpu")[0]
                keep.append(m)
                for th in threads:
                    for b in args.batch:
                        tests = ["pp512", "tg128"] if b == 1 else ["tg128"]
                        case_rows = {t: bench.Row(name, "hf-eager", label, prec, th, b, t) for t in tests}
                        rows += case_rows.values()
                        cases.append(bench.Case(case_rows, bench.hf_tests(m, text, b), setup=lambda n=th: torch.set_num_threads(n)))
        keep.append(model)
    for g in args.gguf:
        typ = bench.gguf_type(g)
        for th in threads:
            case_rows = {t: bench.Row(Path(args.model).name, "llama.cpp", "dense", typ, th, 1, t) for t in ("pp512", "tg128")}
            rows += case_rows.values()
            cases.append(bench.Case(case_rows, bench.llama_bench(args.llama_bench, g, th), warmup=False))

    console.print(f"timing {len(cases)} cases x {args.rounds} rounds (+1 warm-up)")
    bench.run_cases(cases, args.rounds, progress=lambda r: console.print(f"  round {r}/{args.rounds} done"))
    header, lines = bench.table(rows)
    console.print(table(f"{Path(args.model).name}: tokens/s (pp512, tg128), medians of {args.rounds} rounds", header, lines))
    for row, rt, b in profiles:  # one more tg128 pass each, profiled: where the time goes
        row.phases = bench.profile_runtime(rt, text, b)
    header, lines = bench.phase_table(rows)
    console.print(table("where a decode step's time goes on the runtime (tg128, ms per step, one profiled pass)", header, lines))
    if args.json_out:
        from ..eval.timing import cpu_name

        doc = {"machine": cpu_name(), "rows": [r.to_dict() for r in rows]}
        Path(args.json_out).write_text(json.dumps(doc, indent=1) + "\n")
        console.print(f"wrote {args.json_out}")
    return 0
