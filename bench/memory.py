"""Benchmark (issue 11): peak memory and time of in-memory vs streamed carving.

Builds a random LLaMA-architecture model (default 12 layers, hidden 1536, intermediate 4096,
float32, ~1.4 GB on disk), then carves it on the CPU at S2A2E8 with 4x512 calibration tokens,
each method and mode in a fresh subprocess (one thread by default), and prints peak RSS (VmHWM of
/proc/self/status; not ru_maxrss, which a child inherits from its parent across exec) and time.
"peak" is the whole process; "peak - imports" subtracts the RSS after importing torch,
transformers and moecarve (the same for any model size).

Modes: "in-memory" (from_pretrained + carve + save), "streamed" (carve_streamed, as shipped),
"streamed-untuned" (carve_streamed(tune_allocator=False): glibc's default malloc settings).

    python bench/memory.py [--layers 12 --hidden 1536 --intermediate 4096 --methods cmoe,fitted
                            --modes in-memory,streamed --repeat 1 --samples 4 --seqlen 512
                            --threads 1 --workdir /tmp/x]

One 7B-shaped layer with the issue's GPU calibration (8x2048 tokens), streamed only:
    python bench/memory.py --layers 1 --hidden 4096 --intermediate 11008 --samples 8 --seqlen 2048 \
                           --methods fitted --modes streamed --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, re, sys, time, torch
torch.set_num_threads(1)
def hwm():  # peak RSS of this process in KiB: VmHWM is per address space (ru_maxrss survives exec)
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
import transformers
from moecarve import CarveConfig, carve, save
from moecarve.stream import carve_streamed
transformers.LlamaForCausalLM  # import the model code before measuring the baseline
method, mode, src, out = sys.argv[1:5]
samples, seqlen, threads = map(int, sys.argv[5:8])
torch.set_num_threads(threads)
base = hwm()
cfg = CarveConfig.from_string("S2A2E8", method=method)
windows = torch.randint(0, 8192, (samples, seqlen), generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
if mode == "in-memory":
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    report = carve(model, cfg, windows, device="cpu", progress=False)
    save(model, out, report=report)
else:
    carve_streamed(src, cfg, windows, out, device="cpu", progress=False, tune_allocator=mode == "streamed")
seconds = time.perf_counter() - t0
peak = hwm()
print(json.dumps({"method": method, "mode": mode, "seconds": seconds, "peak_kib": peak, "base_kib": base}))
"""


def build_model(folder: Path, layers: int, hidden: int, intermediate: int) -> int:
    """Save a random LLaMA model (seed 0) to `folder`; returns its weight bytes on disk."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                   num_key_value_heads=hidden // 128, max_position_embeddings=4096,
                                   tie_word_embeddings=True)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_child(method: str, mode: str, work: Path, args: argparse.Namespace) -> dict:
    """One carve into work/METHOD-MODE in a fresh process (OMP_NUM_THREADS=threads); returns its JSON line."""
    out = work / f"{method}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    child_args = [method, mode, str(work / "dense"), str(out), str(args.samples), str(args.seqlen), str(args.threads)]
    res = subprocess.run([sys.executable, "-c", _CHILD, *child_args],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], env=env)  # fmt: skip
    if res.returncode:
        sys.exit(f"{method} {mode} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two saved models hold bit-identical tensors (read one tensor at a time)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for name in ia:
        with safe_open(str(ia[name]), "pt") as ha, safe_open(str(ib[name]), "pt") as hb:
            if not ha.get_tensor(name).equal(hb.get_tensor(name)):
                return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--samples", type=int, default=4, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each carve")
    p.add_argument("--methods", default="cmoe,fitted", help="carving methods, comma-separated")
    p.add_argument("--modes", default="in-memory,streamed", help="in-memory, streamed, streamed-untuned; comma-separated")
    p.add_argument("--repeat", type=int, default=1, help="runs of each mode (alternating order); times: the fastest")
    p.add_argument("--workdir", default=None, help="where the model and outputs go (default: a temporary folder)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moecarve-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        size = build_model(work / "dense", args.layers, args.hidden, args.intermediate)
        print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, float32, {size / 1e9:.2f} GB on disk; "
              f"calibration {args.samples}x{args.seqlen} tokens, {args.threads} thread(s)")  # fmt: skip
        rows, identical = [], {}
        modes = args.modes.split(",")
        for method in args.methods.split(","):
            for rep in range(args.repeat):
                order = modes if rep % 2 == 0 else modes[::-1]  # alternate, so that load drift hits both modes
                rows += [{**run_child(method, mode, work, args), "run": rep + 1} for mode in order]
                if "in-memory" in modes:
                    for m in modes:
                        if m != "in-memory":
                            same = same_tensors(work / f"{method}-in-memory", work / f"{method}-{m}")
                            identical[method, m] = identical.get((method, m), True) and same
                for mode in modes:
                    shutil.rmtree(work / f"{method}-{mode}", ignore_errors=True)  # only the measurements are kept
        print("| method | mode | run | peak RSS (GB) | peak - imports (GB) | peak / model size | (peak - imports) / model size | time (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            peak, grown = r["peak_kib"] * 1024, (r["peak_kib"] - r["base_kib"]) * 1024
            print(f"| {r['method']} | {r['mode']} | {r['run']} | {peak / 1e9:.3f} | {grown / 1e9:.3f} | {peak / size:.1%} | {grown / size:.1%} | {r['seconds']:.1f} |")
        fastest: dict[tuple[str, str], float] = {}
        for r in rows:  # the fastest run of each: the least disturbed by other processes
            key = (r["method"], r["mode"])
            fastest[key] = min(fastest.get(key, float("inf")), r["seconds"])
        for (method, mode), t in fastest.items():
            if mode != "in-memory" and (method, "in-memory") in fastest:
                same = "bit-identical" if identical[method, mode] else "DIFFERENT"
                print(f"{method}: {mode} / in-memory time (fastest of {args.repeat}): "
                      f"{t / fastest[method, 'in-memory']:.2f}x; output {same} to in-memory")  # fmt: skip
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
