"""Atomic output folders: write into a temporary sibling, rename into place on success.

After any error no partial output exists, and an existing folder is replaced only when asked,
and only when it is safe to: a folder moecarve wrote (it holds the MARKER file every atomic_dir
writes) or an empty one. The current folder, its parents, `/` and the inputs of a command are
never replaced. Temporary siblings left by a killed run (`.NAME.tmp-*`, `.NAME.old-*`) are
removed by the next run that writes NAME.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

from ..errors import MoecarveError

MARKER = ".moecarve-output"  # written into every output folder: what --overwrite may replace
MARKER_TEXT = "This folder was written by moecarve; `--overwrite` (overwrite=True) may replace it.\n"


class OutputExists(MoecarveError, FileExistsError):
    """The output folder exists and overwrite was not requested."""


class UnsafeOutput(MoecarveError, PermissionError):
    """An output path that must never be replaced or written (cwd, /, an input, someone else's folder)."""


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_writable(folder: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """The nearest existing folder among `folder` and its parents, checked to accept new entries
    (target: what will be created there, for the message).

    Probes by creating (and removing at once) a temporary folder there: permission bits, read-only
    mounts and ACLs answer the way the real write will, before any work is done.
    """
    folder = probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UnsafeOutput(f"cannot write {target or folder}: {probe} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".moecarve-probe-", dir=probe))
    except OSError as e:
        raise UnsafeOutput(f"cannot write {target or folder}: {probe} is not writable ({e.strerror})") from e
    return probe


def check_not_protected(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Refuse a folder that a command may fill or replace when it is `/`, the current folder or a
    parent of it, or is (or holds) one of `inputs`; returns it as a Path."""
    path = Path(path).expanduser()
    full = path.resolve()
    cwd = Path.cwd().resolve()
    if _inside(cwd, full):  # "/", ".", "..", the cwd by its absolute name
        root = full == Path(full.anchor)
        where = "/" if root else "the current folder" if full == cwd else "a parent of the current folder"
        example = Path("out") if root else path / "out"
        raise UnsafeOutput(f"refusing to write the output to {str(path)!r}: it is {where}; name a new folder, e.g. {example}")
    for inp in inputs:
        if inp is not None and Path(inp).exists() and _inside(Path(inp).resolve(), full):
            raise UnsafeOutput(f"refusing to write the output to {str(path)!r}: it is (or holds) the input {str(inp)!r}; "
                               "choose another output folder")  # fmt: skip
    return path


def check_output(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """Fail early (before any work) when `path` may not be written or replaced; returns it as a Path.

    Refused always: `/`, the current folder or any parent of it, a path that is or contains one of
    `inputs` (local files or folders the command reads), an existing file, an unwritable parent.
    Refused unless overwrite: an existing folder. Refused even with overwrite: a non-empty folder
    without moecarve's MARKER (moecarve did not write it: replacing it would delete someone's files).
    """
    path = check_not_protected(path, inputs)
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise UnsafeOutput(f"{path} exists and is not a folder; choose another output folder")
        if not overwrite:
            raise OutputExists(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
        if not (path / MARKER).is_file() and any(path.iterdir()):
            raise UnsafeOutput(
                f"refusing to replace {path}: it is not empty and moecarve did not write it (no {MARKER} file); "
                "choose another output folder, or move its files away yourself"
            )
    check_writable(path.absolute().parent, path)
    return path


def _stale_siblings(path: Path) -> list[Path]:
    """Temporary folders a killed run of this output left beside it (only names atomic_dir creates)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(tmp|old)-[A-Za-z0-9_]{{8}}")
    if not path.parent.is_dir():
        return []
    return [p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it becomes `path`, on error it vanishes.

    The folder gets moecarve's MARKER first, so a later overwrite=True recognises it as ours. The old
    `path` (when replaced) is removed only after the new folder is complete and in place.
    """
    path = check_output(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_siblings(path):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; an output folder gets the usual mode
        (tmp / MARKER).write_text(MARKER_TEXT)
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
