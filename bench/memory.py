"""Benchmark (issue 11): peak memory and time of in-memory vs streamed carving.

Builds a random LLaMA-architecture model (default 12 layers, hidden 1536, intermediate 4096,
float32, ~1.4 GB on disk), then carves it on the CPU at S2A2E8 with 4x512 calibration tokens,
each way in a fresh subprocess, and prints peak RSS (VmHWM of /proc/self/status; not
ru_maxrss, which a child inherits from its parent across exec) and time.
"peak" is the whole process; "peak - imports" subtracts the RSS after importing torch,
transformers and moecarve (the same for any model size).

    python bench/memory.py [--layers 12 --hidden 1536 --intermediate 4096 --workdir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
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
mode, src, out = sys.argv[1:4]
base = hwm()
cfg = CarveConfig.from_string("S2A2E8")
windows = torch.randint(0, 8192, (4, 512), generator=torch.Generator().manual_seed(0))
t0 = time.perf_counter()
if mode == "in-memory":
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    report = carve(model, cfg, windows, device="cpu", progress=False)
    save(model, out, report=report)
else:
    carve_streamed(src, cfg, windows, out, device="cpu", progress=False)
seconds = time.perf_counter() - t0
peak = hwm()
print(json.dumps({"mode": mode, "seconds": seconds, "peak_kib": peak, "base_kib": base}))
"""


def build_model(folder: Path, layers: int, hidden: int, intermediate: int) -> int:
    """Save a random LLaMA model (seed 0) to `folder`; returns its weight bytes on disk."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 128,
                                   num_key_value_heads=hidden // 128, max_position_embeddings=1024,
                                   tie_word_embeddings=True)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--workdir", default=None, help="where the model and outputs go (default: a temporary folder)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moecarve-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        size = build_model(work / "dense", args.layers, args.hidden, args.intermediate)
        print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, float32, {size / 1e9:.2f} GB on disk")
        rows = []
        for mode in ("in-memory", "streamed"):
            res = subprocess.run([sys.executable, "-c", _CHILD, mode, str(work / "dense"), str(work / mode)],
                                 capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
            if res.returncode:
                sys.exit(f"{mode} failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print("| mode | peak RSS (GB) | peak - imports (GB) | peak / model size | (peak - imports) / model size | time (s) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            peak, grown = r["peak_kib"] * 1024, (r["peak_kib"] - r["base_kib"]) * 1024
            print(f"| {r['mode']} | {peak / 1e9:.3f} | {grown / 1e9:.3f} | {peak / size:.1%} | {grown / size:.1%} | {r['seconds']:.1f} |")
        print(f"streamed / in-memory time: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
