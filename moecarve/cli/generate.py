"""`moecarve generate MODEL --prompt TEXT`: stream one completion through the decode runtime.

The text goes to stdout as it is produced; prompt and generated tokens, time to first token and
decode speed go to stderr at the end. Also home of the runtime and sampling options that chat and
serve share.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_command, at_least, in_range

# moecarve.runtime.pack.PRECISIONS (the parser must not import torch; a test keeps them equal)
PRECISIONS = ("bf16", "int8", "fp32")


def _top_p(text: str) -> float:
    """An argparse type: a probability in (0, 1] (0 would keep no token)."""
    value = in_range(0, 1)(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_runtime_args(p) -> None:
    """How the runtime holds the model: --threads, --precision, --max-ctx."""
    p.add_argument("model", help="a local model folder (dense or carved), a GGUF file or a hub id in the local cache")
    p.add_argument("--threads", type=at_least(1), default=None,
                   help="worker threads (default: the physical cores)")  # fmt: skip
    p.add_argument("--precision", default="bf16", choices=PRECISIONS,
                   help="weights as bfloat16, int8 blocks (Q8_0-style) or float32 (the reference)")  # fmt: skip
    p.add_argument("--max-ctx", type=at_least(2), default=None, metavar="N",
                   help="positions per sequence, prompt and answer together (default: the model's, at most 4096)")  # fmt: skip


def add_sampling_args(p) -> None:
    """--temperature --top-p --top-k --seed: how the next token is chosen (default greedy)."""
    p.add_argument("--temperature", type=in_range(0, float("inf"), hi_open=True), default=0.0,
                   help="0 is greedy; above 0 samples from the softmax of logits / T")  # fmt: skip
    p.add_argument("--top-p", type=_top_p, default=1.0, help="sample from the smallest set of tokens "
                   "whose probability reaches P (1 = off)")  # fmt: skip
    p.add_argument("--top-k", type=at_least(0), default=0, help="sample from the K likeliest tokens (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="seeds sampling, for a reproducible answer (default: random)")


def sampling(args):
    """SamplingParams of add_sampling_args' options."""
    from ..runtime import SamplingParams

    return SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)


def load(args, max_slots: int = 1):
    """load_runtime with add_runtime_args' options."""
    from ..runtime import load_runtime

    return load_runtime(args.model, args.precision, args.threads, args.max_ctx, max_slots=max_slots)


def register(sub) -> None:
    p = add_command(
        sub, "generate",
        help="generate text from a prompt through the decode runtime (streams to stdout)",
        description="Complete a prompt with a dense model or a carved folder through moecarve's native decode "
        "runtime. The text streams to stdout as it is produced; token counts, time to first token and decode "
        "speed print to stderr at the end.",
    )  # fmt: skip
    add_runtime_args(p)
    p.add_argument("--prompt", required=True, help="the text to complete; - reads it from stdin")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128, metavar="N",
                   help="tokens to generate at most (fewer where the context ends first)")  # fmt: skip
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UsageError
    from ..runtime import Engine, TextStream

    text = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not text:
        raise UsageError("the prompt is empty" + (" (nothing on stdin)" if args.prompt == "-" else ""))
    params = sampling(args)  # checked before the model loads
    loaded = load(args)
    rt = loaded.runtime
    ids = list(loaded.tokenizer(text)["input_ids"])
    if not ids:
        raise UsageError("the prompt is empty once tokenized")
    if len(ids) >= rt.max_ctx:
        raise UsageError(f"the prompt has {len(ids)} tokens; the context holds {rt.max_ctx} (raise --max-ctx or "
                         "shorten the prompt)")  # fmt: skip
    max_new = min(args.max_new_tokens, rt.max_ctx - len(ids))
    if max_new < args.max_new_tokens:
        print(f"note: {max_new} new tokens at most: the context holds {rt.max_ctx} tokens", file=sys.stderr)
    engine = Engine(rt, loaded.eos_ids)
    req = engine.submit(ids, max_new, params)
    stream = TextStream(loaded.tokenizer)
    seen = 0
    while not req.done.is_set():
        engine.step()
        for tok in req.output[seen:]:
            sys.stdout.write(stream.push(tok))
        seen = len(req.output)
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    print(stats(req), file=sys.stderr)
    return 0


def stats(req) -> str:
    """The summary line: tokens in and out, time to first token, decode speed after it."""
    n = len(req.output)
    line = f"prompt {len(req.prompt)} tokens, generated {n} ({req.finish_reason})"
    if req.ttft is not None:
        line += f", time to first token {req.ttft:.3f} s"
    if n > 1 and req.t_done is not None and req.t_done > req.t_first:
        line += f", {(n - 1) / (req.t_done - req.t_first):.1f} tok/s"
    return line
