# SPDX-License-Identifier: GPL-3.0-or-later
"""How the OAVM processes (service, farm batch, demo, bench) ask the C heap to treat the network's buffers.

Every CPU step allocates and frees the same large activation maps (20 MB for the decoder's full-resolution map at
512x288, >100 MB at 4K). glibc's malloc maps blocks that large afresh and unmaps them on ``free``, or trims them off
the heap top after the step, so each step pays the kernel to zero them again: 8,000-14,000 page faults per 512x288
frame, 33,000 per 4K frame, 36-134 ms of system time (2-core EPYC). Raising the mmap and trim thresholds keeps
freed blocks in the heap for the next step: 512x288@1 0.80-0.87x the time (eight alternating process pairs),
4K@0.125 701 -> 584 ms, the RSS peak within +7 %. The service hands the kept memory back when a clip closes
(:func:`release_freed_memory`).

Process-wide, so only the entry points call :func:`keep_freed_memory` (``oavm`` and ``python -m bench``), never a
library import: a host application (Nuke's Python running the engine in-process) keeps its own allocator
settings. Elsewhere than glibc (macOS, Windows, musl) both functions do nothing and return False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1   # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 1 << 30    # blocks up to 1 GiB come from the heap (4K frames' maps are >100 MB) ...
TRIM_BYTES = 256 << 20  # ... and up to 256 MiB of free heap top is kept (enough for no faults at 4K@0.125)


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def keep_freed_memory(mmap_bytes: int = MMAP_BYTES, trim_bytes: int = TRIM_BYTES) -> bool:
    """Serve blocks up to ``mmap_bytes`` from the heap and keep up to ``trim_bytes`` of free heap top for reuse.

    Returns True if glibc took both settings, False where there is no glibc (nothing changed)."""
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_bytes))) and \
        bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_bytes)))


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system (``malloc_trim(0)``): after a clip's buffers are gone.

    Returns True if glibc released memory, False if there was none to release or no glibc."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None and hasattr(libc, "malloc_trim") else False
