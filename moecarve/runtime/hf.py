"""The decode runtime (and the fast kernels) behind transformers' `generate`, for carved models
however they are loaded (`moecarve.load`, `AutoModelForCausalLM` with remote code,
`pipeline`): the carved classes (modules/hf.py) call the functions registered here.

`fast_generate` serves what the runtime implements (greedy and sampled decoding with temperature /
top-k / top-p, max_new_tokens / max_length, end-of-sequence ids, left-padded batches, a streamer,
on CPU) and returns None for anything else (beam search, logits processors, stopping criteria,
scores, another device ...), which then runs transformers' own generate with the fast kernels
bound to the carved layers (`kernels_bound`). `generate(..., use_runtime=False)` asks for the
reference path. The runtime computes in the model's own dtype
(float32 or bfloat16; float16 models run in bfloat16), so greedy outputs match the reference
forward up to the rounding of a different summation order.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch

# generation settings the runtime implements; any other field that differs from its default sends
# the call to transformers' generate
_SERVED = {
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "use_cache", "output_attentions", "output_hidden_states", "return_dict_in_generate",
    "_from_model_config", "transformers_version", "num_beams", "num_return_sequences", "min_new_tokens",
    "repetition_penalty", "output_scores", "output_logits", "cache_implementation",
}  # fmt: skip
_BENIGN = {"num_beams": (None, 1), "num_return_sequences": (None, 1), "min_new_tokens": (None, 0),
           "repetition_penalty": (None, 1.0), "output_attentions": (None, False), "output_hidden_states": (None, False),
           "return_dict_in_generate": (None, False), "output_scores": (None, False), "output_logits": (None, False),
           "cache_implementation": (None,)}  # fmt: skip
_ARGS = {"input_ids", "inputs", "attention_mask", "generation_config", "streamer"}


def register(paths: dict[str, Callable]) -> None:
    """Install moecarve's fast paths into a carved classes' hook table (modules/hf.FAST_PATHS, or the
    copy inside a carved folder's modeling_moecarve.py)."""
    paths["generate"] = fast_generate
    paths["kernels"] = kernels_bound


@contextlib.contextmanager
def kernels_bound(model):
    """The fast kernels on every carved layer's forward for the duration (same outputs to float
    rounding), then the binding the layers had before."""
    from ..modules.fast import use_kernels

    before = {m: m.fast_forward for m in model.modules() if hasattr(m, "fast_forward")}
    use_kernels(model, "auto")
    try:
        yield model
    finally:
        for m, f in before.items():
            m.fast_forward = f


def _precision(model) -> str:
    return "fp32" if next(model.parameters()).dtype == torch.float32 else "bf16"


def _fingerprint(model) -> tuple:
    """Changes whenever a parameter is replaced or updated in place (a fine-tune, a LoRA merge)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def runtime_for(model, slots: int, need_ctx: int):
    """The model's cached Runtime (rebuilt when its weights changed or it is too small for the call):
    a cache of up to 4096 positions within the model's own, so later calls reuse it."""
    from .. import adapters
    from .step import Runtime

    precision = _precision(model)
    key = (precision, _fingerprint(model))
    cached = model.__dict__.get("_moecarve_runtime")
    if cached is None or cached[0] != key or cached[1].max_slots < slots or cached[1].max_ctx < need_ctx:
        ctx = max(need_ctx, min(adapters.max_positions(model.config) or need_ctx, 4096))
        # every token routed: generate() computes the carved model's own function, as transformers does
        rt = Runtime(model, precision, max_ctx=ctx, max_slots=slots, prefill="routed", dense_batch=None)
        cached = model.__dict__["_moecarve_runtime"] = (key, rt)
    return cached[1]


def _settings(model, kwargs: dict):
    """(generation config, leftover kwargs) or None when the call asks for something not served."""
    base = kwargs.pop("generation_config", None) or model.generation_config
    cfg = copy.deepcopy(base)
    extra = cfg.update(**{k: v for k, v in kwargs.items() if k not in _ARGS})
    if extra:
        return None
    for key, value in cfg.to_diff_dict().items():
        if key not in _SERVED or (key in _BENIGN and value not in _BENIGN[key]):
            return None
    return cfg


def _ids(value) -> set[int]:
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, (list, tuple)) else [value])}


def fast_generate(model, args: tuple, kwargs: dict):
    """transformers' generate through the runtime, or None when this call needs the reference."""
    from .arch import UnsupportedModel
    from .generate import Engine
    from .sample import SamplingParams

    kwargs = dict(kwargs)
    if len(args) > 1 or any(k not in _ARGS and not hasattr(model.generation_config, k) for k in kwargs):
        return None
    ids = args[0] if args else kwargs.pop("input_ids", None)
    ids = kwargs.pop("inputs", None) if ids is None else ids
    mask = kwargs.pop("attention_mask", None)
    streamer = kwargs.pop("streamer", None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.device.type != "cpu":
        return None
    if any(p.device.type != "cpu" for p in model.parameters()) or getattr(model, "hf_device_map", None):
        return None
    cfg = _settings(model, kwargs)
    if cfg is None or (streamer is not None and ids.shape[0] != 1):
        return None
    B, T = ids.shape
    new = cfg.max_new_tokens if cfg.max_new_tokens is not None else (cfg.max_length or 20) - T
    if new < 1:
        return None
    prompts = [row[m.bool()].tolist() if mask is not None else row.tolist() for row, m in zip(ids, mask if mask is not None else ids)]
    if any(not p for p in prompts):
        return None
    try:
        rt = runtime_for(model, B, max(len(p) for p in prompts) + new)
    except UnsupportedModel:
        return None
    if cfg.do_sample:
        seed = int(torch.randint(0, 2**62, (1,)))  # from torch's global generator: torch.manual_seed reproduces
        sampling = [SamplingParams(cfg.temperature if cfg.temperature is not None else 1.0,
                                   cfg.top_k if cfg.top_k is not None else 50, cfg.top_p or 1.0, seed + i)
                    for i in range(B)]  # fmt: skip
    else:
        sampling = [SamplingParams()] * B
    eos = _ids(cfg.eos_token_id)
    pad = next(iter(_ids(cfg.pad_token_id) or eos or {0}))
    engine = Engine(rt, eos)
    if streamer is not None:
        streamer.put(ids.cpu())
    on_token = (lambda req, tok: streamer.put(torch.tensor([tok]))) if streamer is not None else None
    reqs = [engine.submit(p, new, s, on_token=on_token) for p, s in zip(prompts, sampling)]
    engine.run_until_idle()
    if streamer is not None:
        streamer.end()
    width = max(len(r.output) for r in reqs)
    out = torch.full((B, T + width), pad, dtype=ids.dtype)
    out[:, :T] = ids
    for b, r in enumerate(reqs):
        out[b, T : T + len(r.output)] = torch.tensor(r.output, dtype=ids.dtype)
    return out
