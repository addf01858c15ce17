"""Training algorithms: what the loop's steps do to the state.

The loop (:mod:`fedjax_exp.experiment.loop`) and the speed settings
(:mod:`fedjax_exp.experiment.parallel`) only use the :class:`Algorithm` protocol. Centralized
training draws one shuffled batch per step; a vectorized sweep
(:class:`~fedjax_exp.experiment.vectorized.VectorizedTraining`) is the same algorithm over a
trials axis; a federated algorithm (a round of sampled clients per step) is another
implementation, selected by ``algorithm=...`` in the config.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, BatchExample, Params, PRNGKey

DATA_AXIS = "data"


class Algorithm(Protocol):
    """A training algorithm driven by the experiment loop."""

    num_trials: int
    """Trials trained side by side (1 for a plain run); the step scalars of
    :meth:`run_steps` carry a trailing axis of this size when it is above 1."""

    def init(self, rng: PRNGKey) -> Any:
        """The initial state pytree (everything a checkpoint must hold besides the step)."""

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        """Host step inputs from position ``start`` on: input ``k`` is the same for every call."""

    def prepare(self, items: Sequence[Any]) -> Any:
        """Several step inputs made into one block (stacked, transfer to the device started)."""

    def run_steps(
        self, state: Any, block: Any, base_rng: PRNGKey, first_step: int
    ) -> tuple[Any, Mapping[str, jax.Array]]:
        """The steps of ``block`` as one dispatch: step ``first_step + i`` uses the key
        ``fold_in(base_rng, first_step + i)``. Returns the new state and device-side scalars
        with a leading steps axis (e.g. ``{"loss": ...}``); ``state`` is donated. Must not
        synchronise with the host: the loop reads the scalars at log intervals only."""

    def eval_params(self, state: Any, trial: int = 0) -> Params:
        """The parameters of trial ``trial`` to evaluate in ``state``."""

    def uses_convolution(self) -> bool | None:
        """Whether the step convolves (None: unknown); decides steps per dispatch on CPU."""

    def use_mesh(self, mesh: Mesh) -> None:
        """Trains data-parallel over ``mesh``; raises ValueError where it cannot."""


@dataclass
class TrainState:
    """Parameters and optimizer state of centralized training."""

    params: Params
    opt_state: Any


def masked_mean_loss(
    model: Any, params: Params, batch: BatchExample, rng: PRNGKey | None
) -> jax.Array:
    """Mean of ``model.train_loss`` over the real (unmasked) examples of ``batch``."""
    per_example = model.train_loss(batch, model.apply_for_train(params, batch, rng))
    mask = batch.get(EXAMPLE_MASK_KEY)
    if mask is None:
        return jnp.mean(per_example)
    mask = mask.astype(per_example.dtype)
    # max(.., 1): an all-padding batch contributes zero loss and zero gradient, not NaN.
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def centralized_update(
    model: Any, optimizer: Any
) -> Callable[[TrainState, BatchExample, PRNGKey], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step ``(state, batch, rng) -> (state, {"loss": loss})`` (not jitted)."""

    def update(state: TrainState, batch: BatchExample, rng: PRNGKey):
        loss, grads = jax.value_and_grad(lambda p: masked_mean_loss(model, p, batch, rng))(
            state.params
        )
        opt_state, params = optimizer.apply(grads, state.opt_state, state.params)
        return TrainState(params=params, opt_state=opt_state), {"loss": loss}

    return update


def multi_step(
    update: Callable[[Any, Any, PRNGKey], tuple[Any, Mapping[str, jax.Array]]],
    num_steps: int,
    shardings: tuple[Any, Any] | None = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """``num_steps`` steps of ``update`` as one jitted dispatch with a donated state.

    The result is ``run(state, block, base_rng, first_step) -> (state, scalars)``: ``block``
    stacks the step inputs along a leading axis; step ``first_step + i`` uses
    ``fold_in(base_rng, first_step + i)`` (per row for keys stacked over trials); ``scalars``
    have a leading ``num_steps`` axis. ``num_steps > 1`` is a ``lax.scan``. ``shardings =
    (replicated, block_sharding)`` compiles for a device mesh.
    """

    def one(state: Any, batch: Any, base_rng: PRNGKey, step: jax.Array) -> Any:
        # Keys stacked over trials (a vectorized sweep): each trial folds in its own.
        fold = jax.random.fold_in if base_rng.ndim == 1 else jax.vmap(jax.random.fold_in, (0, None))
        return update(state, batch, fold(base_rng, step))

    def run(state: Any, block: Any, base_rng: PRNGKey, first_step: jax.Array):
        if num_steps == 1:
            inputs = jax.tree_util.tree_map(lambda x: x[0], block)
            state, scalars = one(state, inputs, base_rng, first_step)
            return state, jax.tree_util.tree_map(lambda x: x[None], dict(scalars))

        def body(state: Any, xs: tuple[Any, jax.Array]) -> Any:
            return one(state, xs[0], base_rng, xs[1])

        steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
        return jax.lax.scan(body, state, (block, steps))

    kwargs: dict[str, Any] = {}
    if shardings is not None:
        replicated, block_sharding = shardings
        kwargs = dict(
            in_shardings=(replicated, block_sharding, replicated, replicated),
            out_shardings=(replicated, replicated),
        )
    jitted = jax.jit(run, donate_argnums=0, **kwargs)

    def call(state: Any, block: Any, base_rng: PRNGKey, first_step: int):
        return jitted(state, block, base_rng, np.int32(first_step))

    return call


def uses_convolution(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` computes a convolution, nested calls included (traced
    abstractly: ``args`` may be ``jax.ShapeDtypeStruct`` s; nothing runs)."""
    return "conv_general_dilated" in str(jax.make_jaxpr(fn)(*args))


def stack_inputs(items: Sequence[Any]) -> Any:
    """Step inputs stacked along a new leading axis, on the host (NumPy)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *items)


def check_batch_divisible(batch_size: int, num_devices: int) -> None:
    """Raises ValueError unless ``batch_size`` splits evenly over ``num_devices``."""
    if batch_size % num_devices:
        lower = max(batch_size - batch_size % num_devices, num_devices)
        raise ValueError(
            f"trainer.batch_size={batch_size} does not divide over {num_devices} devices for "
            f"data-parallel training: use a multiple of {num_devices} (e.g. {lower} or "
            f"{lower + num_devices}) or set trainer.data_parallel=false"
        )


class CentralizedTraining:
    """One optimizer step per shuffled batch pooled across all clients of the train data.

    Batches come from the data layer's shuffle-repeat stream (``batch_size`` examples, clients
    shuffled within ``client_buffer_size``, examples within ``example_buffer_size``). The pure
    :attr:`update` is what :meth:`run_steps` scans, the vectorized sweep vmaps and the mesh
    shards; :meth:`step` is the plain jitted step (the reference the fast paths must equal).
    """

    num_trials = 1

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        train_data: Any,
        batch_size: int,
        client_buffer_size: int,
        example_buffer_size: int,
    ):
        self.model = model
        self.optimizer = optimizer
        self.train_data = train_data
        self.batch_size = batch_size
        self.client_buffer_size = client_buffer_size
        self.example_buffer_size = example_buffer_size
        self.update = centralized_update(model, optimizer)
        self.step = jax.jit(self.update, donate_argnums=0)
        self.shardings: tuple[NamedSharding, NamedSharding] | None = None
        self._runs: dict[int, Callable[..., Any]] = {}

    def _column_data(self) -> InMemoryFederatedData | None:
        fd = self.train_data
        ok = isinstance(fd, InMemoryFederatedData) and fd.supports_column_batching
        return fd if ok else None

    def init(self, rng: PRNGKey) -> TrainState:
        params = self.model.init(rng)
        state = TrainState(params=params, opt_state=self.optimizer.init(params))
        return state if self.shardings is None else jax.device_put(state, self.shardings[0])

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        from fedjax_exp.core import federated_data

        fd = self._column_data()
        args = (self.batch_size, self.client_buffer_size, self.example_buffer_size, seed)
        if fd is not None:  # The column store restarts at any batch without replaying.
            return fd.shuffle_repeat_batches(*args, start_batch=start)
        stream = federated_data.shuffle_repeat_batch_federated_data(self.train_data, *args)
        return itertools.islice(stream, start, None)

    def prepare(self, items: Sequence[Any]) -> Any:
        block = stack_inputs(items)
        if self.shardings is None:
            return jax.device_put(block)
        for leaf in jax.tree_util.tree_leaves(block):
            check_batch_divisible(int(np.shape(leaf)[1]), self.shardings[1].mesh.size)
        return jax.device_put(block, self.shardings[1])

    def run_steps(
        self, state: TrainState, block: Any, base_rng: PRNGKey, first_step: int
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        num_steps = int(jax.tree_util.tree_leaves(block)[0].shape[0])
        if num_steps not in self._runs:
            self._runs[num_steps] = multi_step(self.update, num_steps, self.shardings)
        return self._runs[num_steps](state, block, base_rng, first_step)

    def eval_params(self, state: TrainState, trial: int = 0) -> Params:
        return state.params

    def uses_convolution(self) -> bool | None:
        fd = self._column_data()
        if fd is None:
            return None
        batch = dict(fd.gather(np.arange(min(2, fd.num_examples))))
        key = jax.random.PRNGKey(0)
        abstract = {
            k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()
        }
        return uses_convolution(self.update, jax.eval_shape(self.init, key), abstract, key)

    def use_mesh(self, mesh: Mesh) -> None:
        """Data parallelism over ``mesh`` (a 1-D mesh named ``"data"``): the state is
        replicated, every batch split along its examples; XLA inserts the cross-device sums,
        so the result equals one device's up to reassociation of those sums."""
        check_batch_divisible(self.batch_size, mesh.size)
        self.shardings = (
            NamedSharding(mesh, PartitionSpec()),
            NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)),
        )
        self._runs = {}
