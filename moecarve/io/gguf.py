"""GGUF files (llama.cpp's single-file format) as moecarve input: a `.gguf` path goes wherever a
model folder goes.

Before any weight is read, `check_gguf` reads the file's header with the gguf package's GGUFReader
(the tensor data stays on disk, memory-mapped): the magic bytes, the tensor table (a truncated or
damaged file fails here), every tensor's type (each must be one the loader can dequantise), the
architecture and tokenizer (transformers must be able to build them), and the transformers config
the file implies. That config is written as config.json into a private folder (`GGUFInfo.config_dir`),
so everything that reads a model's config from a folder (skeletons on the meta device, the adapter
table, the carve checks) works on a GGUF unchanged.

`load_gguf` dequantises the weights through transformers' own GGUF support
(`from_pretrained(folder, gguf_file=name)`), forcing plain tensors (on a GPU transformers would
otherwise keep them packed in GGUF blocks), and rebuilds the model from its config without the
`quantization_config` the loader marks it with (which makes save_pretrained refuse the model): a
carve of a GGUF then saves exactly like a carve of a folder. `load_gguf_tokenizer` reads the
tokenizer and its chat template from the file.

torch, transformers and gguf are imported inside the functions: the CLI's parser imports
moecarve.io.loading, which imports this module.
"""

from __future__ import annotations

import functools
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoecarveError

SUFFIX = ".gguf"
MAGIC = b"GGUF"
_FLOAT_TYPES = ("F32", "F16", "BF16")  # every loader reads these as they are
_config_dirs: dict[Path, tempfile.TemporaryDirectory] = {}  # kept for the life of the process


class GGUFError(MoecarveError, ValueError):
    """A file that is not a complete GGUF file: wrong magic bytes, truncated, damaged, or a tensor of
    a type the gguf package does not know."""


class UnsupportedGGUF(GGUFError):
    """A valid GGUF file of a quantisation type, architecture or tokenizer nothing here can read."""


@dataclass(frozen=True)
class GGUFInfo:
    """What the header of a GGUF file says, checked.

    architecture: llama.cpp's name (general.architecture, e.g. "llama", "gemma3").
    config: the transformers config it implies, as config.json holds it (model_type "llama", "gemma3_text", ...).
    config_dir: a private folder holding that config.json (removed when the process ends).
    tensor_types: tensor type name -> number of tensors of that type (e.g. {"Q4_K": 27, "F32": 109}).
    has_tokenizer: the file carries a tokenizer (tokenizer.ggml.model and .tokens).
    """

    path: Path
    architecture: str
    config: dict
    config_dir: Path
    tensor_types: dict[str, int]
    has_tokenizer: bool


def is_gguf(path: str | Path) -> bool:
    """Whether `path` names a GGUF file: a `.gguf` name, or an existing file starting with the GGUF magic."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX:
        return True
    if not path.is_file():  # a folder, a missing path, a pipe: nothing to open
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def _first_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _reader(path: Path):
    """The file's GGUFReader; GGUFError naming what is wrong with a file that is not complete GGUF."""
    from gguf import GGUFReader

    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head != MAGIC:
        raise GGUFError(f"{path} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}")
    try:
        return GGUFReader(path)
    except ValueError as e:
        unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))  # "99" or "np.uint32(99)"
        if unknown:
            raise GGUFError(f"{path} holds a tensor of type {unknown.group(1)}, which gguf {_gguf_version()} does not "
                            "know: the file is damaged, or newer than this gguf package (upgrade gguf)") from e  # fmt: skip
        raise GGUFError(f"{path} is not a complete GGUF file (truncated or damaged: {_first_line(e)})") from e
    except (KeyError, IndexError, OverflowError, TypeError, MemoryError) as e:  # a header whose counts or lengths are garbage
        raise GGUFError(f"{path} is not a complete GGUF file (truncated or damaged: {_first_line(e)})") from e


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _field(reader, key: str):
    """A metadata field's value (a str, number or list), or None when the file lacks it."""
    field = reader.get_field(key)
    return None if field is None else field.contents()


def _readable_type(architecture: str, qtype) -> bool:
    """Whether transformers' loader for `architecture` can dequantise tensors of type `qtype`:
    its own GGUF path reads the float types and its table of block types; the older path (every
    family moecarve carves) dequantises through the gguf package."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, dequantize
    from transformers.integrations.gguf.utils import is_gguf_arch_supported

    if is_gguf_arch_supported(architecture):
        from transformers.integrations.gguf.dequant import GGML_BLOCK

        return qtype.name in _FLOAT_TYPES or int(qtype) in GGML_BLOCK
    _, type_size = GGML_QUANT_SIZES[qtype]
    try:  # one block of zeros: gguf raises NotImplementedError for a type it cannot dequantise
        dequantize(np.zeros(type_size, dtype=np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_tokenizer(path: Path, reader, architecture: str) -> bool:
    """Whether the file has a tokenizer; UnsupportedGGUF when it has one transformers cannot build."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind is None or reader.get_field("tokenizer.ggml.tokens") is None:
        return False
    from transformers.integrations.gguf.gguf_tokenizer_mapping import select_tokenizer_builder

    try:
        select_tokenizer_builder(architecture, kind)
    except ValueError as e:
        raise UnsupportedGGUF(f"{path}: {_first_line(e)}") from e
    return True


def _config(path: Path, architecture: str):
    """The transformers config the file implies; UnsupportedGGUF for an architecture transformers
    cannot read or that is not a causal LM."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UnsupportedGGUF(f"{path}: architecture {architecture!r} cannot be read by transformers "
                              f"{transformers.__version__} ({_first_line(e)})") from e  # fmt: skip
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise UnsupportedGGUF(f"{path}: architecture {architecture!r} (model_type {config.model_type!r}) is not a causal "
                              "language model transformers can build")  # fmt: skip
    return config


@functools.lru_cache(maxsize=8)
def _check(path: Path, _mtime_ns: int, _size: int) -> GGUFInfo:
    """check_gguf's work, once per version of the file (a command checks it, then loads it)."""

    reader = _reader(path)
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise GGUFError(f"{path} names no architecture (general.architecture): not a model file")
    types = Counter(t.tensor_type for t in reader.tensors)
    if not types:
        raise GGUFError(f"{path} holds no tensors")
    for qtype in types:
        if not _readable_type(architecture, qtype):
            example = next(t.name for t in reader.tensors if t.tensor_type == qtype)
            raise UnsupportedGGUF(f"{path}: quantisation type {qtype.name} ({types[qtype]} tensors, e.g. {example}) "
                                  f"cannot be dequantised by this gguf {_gguf_version()} / transformers; requantise the "
                                  "model to a common type (Q4_K_M, Q8_0, F16)")  # fmt: skip
    has_tokenizer = _check_tokenizer(path, reader, architecture)
    config = _config(path, architecture)
    folder = tempfile.TemporaryDirectory(prefix="moecarve-gguf-")
    _config_dirs[path] = folder  # the previous version's folder (if any) is removed with its object
    config.save_pretrained(folder.name)
    from .loading import read_json

    return GGUFInfo(
        path=path, architecture=architecture, config=read_json(Path(folder.name) / "config.json"),
        config_dir=Path(folder.name), tensor_types={t.name: n for t, n in types.items()}, has_tokenizer=has_tokenizer,
    )  # fmt: skip


def check_gguf(path: str | Path) -> GGUFInfo:
    """Everything the header of GGUF file `path` can tell, checked before any weight is read.

    Raises GGUFError (not GGUF, truncated, damaged, an unknown tensor type) or UnsupportedGGUF (a
    quantisation type, architecture or tokenizer that cannot be read), each with one line naming it.
    """
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _check(path, stat.st_mtime_ns, stat.st_size)


def _plain(model, dtype):
    """`model` rebuilt from its config without the quantization_config the GGUF loader set, holding
    the same tensors (no copy): an ordinary model that save_pretrained accepts."""
    import copy

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():  # parameters on the meta device; computed buffers (rotary) stay real
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True, assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain.eval()


def load_gguf(path: str | Path, dtype):
    """The dense model of GGUF file `path`, dequantised to `dtype` (a torch.dtype) on the CPU.

    Every tensor the model needs must be in the file: one left at its random initialisation would
    be silently wrong, so that is a GGUFError naming what is missing.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    info = check_gguf(path)
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            str(info.path.parent), gguf_file=info.path.name, dtype=dtype, local_files_only=True,
            quantization_config=GgufConfig(dequantize=True), output_loading_info=True,
        )  # fmt: skip
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as e:
        raise GGUFError(f"cannot load {info.path}: {_first_line(e)}") from e
    missing = sorted(loading["missing_keys"])
    if missing:
        raise GGUFError(f"{info.path} lacks {len(missing)} tensor(s) of the {info.config['model_type']} model, e.g. "
                        f"{', '.join(missing[:3])}: the file is incomplete, or its architecture's tensors are named "
                        "differently than transformers expects")  # fmt: skip
    model = _plain(model, dtype)
    model.config._name_or_path = str(info.path)  # provenance names the file, not its folder
    return model


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer (with the chat template, where the file has one) of GGUF file `path`."""
    from transformers import AutoTokenizer

    info = check_gguf(path)
    if not info.has_tokenizer:
        raise GGUFError(f"{info.path} holds no tokenizer (no tokenizer.ggml.model / tokens)")
    try:
        return AutoTokenizer.from_pretrained(str(info.path.parent), gguf_file=info.path.name, local_files_only=True)
    except (ValueError, KeyError, OSError) as e:
        raise GGUFError(f"cannot build the tokenizer of {info.path}: {_first_line(e)}") from e
