"""Export carved models to standard Hugging Face MoE architectures (no moecarve, no remote code).

    from moecarve.export import export
    export("out/carved", "qwen2_moe", "out/carved-qwen2moe")   # or a carved model in memory

The exported folder loads with `AutoModelForCausalLM.from_pretrained(OUT)` and is an architecture
vLLM supports (`vllm serve OUT`); it carries a model card (README.md) naming the source model.
Each format lives in its own module with `to_<format>(model)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..io.atomic import atomic_dir, check_output
from ..io.card import CardInfo, plain_card, provenance
from ..io.save import CARD_FILE, ordinary_permissions
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
    card: CardInfo | dict | None = None,
) -> Path:
    """Write a carved model (in memory, or a folder saved by moecarve.save) as format `fmt` to `out`.

    The folder is written atomically: safetensors weights, config.json without any moecarve entry,
    generation config, the tokenizer (from `tokenizer`, or copied from the carved folder),
    moecarve_export.json (the carve and its provenance) and a model card (README.md; `card`: what
    it should say beyond the carve, see moecarve.io.card.CardInfo). `dtype`: cast the weights
    ("auto"/None keeps the source's).
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
    meta = getattr(model.config, "moecarve", None) or {}
    details = CardInfo.of(card)
    prov = provenance(model.config, details.source, details.revision)  # the dense source, when recorded
    info = {"format": fmt, "source": source, "moecarve": meta, "provenance": prov}
    with atomic_dir(out, overwrite) as tmp:
        converted.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2, default=str))
        (tmp / CARD_FILE).write_text(export_card(Path(out).name, fmt, meta, source, details, prov))
        ordinary_permissions(tmp)
    return Path(out)


def export_card(name: str, fmt: str, meta: dict, carved: str | None, info: CardInfo, prov: dict) -> str:
    """README.md of an exported folder: what it was carved from and how, in the target format."""
    carve = meta.get("carve") or {}
    config = f"S{carve['n_shared']}A{carve['n_active']}E{carve['n_experts']}" if carve else ""
    rows = [("carved folder", f"`{carved}`" if carved else ""),
            ("configuration", f"{config}, method {carve.get('method')}, router {carve.get('router')}" if carve else "")]  # fmt: skip
    intro = (f"A carved Mixture-of-Experts model (moecarve: CMoE, arXiv 2502.04416, without pre-training) exported "
             f"exactly to the standard `{fmt}` architecture: plain transformers loads it without remote code, and "
             f"`vllm serve {name}` serves it.")  # fmt: skip
    return plain_card(name, intro, rows, ["moe", "mixture-of-experts", "moecarve", "cmoe", fmt], info, prov)


def _tokenizer(path: str):
    from ..io.save import load_tokenizer

    try:
        return load_tokenizer(path)
    except (OSError, ValueError):  # a carved folder saved without a tokenizer
        return None


__all__ = ["FORMATS", "ExportError", "convert", "export"]
