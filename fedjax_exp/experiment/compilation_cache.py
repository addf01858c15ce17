"""JAX's persistent compilation cache, on by default for runs (``trainer.compilation_cache``).

Why: every run compiles the same programs again (init, the K-step train program, evaluation
blocks); with the cache, the jobs of a sweep after the first and every re-run load them from
disk instead (figures: docs/performance-notes.md). Results do not change.

The cache is keyed by the program, the JAX/XLA version and the device, so a stale entry is
never used; it is best effort: a cache directory that cannot be written only costs the speed-up
(JAX warns and compiles as usual).
"""

from __future__ import annotations

import logging
import os
import pathlib

from fedjax_exp.experiment.validation import check_writable_dir

log = logging.getLogger(__name__)

# The least recently used programs are dropped beyond this (a logistic run stores ~0.5 MB).
MAX_SIZE_BYTES = 2 << 30


def enable(directory: str | os.PathLike[str] | None) -> pathlib.Path | None:
    """Points JAX's persistent compilation cache at ``directory`` (``~`` expanded) and caches
    every program, however fast it compiled. None disables it. Returns the directory in use,
    or None (disabled, or the directory cannot be written: then a warning is logged).

    Must run before the process compiles anything: JAX sets its cache up at the first compile.
    """
    if directory is None or str(directory).strip() == "":
        return None
    import jax

    path = pathlib.Path(os.path.expanduser(str(directory)))
    problem = check_writable_dir(path)  # Creates it when missing.
    if problem is not None:
        log.warning("compilation cache %s not used (%s); compiling as usual", path, problem)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # A size limit turns on JAX's LRU eviction, and with it a file lock around every read and
    # write: jobs of a parallel sweep then never read an entry another job is still writing.
    jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
    # JAX's defaults skip programs that compile in under a second: on CPU that is nearly all.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
