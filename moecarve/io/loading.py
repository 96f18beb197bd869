"""Load any model moecarve works on (a dense HF model, a carved folder or a GGUF file), with its
tokenizer, and check it before loading: what can be known from the path, config.json and the weight
files' headers (a GGUF file's header: moecarve.io.gguf) is checked first, so a bad model fails in a
second with one line, not after minutes.

torch and transformers are imported inside the functions: the CLI imports this module to build
its parser, and `moecarve --help` must not pay for them.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import MoecarveError, UsageError
from .gguf import GGUFInfo, check_gguf, is_gguf

# --dtype names -> torch attribute names
DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}  # fmt: skip
DTYPE_CHOICES = ("auto", *DTYPES)
DEVICE_TYPES = ("cpu", "cuda", "mps")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
_HUB_PROBE_TIMEOUT = 3.0  # seconds to reach the Hub's host before calling it unreachable


class DeviceError(MoecarveError, ValueError):
    """A device name torch does not know, or one this machine does not have."""


class DtypeError(MoecarveError, ValueError):
    """A dtype name moecarve does not compute in."""


class DamagedFile(MoecarveError, ValueError):
    """A JSON file of a model folder that cannot be parsed (cut off, or not JSON)."""


def resolve_device(device):
    """A torch.device: "auto" -> CUDA when available, else CPU; refuses unknown or absent devices."""
    import torch

    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                          "use --device cpu or auto")  # fmt: skip
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r}: MPS is not available on this machine; use --device cpu or auto")
    return dev


def resolve_dtype(dtype, device):
    """A torch.dtype: "auto" -> bfloat16 on CUDA, float32 on CPU (CPU matmuls are fastest and exact in fp32)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise DtypeError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPE_CHOICES)}")
    return getattr(torch, DTYPES[dtype])


def check_kernels(kernels: str | None, device) -> None:
    """Refuse a kernel backend that cannot run on `device` (before the model loads)."""
    from ..modules.fast import BACKENDS

    if kernels in (None, "none"):
        return
    if kernels not in BACKENDS:
        raise UsageError(f"unknown kernels {kernels!r}; choose none, {', '.join(BACKENDS)}")
    if kernels == "triton" and resolve_device(device).type != "cuda":
        raise UsageError("--kernels triton runs on CUDA only; use --kernels auto or cpu on this device")


def read_json(path: str | Path, what: str | None = None) -> dict:
    """A JSON object from a file; DamagedFile naming the file when it is cut off or not JSON."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path} is not valid JSON ({e}); {what or 'the file'} is damaged: restore a complete copy") from e
    if not isinstance(obj, dict):
        raise DamagedFile(f"{path} holds a JSON {type(obj).__name__}, not an object; {what or 'the file'} is damaged")
    return obj


def is_carved(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and "moecarve" in read_json(cfg, "the model's config")


@dataclass(frozen=True)
class ModelRef:
    """A model checked before loading: its name as given, the local folder or GGUF file (None for
    a hub id), its parsed config.json and the folder holding it (for a hub id, its snapshot in the
    local cache; for a GGUF file, a private folder holding the config its header implies: configs
    and skeletons are built from it without the network or the weights), whether the weights must
    come from the local cache only, and what a GGUF file's header says (None for folders)."""

    name: str
    path: Path | None
    config: dict
    config_dir: Path
    offline: bool = False
    gguf: GGUFInfo | None = None

    @property
    def carved(self) -> bool:
        return "moecarve" in self.config

    @property
    def source(self) -> str:
        """What from_pretrained is given: the folder or the hub id."""
        return str(self.path) if self.path is not None else self.name


def looks_local(name: str) -> bool:
    """Whether `name` names a local path rather than a hub id ("org/model").

    It does when it exists, is written as a path (starts with ., / or ~, or has not exactly one
    slash), or its first component is an existing folder: `out/bsae` is a typo under ./out, not a
    model on the Hub.
    """
    return (
        Path(name).expanduser().exists()
        or name.startswith((".", "/", "~"))
        or name.count("/") != 1
        or Path(name.split("/")[0]).is_dir()
    )


def check_weights(folder: Path) -> None:
    """Every weight file the folder's index names exists and no safetensors file is truncated
    (headers only, no tensor is read)."""
    from ..stream.shards import read_header
    from .save import ModelNotFound

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "the weight index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise DamagedFile(f"{index} has no weight_map; the weight index is damaged")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ModelNotFound(f"{index} names shard(s) missing from {folder}: {', '.join(missing)}")
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        read_header(f)  # TruncatedFile: "X is truncated"
    if not files and not any(folder.glob("pytorch_model*.bin")):
        raise ModelNotFound(f"{folder} holds no model weights (no *.safetensors or pytorch_model*.bin): "
                            "a config.json alone cannot be loaded")  # fmt: skip


def _hub_unreachable() -> str | None:
    """None when the Hub's host accepts a connection, else why not (a proxy is trusted unprobed).

    One quick probe instead of huggingface_hub's retries: a missing network costs a few seconds,
    not a minute of backoff.
    """
    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=_HUB_PROBE_TIMEOUT).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e}"
    return None


def _hub_config(name: str, revision: str | None) -> tuple[Path, bool]:
    """(config.json's path in the cache, offline) of a hub model; the cached copy serves when the Hub
    is off or unreachable."""
    from huggingface_hub import constants, errors, hf_hub_download, try_to_load_from_cache

    from .save import ModelNotFound

    cached = try_to_load_from_cache(name, "config.json", revision=revision)
    cached = cached if isinstance(cached, str) else None
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else _hub_unreachable()
    if why:
        if cached is None:
            raise ModelNotFound(f"{name!r} is not a local folder, and the Hugging Face Hub cannot be reached ({why}) "
                                "with no cached copy; check the path, or the network")  # fmt: skip
        return Path(cached), True
    try:
        file = hf_hub_download(name, "config.json", revision=revision)
    except errors.RepositoryNotFoundError as e:
        raise ModelNotFound(f"{name!r} is neither a local folder nor a model on the Hugging Face Hub (or it is "
                            "private: log in with `hf auth login`)") from e  # fmt: skip
    except errors.RevisionNotFoundError as e:
        raise ModelNotFound(f"the hub model {name!r} has no revision {revision!r}") from e
    except errors.GatedRepoError as e:
        raise ModelNotFound(f"the hub model {name!r} is gated: accept its terms on huggingface.co and log in") from e
    except errors.EntryNotFoundError as e:
        raise ModelNotFound(f"the hub repository {name!r} has no config.json: not a transformers model") from e
    return Path(file), False


def check_model(name: str | os.PathLike, revision: str | None = None, files: bool = True, tokenizer: bool = True) -> ModelRef:
    """Everything that can be checked before loading a model, from its path and files alone.

    A local folder must hold a parseable config.json with a model_type and (files=True, see
    check_files) complete weights and tokenizer files. A GGUF file must have a complete header of
    tensor types, architecture and tokenizer that can be read (moecarve.io.gguf.check_gguf). A hub
    id ("org/model") is resolved to its config.json (the cache when the Hub is off or unreachable).
    Raises ModelNotFound / DamagedFile / TruncatedFile / GGUFError with one line naming the problem.
    files=False lets a command check what config.json alone decides (the architecture) first, then
    call check_files.
    """
    from .save import ModelNotFound

    name = str(name)
    if not looks_local(name):
        file, offline = _hub_config(name, revision)
        return ModelRef(name, None, read_json(file, "the hub model's config"), file.parent, offline)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFound(f"{'GGUF file' if is_gguf(path) else 'model folder'} {name!r} does not exist")
    if not path.is_dir():
        if not is_gguf(path):
            raise ModelNotFound(f"{name!r} is a file, not a model folder (nor a GGUF file)")
        info = check_gguf(path)
        ref = ModelRef(name, path, info.config, info.config_dir, gguf=info)
        if files:
            check_files(ref, tokenizer)
        return ref
    if not (path / "config.json").is_file():
        what = "an empty folder" if not any(path.iterdir()) else "not a model folder"
        raise ModelNotFound(f"{name!r} is {what} (no config.json); pass a folder saved by save_pretrained or moecarve")
    config = read_json(path / "config.json", "the model's config")
    if not config.get("model_type"):
        raise DamagedFile(f"{path / 'config.json'} has no model_type: not a transformers model config")
    ref = ModelRef(name, path, config, path)
    if files:
        check_files(ref, tokenizer)
    return ref


def check_files(ref: ModelRef, tokenizer: bool = True) -> None:
    """A local model's weights are complete (check_weights) and, with tokenizer=True, it has a tokenizer."""
    from .save import ModelNotFound

    if ref.path is None:  # a hub model: its files come with from_pretrained
        return
    if ref.gguf is not None:  # its weights were checked with its header
        if tokenizer and not ref.gguf.has_tokenizer:
            raise ModelNotFound(f"{ref.name!r} holds no tokenizer (its header has no tokenizer.ggml.model / tokens); "
                                "use a GGUF file that carries one")  # fmt: skip
        return
    check_weights(ref.path)
    if tokenizer and not any((ref.path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelNotFound(f"{ref.name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...); "
                            "copy them from the source model")  # fmt: skip


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def load_any(name_or_ref, dtype="auto", device="auto", kernels: str | None = None, *, revision: str | None = None,
             trust_remote_code: bool = False, device_map=None):  # fmt: skip
    """(model, tokenizer) for a local folder (dense or carved), a GGUF file (dequantised to `dtype`,
    an ordinary model that saves like one loaded from a folder) or a hub id (needs the network or
    the cache).

    name_or_ref: a name, or the ModelRef check_model returned (then it is not checked twice).
    kernels: fast paths for a carved folder's MoE layers (see moecarve.load); ignored for dense models.
    revision / trust_remote_code: as for from_pretrained. device_map: an accelerate device map
    ("auto", ...); the model is then placed by it instead of moved to `device` (not for GGUF files).
    """
    import pickle

    from transformers import AutoModelForCausalLM

    from .gguf import load_gguf, load_gguf_tokenizer
    from .save import ModelNotFound, load, load_tokenizer

    ref = name_or_ref if isinstance(name_or_ref, ModelRef) else check_model(name_or_ref, revision)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    check_kernels(kernels, dev)
    if ref.gguf is not None:
        if device_map is not None:
            raise UsageError(gguf_refusal(ref.name, "a device map places a model as it loads (--device-map)", "use --device"))
        tokenizer = load_gguf_tokenizer(ref.path)
        return load_gguf(ref.path, dt).to(dev).eval(), tokenizer
    opts = {"revision": revision, "trust_remote_code": trust_remote_code, "local_files_only": ref.offline}
    try:  # load_tokenizer: a carved folder's config is read without its remote code
        tokenizer = load_tokenizer(ref.source, **opts)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot load the tokenizer of {ref.name!r}: {_first_line(e)}") from e
    try:
        if ref.carved and ref.path is not None:
            model = load(ref.path, dtype=dt, kernels=kernels, device_map=device_map)
        else:
            model = AutoModelForCausalLM.from_pretrained(ref.source, dtype=dt, device_map=device_map, **opts)
    except pickle.UnpicklingError as e:  # transformers reads pytorch_model*.bin with torch's weights_only loader
        what = re.search(r"GLOBAL (\S+)", str(e))
        raise ModelNotFound(f"cannot load model {ref.name!r}: its pickle weights (pytorch_model*.bin) hold "
                            f"{what.group(1) if what else 'an object'}, which torch's safe loader refuses; convert them to "
                            "safetensors where you trust the file") from e  # fmt: skip
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot load model {ref.name!r}: {_first_line(e)}") from e
    if device_map is None:
        model = model.to(dev)
    return model.eval(), tokenizer


def gguf_refusal(name: str, what: str, instead: str) -> str:
    """Why an option cannot apply to GGUF file `name` (transformers dequantises it whole, in memory)."""
    return f"{what}; {name!r} is a GGUF file, which is dequantised whole in memory first: {instead}"
