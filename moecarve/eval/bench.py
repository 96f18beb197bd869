"""Tokens per second of dense and carved models on the decode runtime, beside transformers' eager
forward and llama.cpp's llama-bench, in one run (what `moecarve bench` prints).

The two tests are llama-bench's: pp512 (one 512-token prompt, tokens/s of the prefill) and tg128
(128 decode steps from an empty cache; batch B decodes B sequences together, tokens/s counts all
of them). Decode steps read real text, teacher-forced (a carve's routing then sees what it sees in
use; llama-bench feeds random tokens, which costs a dense model the same). Every case runs once
per round, round after round, and each figure is the median over rounds, so a busy minute slows
every row alike; round 0 warms up and is not counted. llama-bench runs as a subprocess once per
round (-r 1), so its rows interleave with ours.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import MoecarveError

PP, TG = 512, 128
TEXT_STRIDE = 97  # tokens between the texts of a batch's sequences


class BenchError(MoecarveError, ValueError):
    """A benchmark input that cannot be used (a llama-bench that does not run, ...)."""


@dataclass
class Row:
    """One figure: a line of --json."""

    model: str
    engine: str  # "moecarve" | "hf-eager" | "llama.cpp"
    carve: str  # "dense" or the carve's config (e.g. S0A384E1536)
    precision: str  # bf16 | int8 | fp32 for ours, llama.cpp's weight type (F16, Q8_0, ...) for its rows
    threads: int
    batch: int
    test: str  # "pp512" | "tg128"
    tok_s: float | None = None
    bytes_per_token: int | None = None  # weight bytes one decode step of one sequence reads
    phases: dict[str, float] | None = None  # tg128 on the runtime: ms per step by phase (profile_runtime)
    samples: list[float] = field(default_factory=list, repr=False)

    @property
    def gb_s(self) -> float | None:
        """Weight bandwidth a batch-1 decode reaches (None elsewhere: a batch shares its reads)."""
        if self.tok_s is None or not self.bytes_per_token or self.test != "tg128" or self.batch != 1:
            return None
        return self.bytes_per_token * self.tok_s / 1e9

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "samples"}
        d["tok_s"] = None if self.tok_s is None else round(self.tok_s, 2)
        d["gb_s"] = None if self.gb_s is None else round(self.gb_s, 2)
        return d


@dataclass
class Case:
    """One timed unit: run() -> tokens/s by test, filling rows[test]."""

    rows: dict[str, Row]
    run: Callable[[], dict[str, float]]
    warmup: bool = True
    setup: Callable[[], None] | None = None  # before every run, untimed (thread settings)


def text_tokens(tokenizer, n: int) -> list[int]:
    """n tokens of the embedded corpus (real text, no download), repeated if it is short."""
    from ..calibration import embedded_corpus

    ids = tokenizer(embedded_corpus()[: 40 * n], add_special_tokens=False).input_ids
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def text_needed(batch: int) -> int:
    return max(PP, TEXT_STRIDE * (batch - 1) + TG)


def carve_label(model_or_config) -> str:
    """The carve's configuration name, "dense" for a model that is not carved."""
    from ..config import CarveConfig

    meta = getattr(getattr(model_or_config, "config", model_or_config), "moecarve", None)
    if not meta:
        return "dense"
    return CarveConfig.from_dict(meta["carve"]).name


# ------------------------------------------------------------------ the tests on each engine


def runtime_tests(rt, text: list[int], batch: int) -> Callable[[], dict[str, float]]:
    """pp512 (batch 1 only) and tg128 on a Runtime, once."""

    def run() -> dict[str, float]:
        out = {}
        if batch == 1:
            t0 = time.perf_counter()
            rt.step(text[:PP], range(PP), [0] * PP, [PP - 1], rt.prompt_routed(PP))
            out["pp512"] = PP / (time.perf_counter() - t0)
        out["tg128"] = batch * TG / decode_tg(rt, text, batch)
        return out

    return run


def decode_tg(rt, text: list[int], batch: int) -> float:
    """Seconds of tg128 on a Runtime: TG decode steps of `batch` sequences (texts TEXT_STRIDE tokens
    apart) from position 0, under the runtime's own routing policy, as generate() and serve use it."""
    starts = [i * TEXT_STRIDE for i in range(batch)]
    routed = rt.decode_routed(batch)
    t0 = time.perf_counter()
    for p in range(TG):
        rt.step([text[s + p] for s in starts], [p] * batch, range(batch), range(batch), routed)
    return time.perf_counter() - t0


def profile_runtime(rt, text: list[int], batch: int) -> dict[str, float]:
    """Where a tg128 decode step's time goes on a Runtime: ms per step by phase (embed, qkv,
    attention, wo, ffn_norm, router, ffn, lm_head: thread 0's time between the barriers that end
    each phase, Runtime.profile) and "overhead", the rest of the step's wall time (Python, ctypes,
    argument checks). One untimed-by-the-table pass after the timed rounds."""
    rt.profile(False)
    rt.profile(True)
    wall = decode_tg(rt, text, batch)
    phases = {k: 1e3 * v / TG for k, v in rt.profile(False).items()}
    phases["overhead"] = max(0.0, 1e3 * wall / TG - sum(phases.values()))
    return {k: round(v, 4) for k, v in phases.items()}


def phase_table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """(header, lines): the profiled rows' ms per decode step by phase, and each phase's share."""
    from ..runtime.native import PHASES

    cols = [*PHASES, "overhead"]
    header = ["model", "carve", "precision", "threads", "batch", *cols, "total ms"]
    lines = []
    for r in rows:
        if r.phases:
            total = sum(r.phases.values())
            lines.append([r.model, r.carve, r.precision, str(r.threads), str(r.batch),
                          *[f"{r.phases.get(c, 0.0):.3f} ({100 * r.phases.get(c, 0.0) / total:.0f}%)" for c in cols],
                          f"{total:.3f}"])  # fmt: skip
    return header, lines


def hf_tests(model, text: list[int], batch: int) -> Callable[[], dict[str, float]]:
    """The same tests on transformers' eager forward with its own KV cache."""
    from transformers import DynamicCache

    from .timing import cache_argument

    kv_name = cache_argument(model)

    def run() -> dict[str, float]:
        out = {}
        with torch.no_grad():
            if batch == 1:
                t0 = time.perf_counter()
                model(torch.tensor([text[:PP]]), use_cache=False, logits_to_keep=1)
                out["pp512"] = PP / (time.perf_counter() - t0)
            starts = [i * TEXT_STRIDE for i in range(batch)]
            cache = DynamicCache(config=model.config)
            t0 = time.perf_counter()
            for p in range(TG):
                ids = torch.tensor([[text[s + p]] for s in starts])
                model(ids, use_cache=True, cache_position=torch.tensor([p]), logits_to_keep=1, **{kv_name: cache})
            out["tg128"] = batch * TG / (time.perf_counter() - t0)
        return out

    return run


def llama_bench(binary: str | Path, gguf: str | Path, threads: int) -> Callable[[], dict[str, float]]:
    """One llama-bench run (pp512 and tg128, -r 1) per call.

    On CPUs with AMX, llama.cpp's repacked weights crash its prompt processing on some types (Q8_0
    here, with no output): a run that fails so falls back, for this and every later call, to two runs,
    tg128 with the default (repacked) weights and pp512 with `--repack 0` (the rows say so)."""
    base = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]
    split = False

    def once(args: list[str]) -> dict[str, float]:
        try:
            proc = subprocess.run(base + args, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"llama-bench did not run: {e}") from e
        if proc.returncode != 0 or not proc.stdout.strip():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"llama-bench failed on {gguf}: {last[0]}")
        return {("tg128" if r.get("n_gen") else "pp512"): float(r["avg_ts"]) for r in json.loads(proc.stdout)}

    def run() -> dict[str, float]:
        nonlocal split
        if not split:
            try:
                return once(["-p", str(PP), "-n", str(TG)])
            except BenchError:
                split = True
        return once(["-p", "0", "-n", str(TG)]) | once(["-p", str(PP), "-n", "0", "--repack", "0"])

    return run


def llama_references(binary: str | Path, ggufs: list, threads: int, runs: int = 3) -> dict[str, float]:
    """{"llama.cpp <type>": tg128 tok/s} of each GGUF by llama-bench, the median of `runs` runs:
    reference lines for a plot of decode speed."""
    out = {}
    for g in ggufs:
        run = llama_bench(binary, g, threads)
        out[f"llama.cpp {gguf_type(g)}"] = statistics.median(run()["tg128"] for _ in range(runs))
    return out


def gguf_type(path: str | Path) -> str:
    """The weight type llama.cpp reports for a GGUF (F16, Q8_0, Q4_1, ...), from its metadata."""
    from gguf import GGUFReader, LlamaFileType

    f = GGUFReader(str(path)).fields.get("general.file_type")
    if f is not None:
        try:
            return LlamaFileType(int(f.parts[f.data[0]][0])).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    return Path(path).stem


# ------------------------------------------------------------------ the run


def run_cases(cases: list[Case], rounds: int, progress: Callable[[int], None] | None = None) -> None:
    """Every case once per round (round 0 is a warm-up for cases that want one); medians into rows."""
    for r in range(rounds + 1):
        for case in cases:
            if r == 0 and not case.warmup:
                continue
            if case.setup is not None:
                case.setup()
            res = case.run()
            if r:
                for test, value in res.items():
                    case.rows[test].samples.append(value)
        if progress:
            progress(r)
    for case in cases:
        for row in case.rows.values():
            row.tok_s = statistics.median(row.samples) if row.samples else None


# llama.cpp's weight types a precision of ours is compared with, first match wins
LLAMA_PEER = {"bf16": ("F16", "BF16"), "int8": ("Q8_0",), "fp32": ("F32",)}


def table(rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    """(header, lines): one line per (model, engine, carve, precision, threads, batch), with pp512
    and tg128, MB and GB/s of a batch-1 decode, tg128 against the dense runtime row and against
    llama.cpp's peer type (F16 for bf16, Q8_0 for int8, F32 for fp32) at the same thread count."""
    keyed: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        keyed.setdefault((r.model, r.engine, r.carve, r.precision, r.threads, r.batch), {})[r.test] = r

    def tg(model, engine, carve, prec, threads, batch):
        row = keyed.get((model, engine, carve, prec, threads, batch), {}).get("tg128")
        return None if row is None else row.tok_s

    def fmt(v, spec="{:.1f}"):
        return "—" if v is None else spec.format(v)

    header = ["model", "engine", "carve", "precision", "threads", "batch", "pp512 tok/s", "tg128 tok/s", "MB/token",
              "GB/s", "tg ×dense", "tg ×llama.cpp"]  # fmt: skip
    lines = []
    for (model, engine, carve, prec, threads, batch), tests in keyed.items():
        pp, t = tests.get("pp512"), tests.get("tg128")
        tgv = None if t is None else t.tok_s
        dense = tg(model if carve == "dense" else _dense_model(keyed, engine, prec, threads, batch), engine, "dense", prec, threads, batch)
        peer = None
        if engine == "moecarve" and batch == 1:
            for typ in LLAMA_PEER.get(prec, ()):
                peer = next((r.tok_s for r in rows if r.engine == "llama.cpp" and r.precision == typ and
                             r.threads == threads and r.test == "tg128"), None)  # fmt: skip
                if peer:
                    peer_name = typ
                    break
        lines.append([
            model, engine, carve, prec, str(threads), str(batch), fmt(None if pp is None else pp.tok_s), fmt(tgv),
            fmt(None if t is None or not t.bytes_per_token else t.bytes_per_token / 1e6),
            fmt(None if t is None else t.gb_s), fmt(tgv / dense if tgv and dense and carve != "dense" else None, "{:.2f}x"),
            f"{tgv / peer:.2f}x ({peer_name})" if tgv and peer else "—",
        ])  # fmt: skip
    return header, lines


def _dense_model(keyed: dict, engine: str, prec: str, threads: int, batch: int) -> str | None:
    """The dense model's name among the rows (carves are compared with it)."""
    for model, eng, carve, p, th, b in keyed:
        if carve == "dense" and eng == engine and p == prec and th == threads and b == batch:
            return model
    return None
