"""How the loop runs the steps on this machine: data parallelism, steps per dispatch,
reduced-precision compute and host memory. None of it changes what is computed
(up to floating-point reassociation for data parallelism and bf16 rounding for bf16).

Why each ``auto`` default is what it is, with the measurements: docs/performance-notes.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedjax_exp.core.typing import BatchExample, Params, PRNGKey
from fedjax_exp.experiment.algorithms import DATA_AXIS, Algorithm

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
STEPS_PER_DISPATCH = 8


def data_parallel_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def _cast_floats(tree: Any, dtype: Any) -> Any:
    def cast(x: Any) -> Any:
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)


def with_compute_dtype(model: Any, dtype: str | Any) -> Any:
    """``model`` whose training forward pass computes in ``dtype`` (e.g. "bfloat16").

    Parameters and floating batch features are cast to ``dtype`` inside ``apply_for_train``
    (gradients flow back through the cast, so they and the parameters stay float32) and the
    output is cast back to float32, so the loss runs in float32. Evaluation is unchanged.
    ``"float32"`` returns ``model`` itself.

    Raises:
      ValueError: an unknown dtype name.
    """
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"trainer.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}"
        )
    if name == "float32":
        return model
    compute = jnp.dtype(name)
    forward: Callable[..., Any] = model.apply_for_train

    def apply_for_train(params: Params, batch: BatchExample, rng: PRNGKey | None = None) -> Any:
        output = forward(_cast_floats(params, compute), _cast_floats(dict(batch), compute), rng)
        return _cast_floats(output, jnp.float32)

    return model.replace(apply_for_train=apply_for_train)


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
