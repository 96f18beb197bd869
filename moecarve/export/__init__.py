"""Export carved models to standard Hugging Face MoE architectures (no moecarve, no remote code).

    from moecarve.export import export
    export("out/carved", "qwen2_moe", "out/carved-qwen2moe")   # or a carved model in memory

The exported folder loads with `AutoModelForCausalLM.from_pretrained(OUT)` and is an architecture
vLLM supports (`vllm serve OUT`). Each format lives in its own module with `to_<format>(model)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import atomic_dir, check_output
from .errors import ExportError
from .qwen2_moe import to_qwen2_moe

FORMATS = {"qwen2_moe": to_qwen2_moe}
EXPORT_INFO = "moecarve_export.json"  # provenance only: nothing reads it at load time


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def convert(model: nn.Module, fmt: str) -> nn.Module:
    """The carved `model` as a transformers model of format `fmt` (CPU), computing the same logits."""
    check_format(fmt)
    return FORMATS[fmt](model)


def export(
    model_or_dir: nn.Module | str | Path,
    fmt: str,
    out: str | Path,
    *,
    tokenizer=None,
    overwrite: bool = False,
    dtype: torch.dtype | str | None = None,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write a carved model (in memory, or a folder saved by moecarve.save) as format `fmt` to `out`.

    The folder is written atomically: safetensors weights, config.json without any moecarve entry,
    generation config, the tokenizer (from `tokenizer`, or copied from the carved folder) and
    moecarve_export.json (provenance). `dtype`: cast the weights ("auto"/None keeps the source's).
    """
    check_format(fmt)
    check_output(out, overwrite)  # fail before loading anything
    source = None
    if not isinstance(model_or_dir, nn.Module):
        from ..io.save import load, read_config

        source = str(model_or_dir)
        read_config(source)  # a clear error for a folder that holds no carved model
        model = load(source, dtype="auto" if dtype in (None, "auto") else dtype)
        if tokenizer is None:
            tokenizer = _tokenizer(source)
    else:
        model = model_or_dir
    converted = convert(model, fmt)
    if dtype not in (None, "auto"):
        from ..io.loading import resolve_dtype

        converted = converted.to(resolve_dtype(dtype, torch.device("cpu")))
    info = {"format": fmt, "source": source, "moecarve": getattr(model.config, "moecarve", None)}
    with atomic_dir(out, overwrite) as tmp:
        converted.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
    return Path(out)


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # a carved folder saved without a tokenizer
        return None


__all__ = ["FORMATS", "ExportError", "convert", "export"]
