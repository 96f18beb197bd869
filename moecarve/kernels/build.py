"""Compile moecarve's C sources into a shared library on first use, once per machine.

The system C compiler (`$CC`, else cc / gcc / clang) builds with -O3 -march=native into a per-user
cache (`$MOECARVE_CACHE`, else `$XDG_CACHE_HOME/moecarve/kernels`, else ~/.cache/...), keyed by
the sources and headers, the flags, the compiler's version and the CPU (what -march=native
depends on), so a change to any of them builds anew and an unchanged one loads in milliseconds.
Concurrent builders each write a temporary file and rename it into place: the same bytes win.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path


class BuildError(RuntimeError):
    """The C sources could not be compiled (no compiler, or it failed)."""


def cache_dir() -> Path:
    root = os.environ.get("MOECARVE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "moecarve" / "kernels"


def compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc.split()[0]):
            return cc
    return None


def flags() -> list[str]:
    out = ["-O3", "-fPIC", "-shared", "-fopenmp-simd", "-std=c11"]
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        out += ["-march=native", "-mprefer-vector-width=512"]
    elif machine in ("aarch64", "arm64"):
        out += ["-mcpu=native"]
    return out


def cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def build_library(name: str, sources: list[Path], include_dirs: list[Path] = (), libs: list[str] = ()) -> Path:
    """The path of a shared library built from `sources` (C files; the headers of their folders and
    of `include_dirs` count in the cache key), building it if the cache has no current copy."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler found (set CC)")
    opts = flags() + [f"-I{d}" for d in include_dirs]
    headers = sorted({h for d in [*(s.parent for s in sources), *include_dirs] for h in Path(d).glob("*.h")})
    version = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True).stdout
    text = [p.read_text() for p in [*sources, *headers]]
    key = hashlib.sha256("\0".join([*text, cc, " ".join(opts), " ".join(libs), version, cpu_id()]).encode()).hexdigest()[:16]
    lib_path = cache_dir() / f"{name}-{key}.so"
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib_path.parent) as tmp:
            out = Path(tmp) / lib_path.name
            cmd = [*cc.split(), *opts, *map(str, sources), "-o", str(out), "-lm", *libs]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise BuildError(f"{cc} failed: {proc.stderr.strip()[-2000:]}")
            os.replace(out, lib_path)  # atomic: concurrent builders each produce the same file
    return lib_path
