"""Read a Hugging Face checkpoint one tensor at a time, without loading whole files.

safetensors tensors are read with plain file reads straight into their own tensor, at the byte
offsets of the file's header: one copy in memory, nothing else resident. (A memory map, as
`safe_open` uses, would keep every page read so far resident - counted in the RSS - until it
is closed, so reading a layer through it costs the layer twice.) Pickle checkpoints
(`pytorch_model*.bin`) can run code when unpickled, so they are read only when explicitly
allowed (and then memory-mapped with `torch.load(mmap=True)`, copied, and unmapped by close()).
Every structural problem (no weights, a missing shard, a file shorter than its header says) is
found when the checkpoint is opened, before any work starts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import MoecarveError
from .shards import Entry, TruncatedFile, read_header

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# safetensors dtype names -> torch dtypes (the ones torch can hold)
SAFE_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class CheckpointError(MoecarveError, FileNotFoundError):
    """A model folder whose weights cannot be streamed (none, pickle only, missing shard)."""


def _weight_map(folder: Path, index_name: str, single_name: str) -> dict[str, str] | None:
    """tensor name -> file name, from the index or the single file; None when neither exists."""
    index = folder / index_name
    if index.exists():
        try:
            weight_map = dict(json.loads(index.read_text())["weight_map"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is damaged ({type(e).__name__}: {e}); replace it with a complete copy") from e
        missing = sorted({f for f in weight_map.values() if not (folder / f).exists()})
        if missing:
            raise CheckpointError(f"{index} names shard(s) missing from {folder}: {', '.join(missing)}")
        return weight_map
    if (folder / single_name).exists():
        return {}  # filled lazily from the file's own header
    return None


class Checkpoint:
    """The tensors of one model folder, read one at a time by name.

    Args:
        folder: a local model folder (config.json + weights).
        allow_pickle: also accept `pytorch_model*.bin` checkpoints when there is no safetensors.
    """

    def __init__(self, folder: str | Path, allow_pickle: bool = False):
        self.folder = Path(folder)
        if not (self.folder / "config.json").exists():
            raise CheckpointError(f"{self.folder} is not a local model folder (no config.json); streaming needs one")
        self._handles: dict[str, object] = {}
        self.pickle = False
        weight_map = _weight_map(self.folder, SAFE_INDEX, SAFE_SINGLE)
        if weight_map is None:
            bins = _weight_map(self.folder, BIN_INDEX, BIN_SINGLE)
            if bins is None:
                raise CheckpointError(f"{self.folder} holds no model weights (no *.safetensors or pytorch_model*.bin)")
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.folder} holds only pickle weights (pytorch_model*.bin), which can run arbitrary code when "
                    "loaded; convert them to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust them"
                )
            weight_map, self.pickle = bins, True
        # safetensors: where each tensor lies, from the headers (read now: a bad or truncated file fails early)
        self._entries: dict[str, Entry] = {}
        if not self.pickle:
            files = sorted(set(weight_map.values())) if weight_map else [SAFE_SINGLE]
            try:
                self._entries = {e.name: e for f in files for e in read_header(self.folder / f)}
            except TruncatedFile as e:
                raise CheckpointError(str(e)) from e
        if not weight_map:  # a single file: its tensor names come from its own header
            single = BIN_SINGLE if self.pickle else SAFE_SINGLE
            names = self._open(single).keys() if self.pickle else self._entries
            weight_map = {name: single for name in names}
        self.weight_map: dict[str, str] = weight_map

    def _open(self, file: str):
        """The memory-mapped state dict of a pickle checkpoint file."""
        if file not in self._handles:
            self._handles[file] = torch.load(self.folder / file, map_location="cpu", mmap=True, weights_only=True)
        return self._handles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def nbytes(self) -> int:
        """Bytes of all weight files on disk."""
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, read from disk (CPU), cast to `dtype` when given; KeyError when absent."""
        if name not in self.weight_map:
            raise KeyError(f"{self.folder}: the checkpoint has no tensor {name!r}")
        if self.pickle:
            t = self._open(self.weight_map[name])[name]
            # a private copy: a view of the memory map would keep the file's pages resident
            return t.clone() if dtype is None or t.dtype == dtype else t.to(dtype)
        t = read_tensor(self._entries[name])
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def close(self) -> None:
        """Drop the open memory maps (pickle only), so that the pages read so far stop counting as resident."""
        self._handles.clear()


def read_tensor(entry: Entry) -> torch.Tensor:
    """The tensor `entry` of a safetensors file, read into fresh memory (CPU, its stored dtype).

    Reads straight into the tensor's storage (readinto), so the bytes exist once; nothing stays
    mapped. Raises CheckpointError on a truncated file.
    """
    if entry.dtype not in SAFE_DTYPES:
        raise CheckpointError(f"{entry.file}: tensor {entry.name!r} has dtype {entry.dtype}, which torch cannot hold")
    t = torch.empty(entry.shape, dtype=SAFE_DTYPES[entry.dtype])
    if t.numel() * t.element_size() != entry.nbytes:
        raise CheckpointError(f"{entry.file}: tensor {entry.name!r} has {entry.nbytes} bytes for shape {entry.shape}")
    if not entry.nbytes:
        return t
    view = memoryview(t.view(-1).view(torch.uint8).numpy())  # safetensors is little-endian, as torch's CPUs
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        done = 0
        while done < entry.nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise CheckpointError(f"{entry.file} is truncated: tensor {entry.name!r} ends past the end of the file")
            done += n
    return t


def checkpoint_numel(folder: str | Path) -> int | None:
    """Elements in a local folder's safetensors (headers only), or None when it has none."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    return sum(math.prod(e.shape) for f in files for e in read_header(f))


def would_not_fit(model: str | Path, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether loading the whole local model in `dtype` would exceed 80% of the free memory of
    `device` (CPU RAM, or the GPU's); False for hub ids and folders without safetensors."""
    folder = Path(model)
    numel = checkpoint_numel(folder) if folder.is_dir() else None
    if numel is None:
        return False
    need = numel * torch.empty(0, dtype=dtype).element_size()
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return need > 0.8 * free
