"""Save and load carved models: safetensors weights + config.json that records the carve.

A carved folder is a Hugging Face folder of its own architecture: config.json (the source
architecture's config under model_type "moecarve_<type>", architectures
["MoeCarve<Source>ForCausalLM"], a `moecarve` entry recording the carve and its provenance, and an
auto_map), safetensors shards, the tokenizer, the carve report, a model card (README.md), and
`modeling_moecarve.py` so that `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`
works without moecarve installed. Without trust_remote_code transformers refuses the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig

from ..errors import MoecarveError
from ..modules import hf
from ..modules.fast import BACKENDS, use_kernels
from .atomic import atomic_dir
from .card import CardInfo, carved_card, provenance
from .remote import carved_class, write_modeling_file

REPORT_FILE = "carve_report.json"
CARD_FILE = "README.md"


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


def ordinary_permissions(folder: Path) -> None:
    """Give every file in an output folder the folder's permissions without execute bits (0644
    under the usual umask: atomic_dir gives the folder 0777 & ~umask); safetensors writes 0600."""
    mode = folder.stat().st_mode & 0o777
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(mode if path.is_dir() else mode & 0o666)


def finish_folder(
    folder: Path,
    config,
    name: str,
    tokenizer=None,
    report=None,
    card: CardInfo | dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Everything of a carved folder but the weights, written the same way by moecarve.save and the
    streamed carve: config.json (the carved architecture), modeling_moecarve.py, the tokenizer,
    carve_report.json, the model card (README.md, titled `name`), extra files, ordinary permissions.

    config.moecarve must hold "base_class" (see record_provenance).
    """
    base_class = config.moecarve["base_class"]
    hf.write_config(config, folder, getattr(transformers, base_class))
    write_modeling_file(folder, base_class)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if report is not None:
        (folder / REPORT_FILE).write_text(report.to_json())
    (folder / CARD_FILE).write_text(carved_card(config, name, report, card))
    for file, text in (extra_files or {}).items():
        (folder / file).write_text(text)
    ordinary_permissions(folder)


def record_provenance(config, base_class: str, card: CardInfo | dict | None = None) -> None:
    """Complete config.moecarve before saving: the transformers class it derives from, and the
    provenance (source model and revision, versions of moecarve, torch and transformers)."""
    info = CardInfo.of(card)
    config.moecarve["base_class"] = base_class
    config.moecarve["provenance"] = provenance(config, info.source, info.revision)


def save(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    report=None,
    overwrite: bool = False,
    max_shard_size: str | int = "5GB",
    extra_files: dict[str, str] | None = None,
    card: CardInfo | dict | None = None,
) -> Path:
    """Write a carved model to `out_dir` atomically (a temporary folder renamed on success).

    card: what the model card should say beyond the config and report (CardInfo or a dict of its
    fields: source model, calibration source, perplexity before/after, notes).
    """
    meta = getattr(model.config, "moecarve", None)
    if not meta or not meta.get("modules"):
        raise NotCarvedError("this model has no carved modules; run moecarve.carve first")
    record_provenance(model.config, base_class_name(model), card)
    with atomic_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        finish_folder(tmp, model.config, Path(out_dir).name, tokenizer, report, card, extra_files)
    return Path(out_dir)


def read_config(path: str | Path):
    """The config of a carved folder, as the source architecture's config class (LlamaConfig, ...)
    with its `moecarve` entry: what an in-memory carve holds, whatever model_type the folder names
    (its own "moecarve_llama", or "llama" in folders written before moecarve named its own)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ModelNotFound(f"{path} is not a model folder (no config.json)")
    meta = json.loads((path / "config.json").read_text()).get("moecarve")
    if not meta:
        raise NotCarvedError(f"{path} holds no moecarve model (config.json has no 'moecarve' entry)")
    config_class = getattr(transformers, meta["base_class"]).config_class
    config_dict, kwargs = config_class.get_config_dict(path)
    config_dict["model_type"] = config_class.model_type
    return config_class.from_dict(config_dict, **kwargs)


def _carved_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.exists() and "moecarve" in json.loads(cfg.read_text())


def model_config(path: str | Path):
    """The config of a model folder or hub id: read_config for a carved folder, else AutoConfig.

    AutoConfig alone cannot read a carved folder without trust_remote_code (its config class
    lives in modeling_moecarve.py); moecarve never needs that code to read it.
    """
    return read_config(path) if _carved_folder(path) else AutoConfig.from_pretrained(path)


def load_tokenizer(path: str | Path, **kwargs):
    """AutoTokenizer.from_pretrained(path), given the config of a carved folder: without it
    AutoTokenizer reads the config through AutoConfig, which asks whether to run the folder's
    remote code (a prompt in a terminal, a warning elsewhere)."""
    from transformers import AutoTokenizer

    if _carved_folder(path):
        kwargs.setdefault("config", read_config(path))
    return AutoTokenizer.from_pretrained(path, **kwargs)


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
    same outputs to float rounding, faster decode on CPU and GPU. Either way `generate()` decodes
    on moecarve's runtime where it can (moecarve.runtime.hf; `use_runtime=False` opts out).
    """
    if kernels not in (None, "none", *BACKENDS):
        raise ValueError(f"unknown kernels {kernels!r}; choose none, {', '.join(BACKENDS)}")
    config = read_config(path)
    cls = carved_class(config.moecarve["base_class"])
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
