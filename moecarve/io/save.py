"""Save and load carved models: safetensors weights + config.json that records the carve.

A carved folder is an ordinary Hugging Face folder: config.json (the source architecture's config
plus a `moecarve` entry and an `auto_map`), safetensors shards, the tokenizer, the carve report,
and `modeling_moecarve.py` so that `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` works without moecarve installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig

from ..errors import MoecarveError
from ..modules.fast import BACKENDS, use_kernels
from ..modules.moe import carved_model_class
from .atomic import atomic_dir
from .remote import write_modeling_file

REPORT_FILE = "carve_report.json"


class ModelNotFound(MoecarveError, FileNotFoundError):
    """A model path that does not exist or holds no model."""


class NotCarvedError(MoecarveError, ValueError):
    """The folder or model holds no moecarve modules."""


def base_class_name(model: nn.Module) -> str:
    """The transformers class the carved model derives from (e.g. LlamaForCausalLM)."""
    cls = type(model)
    while cls.__name__.startswith("MoeCarve"):
        cls = cls.__mro__[1]
    return cls.__name__


def save(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    report=None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a carved model to `out_dir` atomically (a temporary folder renamed on success)."""
    meta = getattr(model.config, "moecarve", None)
    if not meta or not meta.get("modules"):
        raise NotCarvedError("this model has no carved modules; run moecarve.carve first")
    base = base_class_name(model)
    meta["base_class"] = base
    with atomic_dir(out_dir, overwrite) as tmp:
        model.config.auto_map = write_modeling_file(tmp, base)
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            (tmp / REPORT_FILE).write_text(report.to_json())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)


def read_config(path: str | Path):
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelNotFound(f"{path} is not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(path)
    if not getattr(config, "moecarve", None):
        raise NotCarvedError(f"{path} holds no moecarve model (config.json has no 'moecarve' entry)")
    return config


def load(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    kernels: str | None = None,
    **kwargs,
) -> nn.Module:
    """Load a carved folder with moecarve's own modules (no trust_remote_code needed).

    dtype / device_map / further kwargs go to `from_pretrained`, so accelerate device maps
    ("auto", CPU and disk offload) work as for any transformers model.
    kernels: None / "none" runs the reference forward; "auto", "cpu", "triton" or "torch" binds
    the fast inference paths (`moecarve.use_kernels(model, kernels)`, moecarve.modules.fast):
    same outputs to float rounding, faster decode on CPU and GPU.
    """
    if kernels not in (None, "none", *BACKENDS):
        raise ValueError(f"unknown kernels {kernels!r}; choose none, {', '.join(BACKENDS)}")
    config = read_config(path)
    base = getattr(transformers, config.moecarve["base_class"])
    cls = carved_model_class(base)
    model = cls.from_pretrained(path, config=config, dtype=dtype, device_map=device_map, **kwargs)
    _realign(model)
    model.eval()
    if kernels not in (None, "none"):
        use_kernels(model, kernels)
    return model


def _realign(model: nn.Module) -> None:
    """Copy CPU tensors that safetensors mapped at addresses not 64-byte aligned.

    CPU matmul kernels pick their summation order by alignment, so such a tensor gives results
    that differ in the last bits from the model that was saved; a fresh copy is aligned.
    """
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu" and t.numel() and t.data_ptr() % 64:
            t.data = t.data.clone()


def load_report(path: str | Path):
    """The CarveReport saved with a carved folder, or None."""
    from ..carve import CarveReport

    f = Path(path) / REPORT_FILE
    return CarveReport.from_dict(json.loads(f.read_text())) if f.exists() else None
