"""Keeps large freed host blocks in the process heap, so that XLA:CPU reuses them every step.

glibc serves a block above its mmap threshold (dynamic, at most 32 MiB) with a fresh ``mmap``
and unmaps it on ``free``, and trims free memory at the top of the heap. XLA:CPU allocates an
executable's temporaries on every call, so a step with large temporaries (the stax CNN's 51 MB
dense-layer gradient) page-faults through all of them on every step. Raising both thresholds
keeps such blocks for reuse. The cost: the process's resident size does not shrink after a
peak. The setting is process-wide, so the experiment runner applies it
(``trainer.reuse_host_memory``) and library functions never do. Figures:
docs/performance-notes.md ("Speed options").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# Blocks up to this size come from the heap and are reused; at most this much free memory stays
# at the top of the heap.
THRESHOLD_BYTES = 128 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)


def reuse_freed_memory(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Raises glibc's mmap and trim thresholds to ``threshold_bytes``; returns whether the
    setting took effect (False where the C library is not glibc: nothing is changed)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, threshold_bytes)
    )
