"""The quality / speed frontier of carving one model on this machine.

`frontier(model, tokenizer, calibration, eval_windows, FrontierConfig(...))` carves every
candidate (a carving recipe at a configuration), measures its perplexity on held-out text and its
decode speed against the dense model (decoding the evaluation text), interleaved with it in the
same run, and marks the Pareto frontier: the carves no other point beats on perplexity and
whole-model decode speed at once. Decode speed is the fastest path each side has: both on
moecarve's native decode runtime (engine "runtime", the default on CPU: what generate() and serve
run) or, with engine "hf", transformers' forward with the shipped kernels bound. Speeds are kept
as ratios (dense ms / carved ms, same minute) and as tokens per second: the axis of the plot is
the ratio times the dense runtime's median tok/s over the sweep, beside reference lines (the
dense runtime, llama.cpp's figures when given). Static width pruning (A = 0) and the dense model are points
too, so a carve is on the frontier only where it is faster than dense at a quality nothing
cheaper reaches.

Shared across candidates: the tokenized calibration and evaluation windows, and the dense model's
perplexity. Each speed figure is the median of per-round ratios, the dense and carved models timed
back to back in every round. Each carve is its own sequential pass: layer l is carved on the outputs of the carved
layers 0..l-1, which differ from config to config, so beyond the first layer no statistic is the
same for two configs. Speed ratios are measured against the dense model in the same minute,
which makes them comparable across candidates on a busy machine.

Results go to OUT/frontier.json after every candidate (atomically), so an interrupted sweep
resumes where it stopped; `write_outputs` adds frontier.md and frontier.png.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import adapters
from ..carve import carve
from ..config import CarveConfig
from ..errors import MoecarveError
from ..modules.fast import use_kernels
from .perplexity import perplexity
from .timing import cpu_name, decode_stepper, ffn_stepper, paired_ratio, runtime_stepper

# recipe name -> (CarveConfig fields, the `moecarve carve` flags that give them)
METHODS: dict[str, tuple[dict, str]] = {
    "default": ({}, ""),
    "topk": ({"selection": "topk"}, "--selection topk"),
    "probe": ({"shadow_bits": 0}, "--shadow-bits 0"),
    "cmoe": ({"method": "cmoe"}, "--method cmoe"),
}
SPEEDS = ("ffn_decode_b1", "e2e_decode_b1", "e2e_decode_b8")
ENGINES = ("runtime", "hf")
PRECISIONS = ("bf16", "int8", "fp32")


class FrontierError(MoecarveError, ValueError):
    """A frontier sweep that cannot run as asked."""


@dataclass(frozen=True)
class Candidate:
    """One carve to measure: a recipe (a METHODS name) at a configuration (S{N_s}A{A}E{N})."""

    method: str
    config: str

    def __post_init__(self):
        if self.method not in METHODS:
            raise FrontierError(f"unknown method {self.method!r}; choose among {', '.join(METHODS)}")
        CarveConfig.from_string(self.config)  # ConfigError when it does not parse

    @property
    def kind(self) -> str:
        """What the plot groups it with: "static" for A = 0 (no router), else the method."""
        return "static" if CarveConfig.from_string(self.config).static else self.method

    def carve_config(self, seed: int = 0) -> CarveConfig:
        return CarveConfig.from_string(self.config, seed=seed, **METHODS[self.method][0])

    def command(self, model: str, out: str | None = None) -> str:
        """The `moecarve carve` command that makes this carve."""
        flags = METHODS[self.method][1]
        out = out or f"{Path(model).name}-{self.config}" + ("" if self.method == "default" else f"-{self.method}")
        return " ".join(p for p in ("moecarve carve", model, "--config", self.config, flags, "--out", out) if p)


@dataclass
class Point:
    """One measured carve (or the dense model); speeds are dense ms / carved ms in the same run;
    tok_s_b1 / tok_s_b8 (and dense_tok_s_*) the carve's (and the dense model's) tokens per second in
    that run (0: not measured)."""

    method: str
    config: str
    kind: str
    ppl: float
    ffn_decode_b1: float = 1.0
    e2e_decode_b1: float = 1.0
    e2e_decode_b8: float = 1.0
    carve_seconds: float = 0.0
    tok_s_b1: float = 0.0
    tok_s_b8: float = 0.0
    dense_tok_s_b1: float = 0.0
    dense_tok_s_b8: float = 0.0
    on_frontier: bool = False
    command: str = ""
    measured: dict = field(default_factory=dict)  # ms of both models, when, load average


@dataclass(frozen=True)
class FrontierConfig:
    """What to sweep and how to measure it.

    candidates: the carves; ppl_batch: eval windows per forward; speed_rounds: interleaved timing
    rounds per speed figure (more: steadier on a busy machine); engine: "runtime" (whole-model
    decode on the native runtime in `precision`, both models) or "hf" (transformers' forward);
    kernels: the backend the carved FFNs run through for the FFN figure and engine "hf"
    (moecarve.use_kernels); threads: the runtime's (default: physical cores); seed: the carves'.
    """

    candidates: tuple[Candidate, ...]
    ppl_batch: int = 4
    speed_rounds: int = 15
    engine: str = "runtime"
    precision: str = "bf16"
    threads: int | None = None
    kernels: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if not self.candidates:
            raise FrontierError("no candidates to measure")
        if len(set(self.candidates)) != len(self.candidates):
            raise FrontierError("a candidate is listed twice")
        if self.speed_rounds < 3 or self.ppl_batch < 1:
            raise FrontierError("speed_rounds must be >= 3 and ppl_batch >= 1")
        if self.engine not in ENGINES:
            raise FrontierError(f"unknown engine {self.engine!r}; choose among {', '.join(ENGINES)}")
        if self.precision not in PRECISIONS:
            raise FrontierError(f"unknown precision {self.precision!r}; choose among {', '.join(PRECISIONS)}")


def candidates(configs: list[str], methods: list[str]) -> tuple[Candidate, ...]:
    """Every method at every config, except that static configs (A = 0) run once per distinct
    recipe that changes them (the router flags do not: "default" stands for "probe"/"topk")."""
    out = []
    for config in configs:
        static = CarveConfig.from_string(config).static
        for method in methods:
            if static and method in ("probe", "topk"):
                continue
            out.append(Candidate(method, config))
    return tuple(dict.fromkeys(out))


def pareto(points: list[Point]) -> list[Point]:
    """Mark (and return, fastest first) the points no other point beats on both axes: higher
    whole-model decode b1 speed and lower perplexity (equal on one, better on the other)."""
    for p in points:
        p.on_frontier = not any(
            q is not p and q.e2e_decode_b1 >= p.e2e_decode_b1 and q.ppl <= p.ppl
            and (q.e2e_decode_b1 > p.e2e_decode_b1 or q.ppl < p.ppl)
            for q in points
        )  # fmt: skip
    return sorted((p for p in points if p.on_frontier), key=lambda p: -p.e2e_decode_b1)


def ffn_inputs(model: nn.Module, text: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Hidden states [n, d] entering layer `layer`'s FFN when the dense model reads text [b, L]."""
    captured = []
    mod = adapters.ffn_input_module(model.config, adapters.decoder_layers(model)[layer])
    hook = mod.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            model(text.to(next(model.parameters()).device), use_cache=False, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[0]


def speed_ratios(dense: nn.Module, carved: nn.Module, text: torch.Tensor, rounds: int, engine: str = "runtime",
                 precision: str = "bf16", threads: int | None = None) -> tuple[dict[str, float], dict]:  # fmt: skip
    """Decode speed of `carved` relative to `dense` (dense ms / carved ms), each figure the median
    of per-round ratios with the two models timed back to back (eval.timing.paired_ratio): the FFN
    of layer 0 alone on one real token (transformers' modules), the whole model decoding real text
    (windows [>= 8, L]) for 1 and 8 sequences on a KV cache, on the decode runtime (engine
    "runtime", in `precision`) or transformers' forward ("hf"). Returns (ratios, {figure: {"dense":
    ms, "carved": ms}})."""
    device = next(dense.parameters()).device
    if engine == "runtime" and device.type != "cpu":
        raise FrontierError(f"the decode runtime runs on CPU, the models are on {device}: use engine 'hf'")
    x = ffn_inputs(dense, text[:1, :64])[40:41].unsqueeze(0)  # one token with context, [1, 1, d]
    mlp = [m.get_submodule(adapters.mlp_path(m.config, 0)) for m in (dense, carved)]
    if engine == "runtime":
        def e2e(m, batch, steps):  # noqa: E306
            return runtime_stepper(m, batch, steps, text, precision, threads)
    else:
        def e2e(m, batch, steps):  # noqa: E306
            return decode_stepper(m, batch, steps, text=text)
    # the runtime's steps are ~10x shorter than transformers': more calls per round
    inner = 8 if engine == "runtime" else 1
    plans = {
        "ffn_decode_b1": ([ffn_stepper(f, x) for f in mlp], rounds, 10),
        "e2e_decode_b1": ([e2e(m, 1, 8 * rounds * inner + 8) for m in (dense, carved)], 4 * rounds, 2 * inner),
        "e2e_decode_b8": ([e2e(m, 8, 3 * rounds * inner + 8) for m in (dense, carved)], rounds, 3 * inner),
    }  # fmt: skip
    ratios, ms = {}, {}
    for name, ((base, other), n_rounds, n_inner) in plans.items():
        ratios[name], ms_dense, ms_carved = paired_ratio(base, other, device, n_rounds, n_inner)
        ms[name] = {"dense": round(ms_dense, 4), "carved": round(ms_carved, 4)}
    return ratios, ms


def tok_s(ms: dict) -> dict[str, float]:
    """Tokens per second of both models from speed_ratios' step times (batch 1 and 8)."""
    out = {}
    for b in (1, 8):
        step = ms[f"e2e_decode_b{b}"]
        out[f"tok_s_b{b}"] = round(1000 * b / step["carved"], 2)
        out[f"dense_tok_s_b{b}"] = round(1000 * b / step["dense"], 2)
    return out


def dense_tok_s(points: list[Point], batch: int = 1) -> float:
    """The dense model's decode tok/s over the sweep: the median of its figure in every carve's run."""
    import statistics

    values = [getattr(p, f"dense_tok_s_b{batch}") for p in points if p.kind != "dense" and getattr(p, f"dense_tok_s_b{batch}")]
    return statistics.median(values) if values else 0.0


def axis_tok_s(p: Point, reference: float) -> float:
    """A point's position on the plot's speed axis: its speed ratio times the dense model's median
    tok/s (a figure comparable across the sweep's minutes), or the ratio alone without tok/s."""
    return p.e2e_decode_b1 * reference if reference else p.e2e_decode_b1


def _machine() -> dict:
    return {
        "platform": platform.platform(), "processor": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }  # fmt: skip


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def load_points(path: Path) -> tuple[dict, list[Point]]:
    """(meta, points) of a frontier.json."""
    data = json.loads(Path(path).read_text())
    return data.get("meta", {}), [Point(**p) for p in data.get("points", [])]


@torch.no_grad()
def frontier(
    model: nn.Module, tokenizer, calibration: torch.Tensor, eval_windows: torch.Tensor, config: FrontierConfig,
    out_dir: str | Path | None = None, model_name: str = "MODEL", meta: dict | None = None, progress: bool = True,
) -> list[Point]:  # fmt: skip
    """Measure every candidate against the dense `model` (left unchanged); returns all points,
    dense first, with `on_frontier` marked. With `out_dir`, frontier.json is rewritten after every
    point; points already there are not measured again (the file must have been written with the
    same model, windows and `meta` settings: FrontierError otherwise) and are kept."""
    if eval_windows.shape[0] < 8 or eval_windows.shape[1] < 64:
        raise FrontierError(f"the evaluation text gives {eval_windows.shape[0]} windows of {eval_windows.shape[1]} tokens; "
                            "decode speed is timed on 8 of them of at least 64 tokens")  # fmt: skip
    out = Path(out_dir) if out_dir is not None else None
    settings = {"model": model_name, "calibration": list(calibration.shape), "eval_windows": list(eval_windows.shape),
                **(meta or {})}  # what a point means: a resumed sweep must match it  # fmt: skip
    meta = {**_machine(), **settings, "engine": config.engine, "precision": config.precision}
    done: dict[tuple[str, str], Point] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "frontier.json").exists():
            old_meta, old = load_points(out / "frontier.json")
            changed = [k for k in settings if old_meta.get(k) != settings[k]]
            if changed:
                raise FrontierError(f"{out / 'frontier.json'} was measured with other settings ({', '.join(changed)}); "
                                    "use another output folder, or remove it to start over")  # fmt: skip
            done = {(p.method, p.config): p for p in old}

    def save(points: list[Point]) -> None:
        pareto(points)
        for b in (1, 8):  # the dense point's own tok/s: its median over the carves' runs
            setattr(points[0], f"tok_s_b{b}", dense_tok_s(points, b))
        if out is not None:
            _write_json(out / "frontier.json", {"meta": meta, "points": [asdict(p) for p in points]})

    model.eval()
    if ("dense", "dense") in done:
        points = [done[("dense", "dense")]]
    else:
        points = [Point("dense", "dense", "dense", perplexity(model, eval_windows, config.ppl_batch))]
        save(points)
    bar = tqdm(config.candidates, desc="frontier", unit="carve", disable=not progress)
    for cand in bar:
        bar.set_postfix_str(f"{cand.method} {cand.config}")
        if (cand.method, cand.config) in done:
            points.append(done[(cand.method, cand.config)])
            continue
        carved = copy.deepcopy(model)
        t0 = time.perf_counter()
        carve(carved, cand.carve_config(config.seed), calibration, device=next(model.parameters()).device, progress=False)
        seconds = time.perf_counter() - t0
        ppl = perplexity(carved, eval_windows, config.ppl_batch)
        use_kernels(carved, config.kernels)
        ratios, ms = speed_ratios(model, carved, eval_windows, config.speed_rounds, config.engine, config.precision,
                                  config.threads)  # fmt: skip
        point = Point(
            cand.method, cand.config, cand.kind, ppl, **ratios, **tok_s(ms), carve_seconds=round(seconds, 1),
            command=cand.command(model_name), measured={"ms": ms, "load_avg_1min": _load()},
        )  # fmt: skip
        points.append(point)
        save(points)
        bar.write(f"  {cand.method:9s} {cand.config:14s} ppl {ppl:9.3f}  ffn b1 {ratios['ffn_decode_b1']:.2f}x  "
                  f"e2e b1 {ratios['e2e_decode_b1']:.2f}x ({point.tok_s_b1:.0f} vs {point.dense_tok_s_b1:.0f} tok/s)  "
                  f"b8 {ratios['e2e_decode_b8']:.2f}x  ({seconds:.0f} s carve)")  # fmt: skip
        del carved
    listed = {(c.method, c.config) for c in config.candidates} | {("dense", "dense")}
    points += [p for key, p in done.items() if key not in listed]  # earlier points of other candidates stay
    save(points)
    return points


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ outputs


def table(points: list[Point]) -> str:
    """The points as a Markdown table, dense first then by whole-model decode speed."""
    rows = [p for p in points if p.kind == "dense"] + sorted((p for p in points if p.kind != "dense"),
                                                              key=lambda p: -p.e2e_decode_b1)  # fmt: skip
    ref = dense_tok_s(points)
    lines = ["| method | config | perplexity | FFN decode b1 | decode b1 | decode b8 | decode tok/s b1 | carve s | frontier |",
             "|---|---|---:|---:|---:|---:|---:|---:|:---:|"]  # fmt: skip
    for p in rows:
        speed = f"{axis_tok_s(p, ref):.1f}" if ref else "—"
        lines.append(
            f"| {label(p)} | {p.config} | {p.ppl:.3f} | {p.ffn_decode_b1:.2f}x | {p.e2e_decode_b1:.2f}x | "
            f"{p.e2e_decode_b8:.2f}x | {speed} | {p.carve_seconds:.0f} | {'**yes**' if p.on_frontier else ''} |"
        )  # fmt: skip
    if ref:
        lines.append(f"\ndecode tok/s b1: each carve's speed ratio times the dense model's median {ref:.1f} tok/s in the same runs")
    return "\n".join(lines)


def label(p: Point) -> str:
    """A point's recipe as the table and plot name it: "static (cmoe)" for static pruning."""
    return f"static ({p.method})" if p.kind == "static" else p.method


MARKERS = {"dense": ("*", "black"), "static": ("s", "grey"), "cmoe": ("^", "tab:red"), "default": ("o", "tab:blue"),
           "topk": ("D", "tab:green"), "probe": ("v", "tab:orange")}  # fmt: skip


def plot(points: list[Point], path: str | Path, title: str = "", references: dict[str, float] | None = None) -> Path:
    """Perplexity (log) against measured whole-model decode speed (tok/s at batch 1 where the sweep
    measured it, else the speed-up), one marker per method, the Pareto frontier drawn as a step line
    and its points labelled; `references` ({name: tok/s}, e.g. llama.cpp's) as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = dense_tok_s(points)

    def x(p):
        return axis_tok_s(p, ref)

    fig, ax = plt.subplots(figsize=(9, 6))
    for kind, (marker, color) in MARKERS.items():
        pts = [p for p in points if p.kind == kind]
        if pts:
            ax.scatter([x(p) for p in pts], [p.ppl for p in pts], marker=marker, color=color, s=60,
                       label=kind, zorder=3, edgecolors="white" if kind != "dense" else None)  # fmt: skip
    front = sorted((p for p in points if p.on_frontier), key=x)
    if front:
        ax.step([x(p) for p in front], [p.ppl for p in front], where="post", color="black", lw=1,
                alpha=0.6, label="Pareto frontier", zorder=2)  # fmt: skip
    for i, p in enumerate(front):
        name = "dense" if p.kind == "dense" else p.config + ("" if p.method == "default" else f" {label(p)}")
        ax.annotate(name, (x(p), p.ppl), fontsize=8, xytext=(6, 8 if i % 2 else -12), textcoords="offset points")
    ax.set_yscale("log")
    if ref:
        ax.set_xlabel(f"decode tok/s at batch 1 (speed-up over dense in the same run x dense's median {ref:.0f} tok/s)")
    else:
        ax.set_xlabel("whole-model decode speed-up at batch 1 (dense ms / carved ms, same run)")
    ax.set_ylabel("perplexity (log scale)")
    ax.axvline(ref or 1.0, color="black", lw=0.5, ls=":", label="dense")  # the dense point: speed-up 1
    colors = iter(["tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
    for name, value in (references or {}).items() if ref else ():
        ax.axvline(value, color=next(colors, "grey"), lw=1, ls="--", label=name)
    ax.set_title(title or "carving frontier: quality against measured speed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(points: list[Point], out_dir: str | Path, title: str = "",
                  references: dict[str, float] | None = None) -> dict[str, Path]:  # fmt: skip
    """frontier.md (the table, then the reference tok/s) and frontier.png beside frontier.json."""
    out = Path(out_dir)
    pareto(points)
    md = out / "frontier.md"
    refs = "".join(f"\n- {name}: {value:.1f} tok/s" for name, value in (references or {}).items())
    md.write_text(table(points) + ("\n\nreference decode speeds, batch 1:" + refs if refs else "") + "\n")
    return {"table": md, "plot": plot(points, out / "frontier.png", title, references)}
