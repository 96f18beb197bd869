"""The frontier (issue 19) on the reference model: perplexity against measured decode speed, one run.

    python bench/frontier.py [--out out/frontier] [--threads 2] [--eval-chars 200000] [--quick] [--full]

Reference model, float32, calibration 8x512 tokens of calib.txt (seed 0), perplexity on the first
200,000 characters of test.txt at seq 512, decode speed on this machine on moecarve's decode
runtime in bf16, the path generate() and serve take (moecarve.eval.frontier: each carve timed
interleaved with the dense model, tok/s beside the ratios). Candidates: dense; static width
pruning S2A0E8 / S4A0E8 / S6A0E8 (25/50/75%); "cmoe" and the default method at S1A1E8, S2A2E8;
the default at S0A32E128; single-neuron experts (the CLI's default grain) at 12.5 / 18.75 / 25 /
50 / 75% active, at 25% with top-A selection; the probe router at S0A32E128. --full adds the
coarser grains of the 2026-11-27 sweep (S3A3E8, S2A2E16, S0A16E64, S0A64E128, two-neuron experts).
Writes OUT/frontier.json (resumable: rerun to finish an interrupted sweep), frontier.md,
frontier.png; --commit copies the JSON to bench/frontier.json and the plot to
docs/frontier-reference-lm.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecarve.calibration import tokenize_windows  # noqa: E402
from moecarve.eval.bench import llama_references  # noqa: E402
from moecarve.eval.frontier import Candidate, FrontierConfig, frontier, pareto, table, write_outputs  # noqa: E402
from moecarve.eval.perplexity import test_windows  # noqa: E402

SHARED = ROOT.parent / "shared"
SINGLE = ("S0A192E1536", "S0A288E1536", "S0A384E1536", "S0A768E1536", "S0A1152E1536")  # 12.5 ... 75%
COARSE = ("S3A3E8", "S2A2E16", "S0A16E64", "S0A64E128", "S0A192E768")


def sweep(full: bool = False) -> tuple[Candidate, ...]:
    out = [Candidate("default", c) for c in ("S2A0E8", "S4A0E8", "S6A0E8")]
    for c in ("S1A1E8", "S2A2E8"):
        out += [Candidate("cmoe", c), Candidate("default", c)]
    out += [Candidate("default", "S0A32E128")]
    out += [Candidate("default", c) for c in SINGLE]
    out += [Candidate("topk", "S0A384E1536"), Candidate("probe", "S0A32E128")]
    if full:
        out += [Candidate(m, c) for c in COARSE for m in ("default", "cmoe")]
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "reference-lm"))
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "frontier")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="bf16", help="the decode runtime's weights (bf16, int8, fp32)")
    ap.add_argument("--full", action="store_true", help="also the coarse grains of the older sweep")
    ap.add_argument("--llama-bench", default=None, help="a llama-bench binary (with --gguf): reference lines")
    ap.add_argument("--gguf", nargs="*", default=[], help="GGUF files of the reference model for --llama-bench")
    ap.add_argument("--eval-chars", type=int, default=200_000)
    ap.add_argument("--speed-rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="four candidates, 20,000 characters: a smoke run")
    ap.add_argument("--commit", action="store_true", help="copy the JSON to bench/frontier.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    calib = tokenize_windows(tok, (SHARED / "corpus" / "calib.txt").read_text(), 8, 512, seed=0)
    chars = 20_000 if args.quick else args.eval_chars
    ev = test_windows(tok, (SHARED / "corpus" / "test.txt").read_text(), 512, chars)
    cands = sweep(args.full)
    if args.quick:
        cands = (Candidate("default", "S2A0E8"), Candidate("cmoe", "S1A1E8"), Candidate("default", "S1A1E8"),
                 Candidate("topk", "S0A384E1536"))  # fmt: skip
    cfg = FrontierConfig(candidates=cands, speed_rounds=args.speed_rounds, engine="runtime", precision=args.precision,
                         threads=args.threads)  # fmt: skip
    meta = {"eval_chars": chars, "eval_seqlen": 512, "dtype": "float32", "calib": "calib.txt 8x512 seed 0",
            "speed": f"decode runtime, {args.precision}, {args.threads} thread(s)"}  # fmt: skip
    points = frontier(model, tok, calib, ev, cfg, out_dir=args.out, model_name="../shared/reference-lm", meta=meta)
    wall = time.perf_counter() - t0
    # llama.cpp's dense decode of the same model: reference lines
    references = llama_references(args.llama_bench, args.gguf, args.threads) if args.gguf else {}
    paths = write_outputs(points, args.out, title=f"reference-lm: perplexity float32, decode on the runtime "
                          f"({args.precision}, {args.threads} thread(s))", references=references)  # fmt: skip
    front = pareto(points)
    print(table(points))
    print(f"\nfrontier ({len(front)} of {len(points)} points), fastest first:")
    for p in front:
        print(f"  {p.config:14s} {p.kind:9s} ppl {p.ppl:8.3f}  decode b1 {p.e2e_decode_b1:.2f}x "
              f"({p.tok_s_b1:.0f} tok/s)   {p.command}")  # fmt: skip
    data = json.loads((args.out / "frontier.json").read_text())
    data["meta"]["seconds_wall"] = round(wall, 1)
    data["meta"]["references"] = references
    (args.out / "frontier.json").write_text(json.dumps(data, indent=2))
    print(f"\nwall time {wall:.0f} s; {paths['table']}, {paths['plot']}")
    for speed, bound in ((1.10, 10.0), (1.20, 25.0)):
        best = min((p.ppl for p in points if p.kind != "dense" and p.e2e_decode_b1 >= speed), default=float("inf"))
        print(f"best perplexity at decode b1 >= {speed:.2f}x: {best:.3f} (target <= {bound})")
    if args.commit:
        shutil.copy(args.out / "frontier.json", ROOT / "bench" / "frontier.json")
        shutil.copy(args.out / "frontier.png", ROOT / "docs" / "frontier-reference-lm.png")


if __name__ == "__main__":
    main()
