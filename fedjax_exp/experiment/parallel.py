"""How the loop runs the steps on this machine: data parallelism, steps per dispatch,
reduced-precision compute (:mod:`fedjax_exp.core.compute_dtype`, re-exported here) and host
memory. None of it changes what is computed
(up to floating-point reassociation for data parallelism and bf16 rounding for bf16).

Why each ``auto`` default is what it is, with the measurements: docs/performance-notes.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from fedjax_exp.core.compute_dtype import COMPUTE_DTYPES, with_compute_dtype  # noqa: F401
from fedjax_exp.experiment.algorithms import DATA_AXIS, Algorithm

STEPS_PER_DISPATCH = 8


def data_parallel_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """How the loop runs the steps (none of it changes what is computed)."""

    steps_per_dispatch: int
    data_parallel: bool


def resolve_speed_settings(
    trainer: Mapping[str, Any],
    backend: str,
    *,
    num_devices: int,
    uses_convolution: Callable[[], bool | None],
) -> SpeedSettings:
    """The loop's speed settings from ``trainer`` (``auto`` or null resolved).

    - ``data_parallel``: with more than one device;
    - ``steps_per_dispatch``: 8, but 1 on CPU for a step that convolves or may
      (``uses_convolution()`` not False).
    """

    def setting(key: str) -> Any:
        value = trainer.get(key, "auto")
        return None if value == "auto" else value

    data_parallel = setting("data_parallel")
    if data_parallel is None:
        data_parallel = num_devices > 1
    spd = setting("steps_per_dispatch")
    if spd is None:
        convolves = backend == "cpu" and uses_convolution() is not False
        spd = 1 if convolves else STEPS_PER_DISPATCH
    return SpeedSettings(int(spd), bool(data_parallel))


def configure_host_memory(trainer: Mapping[str, Any], backend: str) -> bool:
    """Applies ``trainer.reuse_host_memory`` (auto: on the CPU backend, where XLA's
    temporaries live in host memory); returns whether freed blocks are now reused."""
    from fedjax_exp.experiment import host_memory

    wanted = trainer.get("reuse_host_memory", "auto")
    if wanted in ("auto", None):
        wanted = backend == "cpu"
    return bool(wanted) and host_memory.reuse_freed_memory()


def speed_up(algorithm: Algorithm, trainer: Mapping[str, Any]) -> SpeedSettings:
    """Resolves ``trainer``'s speed settings for this machine and ``algorithm`` and applies
    them to it (a data-parallel mesh); the loop takes
    ``steps_per_dispatch`` from the result.

    A vectorized sweep (several trials) runs on one device: ``auto`` never shards it.

    Raises:
      ValueError: a data-parallel setting the algorithm or batch size does not allow.
    """
    num_devices = jax.local_device_count() if algorithm.num_trials == 1 else 1
    settings = resolve_speed_settings(
        trainer,
        jax.default_backend(),
        num_devices=num_devices,
        uses_convolution=algorithm.uses_convolution,
    )
    if settings.data_parallel:
        algorithm.use_mesh(data_parallel_mesh())
    return settings
