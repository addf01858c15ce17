"""JAX's persistent compilation cache (``trainer.compilation_cache``, on by default): a
sweep's later jobs and re-runs load their programs from disk (docs/performance-notes.md).
Best effort: an unwritable cache dir only costs the speed-up."""

from __future__ import annotations

import logging
import os
import pathlib

from fedjax_exp.experiment.validation import check_writable_dir

log = logging.getLogger(__name__)

# The least recently used programs are dropped beyond this (a logistic run stores ~0.5 MB).
MAX_SIZE_BYTES = 2 << 30


def enable(directory: str | os.PathLike[str] | None) -> pathlib.Path | None:
    """Caches every program in ``directory`` (None: off); returns the dir in use or None.
    Must run before the first compile."""
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
