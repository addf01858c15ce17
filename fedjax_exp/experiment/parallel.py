"""How the loop runs the steps on this machine: data parallelism, steps per dispatch, host
memory reuse and compute dtype (:mod:`fedjax_exp.core.compute_dtype`). None of it changes
what is computed (up to reassociation and bf16 rounding); why each ``auto`` is what it is:
docs/performance-notes.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from fedjax_exp.core.compute_dtype import with_compute_dtype  # noqa: F401 - re-exported
from fedjax_exp.experiment.algorithms import DATA_AXIS, Algorithm
from fedjax_exp.training import host_memory

STEPS_PER_DISPATCH = 8


def data_parallel_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


class SpeedSettings(NamedTuple):
    steps_per_dispatch: int
    data_parallel: bool
    reuse_host_memory: bool


def speed_up(
    algorithm: Algorithm,
    trainer: Mapping[str, Any],
    *,
    backend: str | None = None,
    num_devices: int | None = None,
) -> SpeedSettings:
    """Resolves ``trainer``'s ``auto`` speed settings and applies them to ``algorithm``:
    data-parallel with more than one device (never a sweep of several trials); 8 steps per
    dispatch, but 1 on CPU for a step that convolves or may; freed host memory reused on CPU
    (:mod:`fedjax_exp.training.host_memory`, process-wide). ConfigError for a data-parallel
    setting the algorithm or batch size does not allow."""
    cpu = (backend or jax.default_backend()) == "cpu"
    if num_devices is None:
        num_devices = jax.local_device_count() if algorithm.num_trials == 1 else 1
    data_parallel = trainer.get("data_parallel", "auto")
    if data_parallel in ("auto", None):
        data_parallel = num_devices > 1
    steps = trainer.get("steps_per_dispatch", "auto")
    if steps in ("auto", None):
        steps = 1 if cpu and algorithm.uses_convolution() is not False else STEPS_PER_DISPATCH
    if data_parallel:
        algorithm.use_mesh(data_parallel_mesh())
    reuse = trainer.get("reuse_host_memory", "auto")
    reuse = bool(cpu if reuse in ("auto", None) else reuse) and host_memory.reuse_freed_memory()
    return SpeedSettings(int(steps), bool(data_parallel), reuse)
