"""Atomic output folders: write into a temporary sibling, rename into place on success.

After any error no partial output exists, and an existing folder is replaced only when asked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import MoecarveError


class OutputExists(MoecarveError, FileExistsError):
    """The output folder exists and overwrite was not requested."""


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any work) when `path` exists and may not be replaced."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExists(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    return path


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it becomes `path`, on error it vanishes."""
    path = check_output(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
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
