"""Sharded safetensors output (the save_pretrained layout), assembled without loading tensors.

Carved layers are first written one file per layer; `write_shards` then packs their tensors into
shards of at most `max_shard_size` bytes by copying byte ranges file to file, so memory stays
flat whatever the model size. A safetensors file is: an 8-byte little-endian header length, a
JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}} and the
raw tensor bytes (offsets relative to the end of the header).
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import MoecarveError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_COPY_CHUNK = 4 << 20  # bytes copied at a time (small: this buffer counts in the peak)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class ShardSizeError(MoecarveError, ValueError):
    """A max shard size that cannot be parsed."""


def parse_size(size: str | int) -> int:
    """"5GB" -> 5_000_000_000 bytes (decimal units, as transformers; KiB/MiB/GiB binary)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
        if not m:
            raise ShardSizeError(f"cannot parse shard size {size!r}: use bytes or e.g. 500MB, 5GB")
        value = int(float(m.group(1)) * _UNITS[m.group(2) or ""])
    if value <= 0:
        raise ShardSizeError(f"the max shard size must be positive, got {size!r}")
    return value


@dataclass
class Entry:
    """One tensor inside a source safetensors file."""

    name: str
    file: Path
    start: int  # absolute byte offset in `file`
    nbytes: int
    dtype: str
    shape: list[int]


class TruncatedFile(MoecarveError, OSError):
    """A safetensors file that is cut short or is not a safetensors file at all."""


_MAX_HEADER = 100 << 20  # safetensors itself refuses headers above 100 MB


def read_header(path: Path) -> list[Entry]:
    """The tensors of a safetensors file, in file order (reads the header only).

    Raises TruncatedFile when the file is shorter than its header says (a cut-off copy or an
    interrupted write) or is not a safetensors file: every later read can trust the offsets.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if n is None or n > min(size - 8, _MAX_HEADER):
            raise TruncatedFile(f"{path} is truncated or not a safetensors file ({size} bytes); replace it with a complete copy")
        try:
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            entries = [Entry(k, path, 8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0], v["dtype"], v["shape"])
                       for k, v in header.items()]  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            raise TruncatedFile(f"{path} has a damaged safetensors header ({type(e).__name__}); replace it with a complete copy") from e
    end = max((e.start + e.nbytes for e in entries), default=8 + n)
    if end > size:
        raise TruncatedFile(f"{path} is truncated: its header describes {end} bytes, the file holds {size}; "
                            "replace it with a complete copy")  # fmt: skip
    return sorted(entries, key=lambda e: e.start)


def _write_one(dest: Path, entries: list[Entry]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as safetensors does
    with open(dest, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for e in entries:
            with open(e.file, "rb") as src:
                src.seek(e.start)
                left = e.nbytes
                while left:
                    chunk = src.read(min(left, _COPY_CHUNK))
                    if not chunk:  # the file shrank after its header was read: stop, never spin
                        raise TruncatedFile(f"{e.file} is truncated: tensor {e.name!r} ends past the end of the file")
                    out.write(chunk)
                    left -= len(chunk)


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Consecutive groups of at most max_bytes (a tensor larger than that gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def write_shards(sources: list[Path], folder: Path, max_shard_size: str | int = "5GB") -> list[str]:
    """Pack the tensors of `sources` into `folder` as save_pretrained names them; returns file names.

    One shard -> model.safetensors; several -> model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json ({"metadata": {"total_size"}, "weight_map"}).
    """
    entries = [e for src in sources for e in read_header(src)]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names across shard sources")
    shards = plan_shards(entries, parse_size(max_shard_size))
    if len(shards) == 1:
        _write_one(folder / SINGLE_NAME, shards[0])
        return [SINGLE_NAME]
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(files, shards):
        _write_one(folder / file, shard)
        weight_map.update({e.name: file for e in shard})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return files + [INDEX_NAME]
