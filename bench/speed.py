"""Speed (issue 10): dense FFN vs carved MoE vs an "ideal" narrower dense FFN, in one run.

    python bench/speed.py --device cpu                       # reference model, float32, < 60 s on 2 cores
    python bench/speed.py --device cuda --shape llama7b      # LLaMA-7B shapes, random bf16 weights
    python bench/speed.py --device cpu --configs S1A1E8 --json out/speed.json
    python bench/speed.py --device cpu --method cmoe --cpu-paths   # analytic routers; + forced CPU paths
    python bench/speed.py --device cpu --method fitted --carve shadow_bits=0   # the fitted probe router

Rows: `dense` (the model's own MLP), `ideal25/50/75` (the same MLP cut to its first 25/50/75% of
neurons: the speed a carved model would have with free routing) and one row per carving config,
run through `moecarve.modules.fast.use_kernels(backend="auto")` (CPU path on CPU, Triton decode
kernels on CUDA, the grouped-mm reference for prefill), plus `<first config>-torch`: the reference
forward, to show what the kernels buy. `--cpu-paths` adds `<first config>-gathered` / `-union`:
the CPU path with its T > 1 choice forced (see moecarve.kernels.cpu.use_union), to check the rule.
`--method` picks the carving recipe (default: CarveConfig's), `--carve KEY=VALUE` sets any other
CarveConfig field; the routers that gives (analytic, fitted, ...) are printed and kept in the JSON
meta: the kernels compute analytic/linear routers themselves and call any other router module.

Sections: the FFN of layer 0 alone on hidden states the dense model produces (decode: batch 1/8/32
tokens; prefill: 2048 tokens) and the
whole model (decode: one new token for each of B sequences with a KV cache; prefill: 2048 tokens,
logits of the last one only). Times are medians; `vs_dense` = dense ms / row ms (> 1 is faster).

Carving: each layer's FFN is carved with `carve_ffn` on its inputs from one dense forward over
random tokens (routing is realistic enough for speed; quality is bench/quality.py's business).

CPU: rows are interleaved round by round (a busy shared machine slows every row alike), FFN rows
run hot in cache (a 9 MB layer fits L3), whole-model rows are cache-cold as in real decode.
CUDA: bf16; decode steps use a StaticCache and torch.compile(mode="reduce-overhead"), FFN decode
rows are replayed from a CUDA graph; rows are measured one after another.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecarve import adapters  # noqa: E402
from moecarve.carving.methods import carve_ffn  # noqa: E402
from moecarve.config import METHODS, CarveConfig  # noqa: E402
from moecarve.eval.timing import cpu_name, decode_stepper, measure  # noqa: E402
from moecarve.kernels.cpu import CPU_MAX_TOKENS, moe_decode_cpu  # noqa: E402
from moecarve.modules.fast import _cached_tensors, use_kernels  # noqa: E402

REFERENCE_LM = ROOT.parent / "shared" / "reference-lm"
SECTIONS = (
    "ffn_decode_b1", "ffn_decode_b8", "ffn_decode_b32", "ffn_prefill_2048",
    "e2e_decode_b1", "e2e_decode_b8", "e2e_decode_b32", "e2e_prefill_2048",
)  # fmt: skip
PREFILL = 2048


# ------------------------------------------------------------------------------------------ models


def load_model(shape: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import transformers

    if shape == "reference":
        model = transformers.AutoModelForCausalLM.from_pretrained(REFERENCE_LM, dtype=dtype)
        return model.to(device).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device(device):  # random weights (speed does not care), initialised on the GPU
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def ffn_inputs(model: nn.Module, n_tokens: int) -> list[torch.Tensor]:
    """Every layer's FFN inputs [n_tokens, d] from one dense forward over random tokens."""
    layers = adapters.decoder_layers(model)
    xs: list[torch.Tensor] = [None] * len(layers)
    hooks = [
        adapters.ffn_input_module(model.config, layer).register_forward_pre_hook(
            lambda mod, args, i=i: xs.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]).detach())
        )
        for i, layer in enumerate(layers)
    ]
    ids = torch.randint(0, model.config.vocab_size, (1, n_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids.to(model.device), use_cache=False, logits_to_keep=1)
    for h in hooks:
        h.remove()
    return xs


def ideal_mlp(mlp: nn.Module, frac: float, proj: tuple[str, str, str]) -> nn.Module:
    """The same MLP keeping its first `frac` of neurons (a dense FFN of that width)."""
    small = copy.copy(mlp)  # shallow: new module dict entries below, the original is untouched
    small._modules = dict(mlp._modules)
    gate, up, down = (getattr(mlp, n) for n in proj)
    k = int(round(gate.out_features * frac))
    for name, lin, rows in ((proj[0], gate, True), (proj[1], up, True), (proj[2], down, False)):
        w = lin.weight.detach()
        new = nn.Linear(lin.in_features if rows else k, k if rows else lin.out_features, bias=lin.bias is not None)
        new = new.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w[:k] if rows else w[:, :k])
            if lin.bias is not None:
                new.bias.copy_(lin.bias[:k] if rows else lin.bias)
        small._modules[name] = new
    return small


def build_rows(
    model: nn.Module, configs: list[str], calib: int, carve: dict | None = None, cpu_paths: bool = False
) -> dict[str, list[nn.Module]]:
    """Row name -> one MLP module per layer (dense, ideal cuts, carved configs; `carve`: CarveConfig fields)."""
    a = adapters.adapter_for(model)
    if a.kind != "gated" or not a.mlp:
        raise SystemExit(f"bench/speed.py measures gated MLPs (LLaMA-like); got {model.config.model_type}")
    layers = adapters.decoder_layers(model)
    dense = [model.get_submodule(adapters.mlp_path(model.config, i)) for i in range(len(layers))]
    rows: dict[str, list[nn.Module]] = {"dense": dense}
    for pct in (25, 50, 75):
        rows[f"ideal{pct}"] = [ideal_mlp(m, pct / 100, a.proj) for m in dense]
    xs = ffn_inputs(model, calib)
    for i, name in enumerate(configs):
        cfg = CarveConfig.from_string(name, **(carve or {}))
        moes = []
        for j, layer in enumerate(layers):
            moes.append(carve_ffn(adapters.read_ffn(model.config, layer), xs[j], cfg, layer=j)[0].eval())
        for moe in moes:
            use_kernels(moe, "auto")
        rows[name] = moes
        if i == 0:  # the same modules through the reference forward: what the kernels add
            rows[f"{name}-torch"] = [_TorchPath(m) for m in moes]
            if cpu_paths:
                rows[f"{name}-gathered"] = [_ForcedCPUPath(m, "gathered") for m in moes]
                rows[f"{name}-union"] = [_ForcedCPUPath(m, "union") for m in moes]
    return rows


class _TorchPath(nn.Module):
    """Runs a CarvedMoE with its reference forward, without touching the shared module."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hook, self.moe.fast_forward = self.moe.fast_forward, None
        try:
            return self.moe(x)
        finally:
            self.moe.fast_forward = hook


class _ForcedCPUPath(nn.Module):
    """Runs a CarvedMoE through the CPU path with its T > 1 choice forced (T <= CPU_MAX_TOKENS)."""

    def __init__(self, moe: nn.Module, path: str):
        super().__init__()
        self.moe, self.path = moe, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > CPU_MAX_TOKENS or x.device.type != "cpu":
            return self.moe(x)
        return moe_decode_cpu(flat, _cached_tensors(self.moe), self.path).view(x.shape)


def install_row(model: nn.Module, modules: list[nn.Module]) -> None:
    for i, mod in enumerate(modules):
        model.set_submodule(adapters.mlp_path(model.config, i), mod)


# ------------------------------------------------------------------------------------------ timing


def cuda_graph(step: Callable[[], None]) -> Callable[[], None]:
    """Replay `step` from a CUDA graph (no launch overhead); eager if it cannot be captured."""
    try:
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
        return g.replay
    except Exception as e:  # e.g. a host sync in the reference path
        print(f"  (no CUDA graph: {type(e).__name__}; eager)", file=sys.stderr)
        return step


def ffn_section(rows, x: torch.Tensor, device, rounds, inner, graphs: bool) -> dict[str, float]:
    """The layer-0 FFN of every row on x [1, T, d]."""
    steps = {}
    for name, mods in rows.items():
        mod = mods[0]
        step = lambda mod=mod: mod(x)  # noqa: E731
        # the reference MoE forward syncs (bincount, grouped-mm sizes): never try to capture it
        graph = graphs and not name.endswith("-torch")
        steps[name] = (lambda: None, cuda_graph(step) if graph else step)
    return measure(steps, device, rounds, inner, interleave=device.type == "cpu")


def e2e_decode_section(model, rows, batch: int, device, rounds, inner, compile_: bool) -> dict[str, float]:
    """One decode step (B sequences, one new token each) on a warm KV cache, per row."""

    def make_row(mods):
        """(setup, step) for one row: its KV cache filled with the prompt, its forward."""
        install_row(model, mods)
        step = decode_stepper(model, batch, rounds * inner + 8, compile_=compile_)
        return (lambda: install_row(model, mods)), step

    if compile_:  # one row at a time: a fresh dynamo cache and one StaticCache alive (7B, B=32: 2 GB)
        out = {}
        for name, mods in rows.items():
            torch._dynamo.reset()
            out.update(measure({name: make_row(mods)}, device, rounds, inner, warmup=3, interleave=False))
            torch.cuda.empty_cache()
        return out
    steps = {name: make_row(mods) for name, mods in rows.items()}
    return measure(steps, device, rounds, inner, interleave=device.type == "cpu")


def e2e_prefill_section(model, rows, device, rounds) -> dict[str, float]:
    ids = torch.randint(0, model.config.vocab_size, (1, PREFILL), generator=torch.Generator().manual_seed(1)).to(device)
    warm = ids[:, :64]

    def run(x):
        with torch.no_grad():
            model(x, use_cache=False, logits_to_keep=1)

    steps = {}
    for name, mods in rows.items():
        install_row(model, mods)
        run(warm)  # first-call set-up (oneDNN primitives, kernels) off the clock
        steps[name] = (lambda mods=mods: install_row(model, mods), lambda: run(ids))
    return measure(steps, device, rounds, 1, warmup=0, interleave=device.type == "cpu")


# ------------------------------------------------------------------------------------------ output


def to_json(results: dict[str, dict[str, float]], device_name: str, meta: dict) -> dict:
    out = {"device": device_name, "meta": meta}
    for sec, times in results.items():
        d = times["dense"]
        out[sec] = {row: {"ms": round(ms, 4), "vs_dense": round(d / ms, 3)} for row, ms in times.items()}
    return out


def print_table(data: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    secs = [s for s in SECTIONS if s in data]
    table = Table(title=title)
    table.add_column("row")
    for s in secs:
        table.add_column(s.replace("_", " "), justify="right")
    for row in data[secs[0]]:
        cells = []
        for s in secs:
            c = data[s].get(row)
            cells.append("" if c is None else f"{c['ms']:.3g} ms ({c['vs_dense']:.2f}x)")
        table.add_row(row, *cells)
    Console(width=250).print(table)


def markdown_table(data: dict) -> str:
    """The same table in Markdown (for bench/RESULTS.md)."""
    secs = [s for s in SECTIONS if s in data]
    lines = ["| row | " + " | ".join(s.replace("_", " ") for s in secs) + " |", "|---" + "|---:" * len(secs) + "|"]
    for row in data[secs[0]]:
        cells = [f"{data[s][row]['ms']:.3g} ({data[s][row]['vs_dense']:.2f}x)" if row in data[s] else "" for s in secs]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--shape", choices=("reference", "llama7b"), help="default: reference on cpu, llama7b on cuda")
    p.add_argument("--configs", default="S1A1E8,S2A2E8,S3A3E8")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (torch.set_num_threads)")
    p.add_argument("--calib-tokens", type=int, default=256, help="FFN inputs each layer is carved on")
    p.add_argument("--method", choices=METHODS, default=None, help="carving recipe (default: CarveConfig's)")
    p.add_argument("--carve", action="append", default=[], metavar="KEY=VALUE", help="another CarveConfig field")
    p.add_argument("--cpu-paths", action="store_true", help="CPU: add rows with the gathered / union path forced")
    p.add_argument("--no-compile", action="store_true", help="CUDA: eager decode steps")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    shape = args.shape or ("reference" if device.type == "cpu" else "llama7b")
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cpu = device.type == "cpu"
    compile_ = not cpu and not args.no_compile
    sections = [s for s in args.sections.split(",") if s]
    sections.sort(key=lambda s: "prefill" in s)  # decode first: prefill's big buffers disturb the allocator
    configs = [c for c in args.configs.split(",") if c]

    model = load_model(shape, device, dtype)
    rows = build_rows(model, configs, args.calib_tokens, carve_overrides(args), args.cpu_paths and cpu)
    t_built = time.perf_counter()
    layer0_inputs = ffn_inputs(model, PREFILL)[0]  # [2048, d] (random tokens through the dense model)

    results: dict[str, dict[str, float]] = {}
    for sec in sections:
        kind, what, size = sec.split("_")
        n = int(size.lstrip("b"))
        with torch.no_grad():
            if kind == "ffn":
                x = layer0_inputs[:n].unsqueeze(0)  # [1, n, d] hidden states the model really produces
                if what == "decode":
                    r = ffn_section(rows, x, device, rounds=15 if cpu else 10, inner=10 if cpu else 100, graphs=not cpu)
                else:
                    r = ffn_section(rows, x, device, rounds=3 if cpu else 10, inner=1 if cpu else 5, graphs=False)
            elif what == "decode":
                rounds, inner = ({1: (30, 2), 8: (8, 3)}.get(n, (5, 3))) if cpu else (5, 20)  # b1: noisiest
                r = e2e_decode_section(model, rows, n, device, rounds, inner, compile_=compile_)
            else:
                r = e2e_prefill_section(model, rows, device, rounds=2 if cpu else 5)
        install_row(model, rows["dense"])
        results[sec] = r
        print(f"{sec}: " + ", ".join(f"{k} {v:.3g} ms" for k, v in r.items()), file=sys.stderr, flush=True)

    dev_name = torch.cuda.get_device_name(device) if not cpu else f"cpu ({args.threads} threads, {cpu_name()})"
    meta = {
        "shape": shape, "dtype": str(dtype).removeprefix("torch."), "configs": configs,
        "routers": {c: rows[c][0].spec.router for c in configs}, "carve": carve_overrides(args),
        "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_avg_1min": os.getloadavg()[0], "compile": compile_,
        "seconds_build": round(t_built - t_start, 1), "seconds_total": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    data = to_json(results, dev_name, meta)
    print_table(data, f"moecarve speed: {shape} {meta['dtype']} on {dev_name} (ms, median; x = dense / row)")
    print(f"built in {meta['seconds_build']} s, total {meta['seconds_total']} s, "
          f"load average {meta['load_avg_1min']:.2f}, routers {meta['routers']}")  # fmt: skip
    if args.markdown:
        print(markdown_table(data))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2))
    return data


def carve_overrides(args) -> dict:
    """--method and --carve KEY=VALUE as CarveConfig keyword arguments (typed like the field's default)."""
    out = {} if args.method is None else {"method": args.method}
    fields = CarveConfig.__dataclass_fields__
    for item in args.carve:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--carve {item}: CarveConfig has no field {key!r}")
        kind = type(fields[key].default)
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


if __name__ == "__main__":
    main()
