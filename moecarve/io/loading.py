"""Load any model moecarve works on (a dense HF model or a carved folder), with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .save import ModelNotFound, load

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip


def resolve_device(device: str | None) -> torch.device:
    """"auto" -> CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU (CPU matmuls are fastest and exact in fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_carved(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and "moecarve" in json.loads(cfg.read_text())


def load_any(name_or_path: str, dtype="auto", device="auto", kernels: str | None = None):
    """(model, tokenizer) for a local folder (dense or carved) or a hub id (needs the network).

    kernels: fast paths for a carved folder's MoE layers (see moecarve.load); ignored for dense models.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(name_or_path)
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local and not path.exists():
        raise ModelNotFound(f"model path {name_or_path!r} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if is_carved(path):
            model = load(path, dtype=dt, kernels=kernels)
        else:
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dt)
    except OSError as e:
        raise ModelNotFound(f"cannot load model {name_or_path!r}: {e}") from e
    return model.to(dev).eval(), tokenizer
