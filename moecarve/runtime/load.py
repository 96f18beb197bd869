"""A model folder (dense or carved; any input `moecarve.io.loading` takes) -> a Runtime and its
tokenizer: what `moecarve generate / chat / serve / bench` start from."""

from __future__ import annotations

from dataclasses import dataclass

from .step import Runtime


@dataclass
class Loaded:
    """A runtime with what a front end needs besides it."""

    runtime: Runtime
    tokenizer: object
    name: str  # as the user gave it
    carved: bool
    eos_ids: frozenset[int]


def eos_ids(model_or_config, tokenizer) -> frozenset[int]:
    """Every end-of-sequence id the generation config, the model config and the tokenizer name."""
    ids: set[int] = set()
    for src in (getattr(model_or_config, "generation_config", None), getattr(model_or_config, "config", model_or_config)):
        v = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update([v] if isinstance(v, int) else list(v or []))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def load_runtime(name: str, precision: str = "bf16", threads: int | None = None, max_ctx: int | None = None,
                 max_slots: int = 1, max_tokens: int = 256) -> Loaded:  # fmt: skip
    """Load `name` (folder, hub id in the cache, or GGUF), pack it for the runtime and free the
    transformers copy. bf16 / int8 pack from the weights as stored (bfloat16 in memory), fp32
    from float32."""
    from ..io.loading import check_model, load_any
    from .pack import PRECISIONS
    from .arch import UnsupportedModel

    if precision not in PRECISIONS:
        raise UnsupportedModel(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    ref = check_model(name)
    model, tokenizer = load_any(ref, dtype="float32" if precision == "fp32" else "bfloat16", device="cpu")
    rt = Runtime(model, precision, threads, max_ctx, max_slots, max_tokens)
    eos = eos_ids(model, tokenizer)
    del model
    return Loaded(rt, tokenizer, name, ref.carved, eos)
