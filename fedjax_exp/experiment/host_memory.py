"""Keeps large freed blocks in the process heap, so that XLA:CPU reuses them step after step.

Why: glibc's ``malloc`` serves a block above its mmap threshold with a fresh ``mmap`` and gives
it back on ``free``, so a step whose temporaries are large (the stax CNN's 51 MB dense-layer
gradient) page-faults and zeroes every page of them on every step. Raising the thresholds keeps
freed blocks for reuse (figures: docs/performance-notes.md). The cost: a process's resident
size does not shrink after a peak. The setting is process-wide, so the runner applies it
(``trainer.reuse_host_memory``), never the library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap and are reused, and at most this much free memory
# stays at the top of the heap (the peak-RSS trade-off: docs/performance-notes.md).
REUSE_THRESHOLD_BYTES = 128 << 20


def reuse_freed_memory(threshold_bytes: int = REUSE_THRESHOLD_BYTES) -> bool:
    """Raises glibc's mmap and trim thresholds to ``threshold_bytes``, so freed blocks up to
    that size are reused by later allocations instead of being unmapped and mapped again.

    Returns True when the setting is in effect (Linux with glibc), False elsewhere (other C
    libraries manage memory their own way; nothing is changed). Calling it again is harmless.
    """
    if threshold_bytes <= 0:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    threshold = min(int(threshold_bytes), 2**31 - 1)  # mallopt takes an int.
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(_M_TRIM_THRESHOLD, threshold)
    )
