"""Carving quality on the reference model: reference CMoE vs each improvement vs the ceilings, one run.

    python bench/quality.py [--model ../shared/reference-lm] [--configs S3A3E8,S2A2E8,...]
                            [--eval-chars 200000] [--columns cmoe,profile_oracle,...] [--per-layer CONFIG]

Perplexity on the first --eval-chars characters of test.txt, seq 512, float32, after a carve on
8x512 calibration tokens of calib.txt (seed 0). Columns (each a fresh copy of the model):
  cmoe            the paper's algorithm (method "cmoe")
  profile_oracle  |h|-profile grouping, routing by the true |h| mass (the ceiling of that grouping)
  fitted_norefit  |h|-profile grouping + fitted probe router, no down_proj refit
  fitted          |h|-profile grouping + fitted probe router + ridge refit of down_proj (shadow_bits=0)
  shadow          the default "fitted" method: grouping + 4-bit shadow router + ridge refit
  threshold       the same, selecting by a per-layer threshold (A experts per token on average)
  fitted_oracle   the fitted carve with its router replaced by the oracle (refit kept)
  neuron_oracle   each token keeps its own top neurons by |h| at the same active fraction
Also prints the fitted router's recall of the oracle's top-A (calibration tokens, mean over layers)
and carve seconds. --per-layer CONFIG carves one layer at a time (the others dense) and prints
each layer's damage for cmoe and fitted.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from moecarve import adapters
from moecarve.calibration import tokenize_windows
from moecarve.capture import first_layer_inputs, run_layer
from moecarve.carve import carve
from moecarve.carving.methods import carve_ffn
from moecarve.carving.oracle import NeuronOracleFFN, OracleRouter
from moecarve.config import CarveConfig
from moecarve.eval.perplexity import perplexity, test_windows
from moecarve.modules.moe import CarvedMoE

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COLUMNS = ("cmoe", "fitted", "shadow", "profile_oracle", "neuron_oracle")
OPTIONAL = ("fitted_norefit", "fitted_oracle", "threshold")
CONFIGS = "S3A3E8,S2A2E8,S1A1E8,S2A2E16,S0A16E64,S0A32E128"


def load(path: str) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def swap_oracle(model) -> None:
    """Replace every carved layer's router by the oracle over its own experts."""
    for mod in model.modules():
        if isinstance(mod, CarvedMoE):
            mod.router = OracleRouter(mod.experts, mod.spec.top_k)


def neuron_oracle(model, fraction: float) -> None:
    cfg = model.config
    for i, layer in enumerate(adapters.decoder_layers(model)):
        adapters.install(model, i, NeuronOracleFFN(adapters.read_ffn(cfg, layer), fraction))


def column(name: str, spec: str, args, calib, ev) -> tuple[float, float, float | None]:
    """(perplexity, carve seconds, mean router recall or None) of one column at one config."""
    model = load(args.model)
    t0 = time.perf_counter()
    recall = None
    if name == "neuron_oracle":
        neuron_oracle(model, CarveConfig.from_string(spec).active_fraction)
    else:
        if name == "cmoe":
            cfg = CarveConfig.from_string(spec, method="cmoe")
        elif name in ("shadow", "threshold"):
            cfg = CarveConfig.from_string(spec, method="fitted", shadow_bits=4, selection="topk" if name == "shadow" else name)
        else:
            cfg = CarveConfig.from_string(spec, method="fitted", shadow_bits=0, refit=name in ("fitted", "fitted_oracle"))
        report = carve(model, cfg, calib, device="cpu", progress=False)
        recs = [r.router_recall for r in report.layers if r.router_recall is not None]
        recall = sum(recs) / len(recs) if recs else None
        if name in ("fitted", "shadow", "threshold") and not cfg.static:  # per-layer diagnostics: router recall, held-out FFN error before/after the refit
            print(f"  {spec} fitted per layer: " + "  ".join(
                f"L{r.layer} recall {r.router_recall:.3f} err {r.refit_error[0]:.3f}->{r.refit_error[1]:.3f}"
                for r in report.layers), flush=True)  # fmt: skip
        if name.endswith("oracle"):
            swap_oracle(model)
    seconds = time.perf_counter() - t0
    picked = watch_selection(model) if name == "threshold" else None
    ppl = perplexity(model, ev, batch_size=4)
    if picked:  # the threshold's mean count on the evaluation text, against the A it was calibrated for
        n = torch.cat(picked).mean().item()
        print(f"  {spec} {name}: routed experts per token on the evaluation text {n:.2f} "
              f"(calibrated for A = {CarveConfig.from_string(spec).n_active})", flush=True)  # fmt: skip
    return ppl, seconds, recall


def watch_selection(model) -> list[torch.Tensor]:
    """A list that fills with each routed token's number of picked experts (nonzero weights) as the model runs."""
    counts: list[torch.Tensor] = []
    for mod in model.modules():
        if isinstance(mod, CarvedMoE):
            mod.router.register_forward_hook(lambda m, a, out: counts.append((out[0] != 0).sum(-1).float()))
    return counts


@torch.no_grad()
def per_layer(spec: str, method: str, args, calib, ev) -> list[float]:
    """Perplexity with only layer i carved (sequential inputs up to it), for each layer i."""
    out = []
    n = len(adapters.decoder_layers(load(args.model)))
    for i in range(n):
        model = load(args.model)
        layers = adapters.decoder_layers(model)
        inputs = first_layer_inputs(model, calib, torch.device("cpu"))
        for j in range(i):
            inputs.hidden, _ = run_layer(layers[j], inputs, torch.device("cpu"))
        _, x = run_layer(layers[i], inputs, torch.device("cpu"), capture=adapters.ffn_input_module(model.config, layers[i]))
        moe, _ = carve_ffn(adapters.read_ffn(model.config, layers[i]), x, CarveConfig.from_string(spec, method=method), i)
        adapters.install(model, i, moe)
        out.append(perplexity(model, ev, batch_size=4))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(SHARED / "reference-lm"))
    ap.add_argument("--calib", default=str(SHARED / "corpus" / "calib.txt"))
    ap.add_argument("--test", default=str(SHARED / "corpus" / "test.txt"))
    ap.add_argument("--configs", default=CONFIGS)
    ap.add_argument("--columns", default=",".join(COLUMNS))
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-chars", type=int, default=200_000)
    ap.add_argument("--per-layer", default=None, metavar="CONFIG")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    calib = tokenize_windows(tok, Path(args.calib).read_text(), args.samples, args.seqlen, seed=0)
    ev = test_windows(tok, Path(args.test).read_text(), 512, args.eval_chars)
    print(f"dense perplexity: {perplexity(load(args.model), ev, batch_size=4):.4f}  "
          f"({ev.shape[0]}x512 eval tokens, {calib.shape[0]}x{calib.shape[1]} calibration tokens)", flush=True)  # fmt: skip
    if args.per_layer:
        for method in ("cmoe", "fitted"):
            ppl = per_layer(args.per_layer, method, args, calib, ev)
            print(f"per-layer damage {args.per_layer} {method}: " + " ".join(f"L{i}={p:.3f}" for i, p in enumerate(ppl)), flush=True)
    cols = [c for c in args.columns.split(",") if c]
    timed = [c for c in cols if c in ("fitted", "shadow", "threshold")]  # columns whose router recall and carve time we report
    extra = [f"{c} recall" for c in timed] + [f"{c} carve s" for c in timed]
    print("| config | " + " | ".join(cols + extra) + " |", flush=True)
    print("|---" * (len(cols) + len(extra) + 1) + "|", flush=True)
    neuron_cache: dict[float, float] = {}  # the neuron-level oracle depends only on the active fraction
    for spec in [s for s in args.configs.split(",") if s]:
        cells, recalls, secs = [], {}, {}
        frac = CarveConfig.from_string(spec).active_fraction
        for c in cols:
            if c == "neuron_oracle" and frac in neuron_cache:
                cells.append(f"{neuron_cache[frac]:.2f}")
                continue
            ppl, s, r = column(c, spec, args, calib, ev)
            print(f"  {spec} {c}: perplexity {ppl:.3f}, {s:.1f} s" + (f", router recall {r:.3f}" if r is not None else ""), flush=True)
            if c == "neuron_oracle":
                neuron_cache[frac] = ppl
            cells.append(f"{ppl:.2f}")
            recalls[c], secs[c] = r, s
        cells += [f"{recalls[c]:.3f}" for c in timed] + [f"{secs[c]:.1f}" for c in timed]
        print(f"| {spec} | " + " | ".join(cells) + " |", flush=True)

if __name__ == "__main__":
    main()
