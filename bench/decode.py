"""Decode speed on CPU (issue 26): SmolLM2-135M on moecarve's runtime beside llama.cpp, into bench/decode.json.

    python bench/decode.py [--threads 1,2] [--rounds 3] [--llama-bench PATH]   # both runs, the JSON, the tables
    python bench/decode.py --table                              # the README's table from bench/decode.json

Two `moecarve bench` runs on this machine:
  1. the runtime (dense and the CLI's default carves at 50 / 25 / 12.5% active, out/real/smollm2-*
     from bench/real_models.py) in bf16, int8 and fp32, at 1 thread and all cores, batch 1 and 8,
     interleaved round by round with llama.cpp's llama-bench on F16, Q8_0 and Q4_1 GGUFs of the same
     weights (llama-bench built by ../shared/tools/llama-bench.sh: a bench-time tool only);
  2. transformers' eager forward (dense and the 25% carve, bf16 and fp32), one round: it is 2-10x
     slower, and timing it in every round of run 1 would triple the run.
Rows of both go to bench/decode.json with the machine, date and commands.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "smollm2" / "hf"
CARVES = [ROOT / "out" / "real" / f"smollm2-{f}" for f in ("0.5", "0.25", "0.125")]
# llama-bench: --llama-bench, else $LLAMA_BENCH, else the one on PATH (../shared/tools/llama-bench.sh DEST builds DEST/bin/llama-bench)
LLAMA_BENCH = Path(os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench") or "llama-bench")
GGUFS = [ROOT / "models" / "gguf" / "smollm2-f16.gguf", ROOT / "models" / "gguf" / "smollm2-q8_0.gguf",
         ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"]  # fmt: skip
OUT = ROOT / "bench" / "decode.json"


def bench(args: list[str]) -> str:
    cmd = [str(ROOT / ".venv" / "bin" / "moecarve"), "bench", *args]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return " ".join(["moecarve", "bench", *(str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in args)])


def measure(threads: str, rounds: int, llama_bench: Path) -> None:
    main, eager = ROOT / "out" / "decode-main.json", ROOT / "out" / "decode-eager.json"
    c1 = bench([str(MODEL), "--carve", *map(str, CARVES), "--threads", threads, "--batch", "1,8", "--precision",
                "bf16,int8,fp32", "--llama-bench", str(llama_bench), "--gguf", *map(str, GGUFS), "--rounds", str(rounds),
                "--json", str(main)])  # fmt: skip
    c2 = bench([str(MODEL), "--carve", str(CARVES[1]), "--threads", threads, "--batch", "1,8", "--precision", "bf16,fp32",
                "--hf-eager", "--rounds", "1", "--json", str(eager)])  # fmt: skip
    merge(main, eager, [c1, c2])


def merge(main: Path, eager: Path, commands: list[str]) -> None:
    a, b = json.loads(main.read_text()), json.loads(eager.read_text())
    doc = {
        "machine": f"{a['machine']}, 2-core 24 GiB VM", "date": datetime.date.today().isoformat(),
        "model": "SmolLM2-135M-Instruct (models/smollm2/hf); F16 / Q8_0 GGUFs converted from it by llama.cpp's "
                 "convert_hf_to_gguf.py, Q4_1 from ../shared/models/get.sh",
        "commands": commands,
        "rows": a["rows"] + [r for r in b["rows"] if r["engine"] == "hf-eager"],
    }  # fmt: skip
    OUT.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {OUT} ({len(doc['rows'])} rows)")


def table(doc: dict, threads: int) -> str:
    """Markdown: batch-1 pp512 / tg128 and batch-8 tg128 at `threads`, each row against llama.cpp's
    peer (F16 for bf16 and fp32, Q8_0 for int8) and the runtime's dense row of its precision."""
    rows = [r for r in doc["rows"] if r["threads"] == threads]

    def get(engine, carve, prec, batch, test):
        return next((r["tok_s"] for r in rows if (r["engine"], r["carve"], r["precision"], r["batch"], r["test"]) ==
                     (engine, carve, prec, batch, test)), None)  # fmt: skip

    def f(v, spec="{:.0f}"):
        return "—" if v is None else spec.format(v)

    active = {"dense": "100%", "S0A768E1536": "50%", "S0A384E1536": "25%", "S0A192E1536": "12.5%"}
    peer = {"bf16": "F16", "int8": "Q8_0", "fp32": "F16"}
    lines = ["| engine | weights | model | pp512 tok/s | tg128 tok/s | tg ×llama.cpp | tg ×dense (same engine) | "
             "batch 8 tg tok/s | b8 ×dense |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for typ in ("F16", "Q8_0", "Q4_1"):
        lines.append(f"| llama.cpp | {typ} | dense | {f(get('llama.cpp', 'dense', typ, 1, 'pp512'))} | "
                     f"{f(get('llama.cpp', 'dense', typ, 1, 'tg128'))} | | | | |")  # fmt: skip
    for engine, precs in (("moecarve", ("bf16", "int8", "fp32")), ("hf-eager", ("bf16", "fp32"))):
        for prec in precs:
            dense_tg, dense_b8 = get(engine, "dense", prec, 1, "tg128"), get(engine, "dense", prec, 8, "tg128")
            for carve, act in active.items():
                tg = get(engine, carve, prec, 1, "tg128")
                if tg is None:
                    continue
                b8 = get(engine, carve, prec, 8, "tg128")
                llama = get("llama.cpp", "dense", peer[prec], 1, "tg128")
                name = "runtime" if engine == "moecarve" else "transformers eager"
                lines.append(
                    f"| {name} | {prec} | {'dense' if carve == 'dense' else f'carve {act} ({carve})'} | "
                    f"{f(get(engine, carve, prec, 1, 'pp512'))} | **{tg:.0f}** | "
                    f"{f(tg / llama if llama else None, '{:.2f}x')} ({peer[prec]}) | "
                    f"{'' if carve == 'dense' else f(tg / dense_tg if dense_tg else None, '{:.2f}x')} | {f(b8)} | "
                    f"{'' if carve == 'dense' else f(b8 / dense_b8 if b8 and dense_b8 else None, '{:.2f}x')} |"
                )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-bench", type=Path, default=LLAMA_BENCH)
    ap.add_argument("--table", action="store_true", help="only print the tables of bench/decode.json")
    ap.add_argument("--merge", nargs=2, metavar=("MAIN", "EAGER"), help="only merge two earlier --json files")
    ap.add_argument("--commands", nargs="*", default=[], help="with --merge: the commands that wrote them")
    args = ap.parse_args()
    if args.merge:
        merge(Path(args.merge[0]), Path(args.merge[1]), args.commands)
    elif not args.table:
        missing = [p for p in [MODEL, *CARVES, *GGUFS, args.llama_bench] if not p.exists()]
        if missing:
            sys.exit(f"missing: {', '.join(map(str, missing))} (bench/real_models.py makes the carves, "
                     "../shared/tools/llama-bench.sh builds llama-bench and its converter)")  # fmt: skip
        measure(args.threads, args.rounds, args.llama_bench)
    doc = json.loads(OUT.read_text())
    for threads in sorted({r["threads"] for r in doc["rows"]}, reverse=True):
        print(f"\n{doc['machine']}, {threads} thread(s), {doc['date']}:\n")
        print(table(doc, threads))


if __name__ == "__main__":
    main()
