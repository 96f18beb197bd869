"""Keep the C allocator from holding on to memory that torch has freed (glibc only).

Why: torch's CPU tensors come from malloc. glibc serves blocks above its mmap threshold with
mmap and unmaps them on free, but it raises that threshold (up to 32 MiB) every time such a
block is freed, so after the first few frees nearly every tensor of a decoder layer (weights of
9-24 MiB, activation chunks, expert slices) comes from the heap instead. A freed heap block stays
resident for reuse, and the heap fragments: carving layers of hidden 1536 / intermediate 4096
then kept 100-200 MiB of freed memory resident on top of what was live, growing from layer to
layer - as much as the carve's own working set (bench/memory.py, bench/RESULTS.md "Memory").

Two remedies, both glibc-only and no-ops elsewhere (musl, macOS, Windows):

* map_large_allocations(): a fixed mmap threshold (mallopt M_MMAP_THRESHOLD, 1 MiB), so every
  tensor of 1 MiB or more is mapped on its own and returned to the OS the moment it is freed:
  the peak is then what is live. It lasts for the rest of the process (glibc cannot go back to
  its dynamic threshold) and costs a page fault per 4 KiB of each new large tensor: the "cmoe"
  carve of bench/memory.py took ~15% longer with it, the "fitted" one (dominated by its solves)
  no measurable time. carve_streamed(tune_allocator=True), the default, calls it. The same
  effect for a whole process, set before it starts: MALLOC_MMAP_THRESHOLD_=1048576.
* release_freed_memory(): malloc_trim(0), returning every free heap page (glibc >= 2.8 also
  releases whole free pages inside the heap, not only at its top). No lasting effect; the
  streamed carve calls it after each layer.
"""

from __future__ import annotations

import ctypes
import functools

_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h
MMAP_THRESHOLD = 1 << 20  # bytes: far below a decoder layer's tensors, far above Python's small objects


@functools.cache
def _libc():
    """The C library if it is glibc (has malloc_trim and mallopt), else None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018  (AttributeError where they do not exist)
    except (OSError, AttributeError):
        return None
    return libc


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve every allocation of `threshold` bytes or more with its own mmap, for the rest of the
    process; False where that is not possible (not glibc)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the OS; False where that is not possible (not glibc)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
