"""Real models (SmolLM2-135M-Instruct, Gemma-3-270M): dense vs the CLI's default carves, and a recovered carve.

    python bench/real_models.py [--models smollm2,gemma3] [--fractions 0.125,0.25,0.5] [--recover smollm2:0.25]
                                [--out bench/real-models.json] [--work out/real] [--redo | --redo-carves] [--threads 2]

For each model folder (models/<name>/hf, fetched by ../shared/models/get.sh): the dense model's
perplexity, then `moecarve carve MODEL --active F` with every other setting the CLI's default, run
as the CLI itself (a subprocess, timed), and `moecarve finetune` on the carves named by --recover.
Perplexity follows the project's protocol: the first 100,000 characters of ../shared/corpus/test.txt,
windows of 512 tokens, float32, the reference forward (`moecarve eval DIR --ppl TEST --ppl-chars
100000 --ppl-seqlen 512`), compared with the dense HF folder. Also recorded per carve: the active
fraction (mean over layers weighted by FFN size, the lowest and highest layer, and what the routers
picked on the test text), FFN and whole-model bytes read per decoded token, carve and fine-tune wall
time, and decode speed: `tok_s` per precision, tg128 at batch 1 on the decode runtime (`moecarve bench
MODEL --carve ... --precision bf16,int8`, dense and every carve interleaved in one run; --speed-only
measures just that, on a quiet machine).

Results go to --out after every point; a point already there is kept unless --redo (so an
interrupted run continues). Calibration and fine-tuning read only ../shared/corpus/calib.txt
(the CLI's default corpus for carving is the same text, shipped with moecarve).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEST = SHARED / "corpus" / "test.txt"
CALIB = SHARED / "corpus" / "calib.txt"
PPL_CHARS, PPL_SEQLEN = 100_000, 512
MODELS = {"smollm2": ROOT / "models" / "smollm2" / "hf", "gemma3": ROOT / "models" / "gemma3" / "hf"}
# the fine-tune that brings the 25% SmolLM2 carve within 6% of dense in 30 minutes on 2 cores
# (README, "Recover"): flags after the carved folder, --calib and --out
RECOVER_FLAGS = ["--samples", "4096", "--seqlen", "512", "--batch-size", "2", "--lr", "4e-4", "--max-minutes", "28"]


def moecarve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "moecarve", *args]


def run(cmd: list[str], threads: int) -> float:
    """Run a command with `threads` torch threads; its wall time in seconds (it must succeed)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.perf_counter() - t0


def bytes_read(model, ffn_bytes: int | None = None) -> dict:
    """Bytes of weights read per decoded token: every tensor outside the FFNs (tied embeddings once:
    the output projection reads them all), plus the FFNs' (all of them for a dense model, else the
    carve report's active bytes)."""
    import torch

    from moecarve import adapters

    ffn_ids = set()
    for i, layer in enumerate(adapters.decoder_layers(model)):
        for path in adapters.replacements(model.config, i, torch.nn.Identity()):
            ffn_ids |= {id(t) for t in model.get_submodule(path).parameters()}
            ffn_ids |= {id(t) for t in model.get_submodule(path).buffers()}
    seen, rest, ffn = set(), 0, 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = t.numel() * t.element_size()
        if id(t) in ffn_ids:
            ffn += n
        else:
            rest += n
    ffn = ffn if ffn_bytes is None else ffn_bytes
    return {"ffn_bytes_per_token": ffn, "model_bytes_per_token": rest + ffn}


def evaluate(folder: Path, windows, threads: int) -> dict:
    """Perplexity of a dense or carved folder on the protocol windows (the reference forward, as
    `moecarve eval` runs it), with the routed experts each carved layer picked per test token."""
    import torch

    from moecarve.eval.perplexity import perplexity
    from moecarve.io.loading import load_any
    from moecarve.modules.moe import CarvedMoE

    torch.set_num_threads(threads)
    model, _ = load_any(str(folder), "float32", "cpu", kernels="none")
    picked = {}  # layer path -> [slots picked, tokens]

    def count(path):
        def hook(module, args, out):
            weights = out[0]  # (weights, idx), and with a tail the estimates
            c = picked.setdefault(path, [0, 0])
            c[0] += int((weights != 0).sum())
            c[1] += weights.shape[0]

        return hook

    moes = {n: m for n, m in model.named_modules() if isinstance(m, CarvedMoE)}
    handles = [m.router.register_forward_hook(count(n)) for n, m in moes.items()]
    t0 = time.perf_counter()
    ppl = perplexity(model, windows, batch_size=4)
    for h in handles:
        h.remove()
    out = {"ppl": ppl, "eval_seconds": time.perf_counter() - t0}
    if moes:  # neurons active per token on the test text, over all FFN neurons
        active = sum((picked[n][0] / picked[n][1] + m.spec.n_shared) * m.spec.expert_size for n, m in moes.items())
        width = sum((m.spec.n_shared + m.spec.n_routed) * m.spec.expert_size for m in moes.values())
        out["test_active_fraction"] = active / width
    report = folder / "carve_report.json"
    ffn = json.loads(report.read_text()).get("ffn_bytes_per_token") if report.exists() else None
    out.update(bytes_read(model, ffn))
    return out


def measured(folder: Path, head: dict, windows, dense_ppl: float, threads: int) -> dict:
    """A point: `head` (how it was made), its evaluation, its perplexity against dense; tok_s later."""
    point = {**head, **evaluate(folder, windows, threads)}
    point["vs_dense"] = point["ppl"] / dense_ppl - 1
    point["tok_s"] = None
    return point


def carve_fields(folder: Path) -> dict:
    r = json.loads((folder / "carve_report.json").read_text())
    layers = r["layers"]
    fracs = [x.get("active_fraction", 0.0) for x in layers]
    return {
        "config": r["config"], "carve_seconds": r["seconds"], "allocation_seconds": r.get("allocation_seconds", 0.0),
        "active_mean": r.get("active_fraction"), "active_lowest_layer": min(fracs), "active_highest_layer": max(fracs),
        "layer_active_fraction": fracs, "calibration": f"{r['n_windows']}x{r['seqlen']}",
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--fractions", default="0.125,0.25,0.5")
    ap.add_argument("--recover", default="smollm2:0.25", help="MODEL:FRACTION carves to fine-tune (comma-separated; '' for none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "real-models.json"))
    ap.add_argument("--work", default=str(ROOT / "out" / "real"), help="where the carved folders go")
    ap.add_argument("--redo", action="store_true", help="measure again the points already in --out")
    ap.add_argument("--redo-carves", action="store_true",
                    help="carve and measure the --fractions again (after the defaults changed), keeping dense and recovered points")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-only", action="store_true", help="only (re)measure tok_s of the points already there")
    ap.add_argument("--no-speed", action="store_true", help="leave tok_s as it is")
    ap.add_argument("--table", action="store_true", help="only print --out as the README's Markdown table")
    args = ap.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return

    from moecarve.eval.timing import cpu_name
    from moecarve.io.loading import load_any
    from moecarve.eval.perplexity import eval_windows

    out_path, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results["meta"] = {
        "protocol": f"perplexity on the first {PPL_CHARS} characters of corpus/test.txt, windows of {PPL_SEQLEN}, "
                    "float32, reference forward; carves: `moecarve carve MODEL --active F` (CLI defaults)",
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, {args.threads} threads", "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }  # fmt: skip
    models = results.setdefault("models", {})
    recover = {tuple(x.split(":")) for x in args.recover.split(",") if x}

    def save():
        out_path.write_text(json.dumps(results, indent=2) + "\n")

    for name in args.models.split(","):
        src = MODELS[name]
        if not (src / "config.json").exists():
            print(f"{src} is missing: fetch it with ../shared/models/get.sh {name} models/{name} .venv/bin/python")
            continue
        entry = models.setdefault(name, {"source": str(src.relative_to(ROOT)), "carves": {}, "recovered": {}})
        _, tok = load_any(str(src), "float32", "cpu")
        windows = eval_windows(tok, str(TEST), PPL_SEQLEN, PPL_CHARS)
        if args.redo or "dense" not in entry:
            entry["dense"] = {**evaluate(src, windows, args.threads), "tok_s": None}
            save()
        dense = entry["dense"]["ppl"]
        print(f"{name} dense {dense:.3f}", flush=True)
        for frac in [] if args.speed_only else args.fractions.split(","):
            key = f"{float(frac):g}"
            folder = work / f"{name}-{key}"
            if args.redo or args.redo_carves or key not in entry["carves"]:
                cmd = moecarve_cmd("carve", str(src), "--active", key, "--out", str(folder), "--overwrite")
                wall = run(cmd, args.threads)
                head = {"command": " ".join(["moecarve", *cmd[3:]]), "wall_seconds": wall, **carve_fields(folder)}
                entry["carves"][key] = measured(folder, head, windows, dense, args.threads)
                save()
            p = entry["carves"][key]
            print(f"{name} {key}: ppl {p['ppl']:.3f} ({p['vs_dense']:+.1%}), active {p['active_mean']:.3f} "
                  f"(lowest layer {p['active_lowest_layer']:.3f}), carve {p['carve_seconds']:.0f} s", flush=True)  # fmt: skip
            if (name, frac) in recover or (name, key) in recover:
                done = work / f"{name}-{key}-recovered"
                if args.redo or key not in entry["recovered"]:
                    cmd = moecarve_cmd("finetune", str(folder), "--calib", str(CALIB), "--out", str(done), "--overwrite",
                                       *RECOVER_FLAGS)  # fmt: skip
                    # a folder this very command wrote (its report there) is evaluated, not trained again
                    report_file = done / "finetune_report.json"
                    wall = run(cmd, args.threads) if args.redo or not report_file.exists() else None
                    rep = json.loads(report_file.read_text())
                    head = {"command": " ".join(["moecarve", *cmd[3:]]), "finetune_wall_seconds": wall,
                            "finetune_seconds": rep.get("seconds"), "steps": rep.get("steps"),
                            "train_tokens": rep.get("train_tokens")}  # fmt: skip
                    entry["recovered"][key] = measured(done, head, windows, dense, args.threads)
                    save()
                p = entry["recovered"][key]
                print(f"{name} {key} recovered: ppl {p['ppl']:.3f} ({p['vs_dense']:+.1%}), fine-tune "
                      f"{p['finetune_seconds']:.0f} s", flush=True)  # fmt: skip
        if not args.no_speed:
            speed(src, entry, work, name, args.threads)
            save()
    save()


def markdown(results: dict) -> str:
    """The README's table: per model, dense, each carve and each recovered carve."""
    lines = ["| model | carve | active (mean; lowest-highest layer) | perplexity | vs dense | FFN MB/token (fp32) | "
             "carve s | decode tok/s bf16 / int8 |", "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip

    def speeds(p):
        t = p.get("tok_s") or {}
        return " / ".join(f"{t[k]:.0f}" if t.get(k) else "—" for k in ("bf16", "int8"))

    def config(p):
        c = p["config"]
        return f"S{c['n_shared']}A{c['n_active']}E{c['n_experts']}" if isinstance(c, dict) else str(c)

    for name, e in results["models"].items():
        d = e["dense"]
        lines.append(f"| {name} | dense | 100% | {d['ppl']:.2f} | — | {d['ffn_bytes_per_token'] / 2**20:.0f} | — | {speeds(d)} |")
        for key, p in sorted(e["carves"].items(), key=lambda kv: float(kv[0])):
            lines.append(f"| {name} | {config(p)} | {p['active_mean']:.1%} ({p['active_lowest_layer']:.1%}-"
                         f"{p['active_highest_layer']:.1%}) | {p['ppl']:.2f} | {p['vs_dense']:+.1%} | "
                         f"{p['ffn_bytes_per_token'] / 2**20:.0f} | {p['carve_seconds']:.0f} | {speeds(p)} |")  # fmt: skip
            r = e["recovered"].get(key)
            if r:
                lines.append(f"| {name} | {config(p)} + LoRA ({r['finetune_seconds'] / 60:.0f} min, {r['steps']} steps) | "
                             f"{p['active_mean']:.1%} | {r['ppl']:.2f} | {r['vs_dense']:+.1%} | "
                             f"{r['ffn_bytes_per_token'] / 2**20:.0f} | — | {speeds(r)} |")  # fmt: skip
    return "\n".join(lines)


def speed(src: Path, entry: dict, work: Path, name: str, threads: int) -> None:
    """tok_s {precision: tg128 tok/s} of the dense model and each carve, one `moecarve bench` run."""
    points = {f"{name}-{k}": p for k, p in entry["carves"].items()}
    points |= {f"{name}-{k}-recovered": p for k, p in entry["recovered"].items()}
    folders = [str(work / f) for f in points if (work / f / "config.json").exists()]
    out = work / f"{name}-speed.json"
    run(moecarve_cmd("bench", str(src), "--carve", *folders, "--precision", "bf16,int8", "--threads", str(threads),
                     "--rounds", "5", "--json", str(out)), threads)  # fmt: skip
    rows = [r for r in json.loads(out.read_text())["rows"] if r["test"] == "tg128" and r["batch"] == 1]
    for r in rows:
        p = entry["dense"] if r["carve"] == "dense" else points.get(r["model"])
        if p is not None:
            p.setdefault("tok_s", {})
            p["tok_s"] = {**(p["tok_s"] or {}), r["precision"]: r["tok_s"]}


if __name__ == "__main__":
    main()
