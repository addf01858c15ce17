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
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.core.typing import Params, PRNGKey

# The vectorized and federated algorithms import these from here too.
from fedjax_exp.training.steps import (
    TrainState,
    centralized_update,
    multi_step,
    stack_inputs,
    uses_convolution,
)

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
