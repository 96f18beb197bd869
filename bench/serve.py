"""Use-it speed (issue 28): what `moecarve generate / chat / serve` deliver, and what the server
costs over the runtime alone.

    python bench/serve.py                      # reference dense + carved, SmolLM2; 2 threads, bf16
    python bench/serve.py --threads 1 --new 64 --models ref=../shared/reference-lm

Rows, each model (one sequence; the CLI's generate and chat run exactly this path):
  runtime  a short prompt through the Engine in this process: time to first token, decode tok/s
  server   the same request from one streaming `openai` client to `moecarve serve` (a subprocess)
Targets, on the --target model:
  batch 8  8 concurrent streaming clients of the server (greedy, --new tokens each), total tok/s
           from the first request sent to the last token received, against the runtime's Engine
           with the same 8 requests submitted together (no server), total tok/s the same way
  ttft 512 a single client's time to first token on a 512-token prompt (sent as token ids),
           against the runtime's prefill of the same prompt (Runtime.prefill, best of 3) and
           the Engine's time to first token for it

The server runs in its own process, as in use; runtime and server are measured in turn, round
after round (an idle runtime sleeps), and each figure is the median of the rounds.
Prompts are slices of ../shared/corpus/test.txt. Timings on a shared machine are noisy: run twice.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moecarve.eval.timing import cpu_name
from moecarve.runtime import Engine, SamplingParams, load_runtime

SHARED = ROOT.parent / "shared"
DEFAULT_MODELS = [("reference dense", SHARED / "reference-lm"), ("reference carved S0A384E1536", ROOT / "out" / "ref-s0a384"),
                  ("SmolLM2-135M dense", ROOT / "models" / "smollm2" / "hf")]  # fmt: skip
TEXT = SHARED / "corpus" / "test.txt"
GREEDY = SamplingParams()


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n prompts of `length` tokens from different places of the corpus."""
    ids = tokenizer(TEXT.read_text()[:400_000])["input_ids"]
    step = (len(ids) - length) // n
    return [ids[i * step : i * step + length] for i in range(n)]


# ---------------------------------------------------------------------- the runtime alone
def runtime_single(loaded, prompt: list[int], new: int) -> tuple[float, float]:
    """(time to first token s, decode tok/s) of one sequence through the Engine."""
    engine = Engine(loaded.runtime)  # no EOS: every row decodes exactly `new` tokens
    req = engine.submit(prompt, new, GREEDY)
    engine.run_until_idle()
    return req.ttft, (len(req.output) - 1) / (req.t_done - req.t_first)


def runtime_batch(loaded, batch: list[list[int]], new: int) -> float:
    """Total tok/s of all sequences submitted together, first submit to last token."""
    engine = Engine(loaded.runtime)
    reqs = [engine.submit(p, new, GREEDY) for p in batch]
    engine.run_until_idle()
    return sum(len(r.output) for r in reqs) / (max(r.t_done for r in reqs) - min(r.t_submit for r in reqs))


def runtime_prefill(loaded, prompt: list[int]) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        loaded.runtime.prefill(prompt)
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------- the server
class Server:
    """`moecarve serve` in a subprocess on a free port."""

    def __init__(self, model: Path, threads: int, max_ctx: int, batch: int, precision: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "moecarve", "serve", str(model), "--port", str(self.port), "--threads",
               str(threads), "--max-ctx", str(max_ctx), "--max-batch", str(batch), "--precision", precision]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        import httpx
        import openai

        deadline = time.time() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server stopped: {self.proc.stderr.read()[-2000:]}")
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).raise_for_status()
                break
            except httpx.TransportError:
                if time.time() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0,
                                    timeout=600)  # fmt: skip
        self.model = self.client.models.list().data[0].id

    def stream(self, prompt: list[int], new: int) -> tuple[float, float, float, int]:
        """(sent, first token, last token) perf_counter times and the completion tokens of one request."""
        sent = time.perf_counter()
        first = last = None
        n = 0
        for chunk in self.client.completions.create(model=self.model, prompt=prompt, max_tokens=new, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):  # fmt: skip
            now = time.perf_counter()
            if chunk.choices and chunk.choices[0].text:
                first = first or now
                last = now
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        return sent, first, last, n

    def single(self, prompt: list[int], new: int) -> tuple[float, float]:
        sent, first, last, n = self.stream(prompt, new)
        return first - sent, (n - 1) / (last - first)

    def concurrent(self, batch: list[list[int]], new: int) -> float:
        results: list = [None] * len(batch)

        def ask(i: int) -> None:
            results[i] = self.stream(batch[i], new)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(batch))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sum(r[3] for r in results) / (max(r[2] for r in results) - min(r[0] for r in results))

    def close(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--new", type=int, default=128, help="tokens generated per request")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="the short prompt of the per-model rows")
    ap.add_argument("--rounds", type=int, default=3, help="runtime and server measured in turn, this many times")
    ap.add_argument("--models", default=None, help="NAME=PATH,... (default: reference dense, carved, SmolLM2)")
    ap.add_argument("--target", default=str(ROOT / "models" / "smollm2" / "hf"), help="the model of the target rows")
    args = ap.parse_args()
    models = [(n, Path(p)) for n, p in (m.split("=", 1) for m in args.models.split(","))] if args.models else DEFAULT_MODELS
    models = [(n, p) for n, p in models if p.exists()]
    print(f"{cpu_name()}, load average {os.getloadavg()[0]:.1f}: {args.threads} threads, {args.precision}, "
          f"{args.new} new tokens per request, medians of {args.rounds} interleaved rounds", flush=True)  # fmt: skip
    rows = []
    for name, path in models:
        # both loaded at once (an idle runtime sleeps): rounds alternate, so both see the same load
        loaded = load_runtime(str(path), args.precision, args.threads, max_ctx=1024)
        server = Server(path, args.threads, 1024, 8, args.precision)
        try:
            prompt = prompts(loaded.tokenizer, 1, args.prompt_tokens)[0]
            runtime_single(loaded, prompt, 8)  # warm-up
            server.single(prompt, 8)
            rt, sv = [], []
            for _ in range(args.rounds):
                rt.append(runtime_single(loaded, prompt, args.new))
                sv.append(server.single(prompt, args.new))
        finally:
            server.close()
        del loaded
        for path_name, res in (("runtime (generate, chat)", rt), ("server, one streaming client", sv)):
            rows.append([name, path_name, f"{median([r[0] for r in res]) * 1000:.1f} ms", f"{median([r[1] for r in res]):.1f}"])
            print(" | ".join(rows[-1]), flush=True)

    target = Path(args.target)
    loaded = load_runtime(str(target), args.precision, args.threads, max_ctx=1024, max_slots=8)
    server = Server(target, args.threads, 1024, 8, args.precision)
    try:
        batch = prompts(loaded.tokenizer, 8, args.prompt_tokens)
        long = prompts(loaded.tokenizer, 1, 512)[0]
        runtime_batch(loaded, batch, 8)  # warm-up
        server.concurrent(batch, 8)
        runtime_single(loaded, long, 2)
        server.single(long, 2)
        rt_batch, sv_batch, rt_prefill, rt_ttft, sv_ttft = [], [], [], [], []
        for _ in range(args.rounds):
            rt_batch.append(runtime_batch(loaded, batch, args.new))
            sv_batch.append(server.concurrent(batch, args.new))
            rt_prefill.append(runtime_prefill(loaded, long))
            rt_ttft.append(runtime_single(loaded, long, 2)[0])
            sent, first, _, _ = server.stream(long, 2)
            sv_ttft.append(first - sent)
    finally:
        server.close()
    batch_ratio = median([s / r for s, r in zip(sv_batch, rt_batch)])
    ttft_ratio = median([s / r for s, r in zip(sv_ttft, rt_prefill)])

    print()
    print("| model | path | time to first token | decode tok/s (one sequence) |")
    print("|---|---|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print(f"targets on {target} ({args.threads} threads, {args.precision}; medians; ratios per round):")
    print("| measure | server | runtime alone | server / runtime |")
    print("|---|---:|---:|---:|")
    print(f"| 8 concurrent streaming clients, {args.new} tokens each: total tok/s | {median(sv_batch):.1f} | "
          f"{median(rt_batch):.1f} (Engine, batch 8) | {batch_ratio:.2f} |")  # fmt: skip
    print(f"| time to first token, 512-token prompt | {median(sv_ttft) * 1000:.0f} ms | {median(rt_prefill) * 1000:.0f} ms "
          f"(prefill); {median(rt_ttft) * 1000:.0f} ms (Engine TTFT) | {ttft_ratio:.2f} |")  # fmt: skip
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
