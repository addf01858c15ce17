"""Scaling a train step out: data parallelism over local devices, and bf16 compute.

Data parallelism uses ``jax.sharding``: a 1-D :class:`~jax.sharding.Mesh` named ``"data"``
over the local devices; every batch is split along its leading (example) axis across the
devices, the state (parameters, optimizer moments) is replicated, and the jitted step is
compiled with those shardings. XLA inserts the cross-device reductions (the mean loss and
its gradient), so the pure update is unchanged and the result equals single-device training
up to floating-point reassociation of the sums.

bf16 compute (:func:`with_compute_dtype`) keeps the parameters, optimizer state and
gradients in float32 and casts parameters and floating inputs to bfloat16 only for the
training forward pass; the model output is cast back to float32 before the loss. It halves
memory traffic and uses tensor cores on GPUs; on CPU it runs but is usually slower.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_exp.core.typing import BatchExample, Params, PRNGKey
from fedjax_exp.experiment import pipeline

DATA_AXIS = "data"
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def data_parallel_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh (axis ``"data"``) over ``devices`` (default: all local devices)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def check_batch_divisible(batch_size: int, num_devices: int) -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over ``num_devices``."""
    if batch_size % num_devices:
        lower = max(batch_size - batch_size % num_devices, num_devices)
        raise ValueError(
            f"trainer.batch_size={batch_size} does not divide over {num_devices} devices for "
            f"data-parallel training: use a multiple of {num_devices} (e.g. {lower} or "
            f"{lower + num_devices}) or set trainer.data_parallel=false"
        )


class DataParallelTraining:
    """Wraps an algorithm with a pure ``update(state, batch, rng)`` to train data-parallel.

    Implements the :class:`~fedjax_exp.experiment.algorithms.Algorithm` protocol: the state is
    replicated over ``mesh``, each batch is placed on the devices split along its leading axis
    (``jax.device_put`` returns at once; the copy overlaps the running step), and the step is
    jitted with those shardings and a donated state. The loop's fast path (:meth:`prepare`,
    :meth:`run_steps`) does the same for blocks of several steps.
    """

    def __init__(self, algorithm: Any, mesh: Mesh | None = None):
        update = getattr(algorithm, "update", None)
        if not callable(update):
            raise ValueError(
                f"{type(algorithm).__name__} has no pure update(state, batch, rng) to shard; "
                "set trainer.data_parallel=false"
            )
        self.algorithm = algorithm
        self.mesh = data_parallel_mesh() if mesh is None else mesh
        self.num_devices = self.mesh.devices.size
        batch_size = getattr(algorithm, "batch_size", None)
        if batch_size is not None:
            check_batch_divisible(int(batch_size), self.num_devices)
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
        self.update = update
        # Stacked step inputs (several steps per dispatch): split along the example axis.
        self.block_sharding = NamedSharding(self.mesh, PartitionSpec(None, DATA_AXIS))
        self._runs: dict[int, Callable[..., Any]] = {}
        self._step = jax.jit(
            update,
            in_shardings=(self.replicated, self.batch_sharding, self.replicated),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def place_state(self, state: Any) -> Any:
        """``state`` replicated on every device of the mesh."""
        return jax.device_put(state, self.replicated)

    def place_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """``batch`` split along its leading axis over the mesh."""
        leading = {np.shape(v)[0] for v in batch.values()}
        for size in leading:
            check_batch_divisible(int(size), self.num_devices)
        return jax.device_put(dict(batch), self.batch_sharding)

    def init(self, rng: PRNGKey) -> Any:
        return self.place_state(self.algorithm.init(rng))

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        """The wrapped stream's host inputs; :meth:`step` / :meth:`prepare` place them."""
        return self.algorithm.data_stream(seed, start)

    def step(self, state: Any, inputs: Any, rng: PRNGKey) -> tuple[Any, Mapping[str, jax.Array]]:
        if getattr(self.algorithm, "device_columns", None) is not None:
            inputs = self.algorithm.train_data.gather(np.asarray(inputs))  # Row indices.
        if not all(isinstance(v, jax.Array) for v in inputs.values()):
            inputs = self.place_batch(inputs)
        return self._step(state, inputs, rng)

    def eval_params(self, state: Any) -> Params:
        return self.algorithm.eval_params(state)

    # ---- several steps per dispatch (the loop's fast path) ----

    def enable_device_data(self) -> None:
        """The wrapped algorithm's train columns, replicated on every device of the mesh."""
        self.algorithm.enable_device_data(self.replicated)
        self._runs = {}

    def device_data_supported(self) -> bool:
        supported = getattr(self.algorithm, "device_data_supported", None)
        return bool(supported()) if callable(supported) else False

    def prepare(self, items: Sequence[Any]) -> Any:
        """Stacks raw stream items and starts their sharded transfer (on the prefetch thread)."""
        from fedjax_exp.experiment.algorithms import stack_inputs

        block = stack_inputs(items)
        for leaf in jax.tree_util.tree_leaves(block):
            check_batch_divisible(int(np.shape(leaf)[1]), self.num_devices)
        return jax.device_put(block, self.block_sharding)

    def run_steps(
        self, state: Any, block: Any, base_rng: PRNGKey, first_step: int
    ) -> tuple[Any, Mapping[str, jax.Array]]:
        from fedjax_exp.experiment.algorithms import multi_step

        num_steps = int(jax.tree_util.tree_leaves(block)[0].shape[0])
        run = self._runs.get(num_steps)
        if run is None:
            gather = getattr(self.algorithm, "gather", None)
            shardings = (self.replicated, self.block_sharding)
            run = self._runs[num_steps] = multi_step(self.update, num_steps, gather, shardings)
        columns = getattr(self.algorithm, "device_columns", None)
        return run(state, block, base_rng, first_step, columns)


def resolve_data_parallel(setting: Any, num_devices: int | None = None) -> bool:
    """``trainer.data_parallel`` (true, false or "auto") -> whether to shard.

    "auto" (and null) shard when there is more than one local device.
    """
    if setting is None or setting == "auto":
        count = jax.local_device_count() if num_devices is None else num_devices
        return count > 1
    if isinstance(setting, bool):
        return setting
    raise ValueError(f"trainer.data_parallel must be true, false or auto, got {setting!r}")


# ---------------------------------------------------------------------------------------------
# Reduced-precision compute


def _cast_floats(tree: Any, dtype: Any) -> Any:
    def cast(x: Any) -> Any:
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)


def with_compute_dtype(model: Any, dtype: str | Any) -> Any:
    """``model`` whose training forward pass computes in ``dtype`` (e.g. "bfloat16").

    Parameters and floating batch features are cast to ``dtype`` inside ``apply_for_train``
    (gradients flow back through the cast, so they and the parameters stay float32) and the
    output is cast back to float32, so the loss and its reduction run in float32. Evaluation
    is unchanged (float32). ``"float32"`` returns ``model`` itself.

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


# ---------------------------------------------------------------------------------------------
# The runner's speed settings: ``auto`` resolved per backend and model


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """How the loop runs the steps (none of it changes what is computed)."""

    steps_per_dispatch: int
    prefetch: int
    device_data: bool
    data_parallel: bool


# Measured on a 2-core CPU (scripts/bench_dispatch.py, /tmp loop benchmark in the issue note):
# the logistic model's loop ran 2.4x faster with device data + 8 steps per dispatch + no
# prefetch thread than with host batches, one step per dispatch and a prefetch thread of 2.
CPU_STEPS_PER_DISPATCH = 8
ACCELERATOR_STEPS_PER_DISPATCH = 8
# Host memory is the CPU "device": keep a copy of the train set there only when it is small.
CPU_DEVICE_DATA_BYTES = 1 << 30
DEVICE_DATA_FRACTION = 0.25


def resolve_speed_settings(
    trainer: Mapping[str, Any],
    backend: str,
    *,
    num_devices: int,
    device_data_supported: bool,
    data_bytes: int | None,
    device_bytes: int | None,
    uses_convolution: bool | None,
) -> SpeedSettings:
    """The loop's speed settings from ``trainer`` (``auto`` or null resolved).

    - ``data_parallel``: with more than one device;
    - ``device_data``: when supported and the train columns fit (a quarter of the device's
      memory on accelerators, 1 GiB on CPU, where the "device" is host memory and a copy
      would double it);
    - ``steps_per_dispatch``: 8 on accelerators (launch-bound small steps); on CPU 8 for
      models without convolutions and 1 with them (XLA:CPU ran a scanned Haiku CNN step 13x
      slower) or when unknown; then lowered to a divisor of ``trainer``'s log/eval/checkpoint
      intervals where one is close (:func:`~fedjax_exp.experiment.pipeline.even_steps_per_dispatch`:
      every dispatch as long, so one program is compiled);
    - ``prefetch``: 0 on CPU (a prefetch thread competes with XLA's for the cores and cost
      the logistic loop 25% on 2 cores), 2 on accelerators (it overlaps host work with the
      device).
    """
    cpu = backend == "cpu"

    def setting(key: str) -> Any:
        value = trainer.get(key, "auto")
        return None if value == "auto" else value

    data_parallel = setting("data_parallel")
    if data_parallel is None:
        data_parallel = num_devices > 1
    device_data = setting("device_data")
    if device_data is None:
        if data_bytes is None:
            fits = False
        elif cpu:
            fits = data_bytes <= CPU_DEVICE_DATA_BYTES
        else:
            limit = device_bytes if device_bytes is not None else 2 << 30
            fits = data_bytes <= DEVICE_DATA_FRACTION * limit
        device_data = device_data_supported and fits
    spd = setting("steps_per_dispatch")
    if spd is None:
        if not cpu:
            spd = ACCELERATOR_STEPS_PER_DISPATCH
        else:
            spd = CPU_STEPS_PER_DISPATCH if uses_convolution is False else 1
        intervals = [trainer.get(k, 0) for k in ("log_every", "eval_every", "checkpoint_every")]
        spd = pipeline.even_steps_per_dispatch(spd, [int(i or 0) for i in intervals])
    prefetch = setting("prefetch")
    if prefetch is None:
        prefetch = 0 if cpu else 2
    return SpeedSettings(
        steps_per_dispatch=int(spd),
        prefetch=int(prefetch),
        device_data=bool(device_data),
        data_parallel=bool(data_parallel),
    )


def configure_host_memory(trainer: Mapping[str, Any], backend: str) -> bool:
    """Applies ``trainer.reuse_host_memory`` (auto: on the CPU backend, where XLA's
    temporaries live in host memory); returns whether freed blocks are now reused.

    See :mod:`fedjax_exp.experiment.host_memory` for why and what it costs.
    """
    from fedjax_exp.experiment import host_memory

    wanted = trainer.get("reuse_host_memory", "auto")
    if wanted in ("auto", None):
        wanted = backend == "cpu"
    return bool(wanted) and host_memory.reuse_freed_memory()


def resolve_for_algorithm(
    algorithm: Any, trainer: Mapping[str, Any], num_devices: int | None = None
) -> SpeedSettings:
    """:func:`resolve_speed_settings` for ``algorithm`` on this machine: whether it supports
    device data (``device_data_supported()``), the size of its ``train_data``, whether its
    step convolves (``uses_convolution()``, probed only where it decides something), and
    ``num_devices`` (default: all local devices)."""
    supported = getattr(algorithm, "device_data_supported", None)
    is_supported = bool(supported()) if callable(supported) else False
    data_bytes = getattr(getattr(algorithm, "train_data", None), "nbytes", None)
    device_bytes = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    backend = jax.default_backend()
    conv = None
    if backend == "cpu" and trainer.get("steps_per_dispatch", "auto") in ("auto", None):
        probe = getattr(algorithm, "uses_convolution", None)
        conv = probe() if callable(probe) else None
    return resolve_speed_settings(
        trainer,
        backend,
        num_devices=jax.local_device_count() if num_devices is None else num_devices,
        device_data_supported=is_supported,
        data_bytes=data_bytes,
        device_bytes=device_bytes,
        uses_convolution=conv,
    )


def speed_up(algorithm: Any, trainer: Mapping[str, Any]) -> tuple[Any, SpeedSettings]:
    """Resolves ``trainer``'s speed settings for this machine and ``algorithm`` and applies
    them: wraps the algorithm for data parallelism and moves its train data to the device.

    Returns the (possibly wrapped) algorithm and the settings; the loop takes
    ``steps_per_dispatch`` and ``prefetch`` from them.

    Raises:
      ValueError: ``device_data=true`` for data that cannot live on the device, or a
        data-parallel setting the batch size does not allow.
    """
    settings = resolve_for_algorithm(algorithm, trainer)
    supported = getattr(algorithm, "device_data_supported", None)
    if settings.data_parallel:
        algorithm = DataParallelTraining(algorithm)
    if settings.device_data:
        if not (callable(supported) and supported()):
            raise ValueError(
                "trainer.device_data=true needs centralized training on in-memory column data "
                "without a client preprocessor; set trainer.device_data=false"
            )
        algorithm.enable_device_data()
    return algorithm, settings
