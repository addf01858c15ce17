"""Training algorithms: what the loop's steps do to the state. The loop and
:mod:`.parallel` use only the :class:`Algorithm` protocol; implementations: centralized
training here, :mod:`.vectorized` sweeps and :mod:`.federated` rounds."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.core.typing import Params, PRNGKey
from fedjax_exp.experiment.errors import ConfigError

# The vectorized and federated algorithms import these from here too.
from fedjax_exp.training.steps import (
    TrainState,
    centralized_update,
    model_uses_convolution,
    multi_step,
    stack_inputs,
)

DATA_AXIS = "data"


class Algorithm(Protocol):
    """A training algorithm driven by the experiment loop. ``num_trials``: trials trained
    side by side (1 for a plain run; above 1 the step scalars carry a trailing trials axis).
    Implementations subclass it for the defaults of the last two methods."""

    num_trials: int

    def init(self, rng: PRNGKey) -> Any:
        """The initial state pytree (everything a checkpoint must hold besides the step)."""

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        """Host step inputs from position ``start`` on (input ``k`` is always the same)."""

    def prepare(self, items: Sequence[Any]) -> Any:
        """Step inputs stacked into one block, its transfer to the device started."""

    def run_steps(
        self, state: Any, block: Any, base_rng: PRNGKey, first_step: int
    ) -> tuple[Any, Mapping[str, jax.Array]]:
        """The block's steps as one dispatch (step ``k``'s key: ``fold_in(base_rng, k)``):
        the new state and device-side scalars with a leading steps axis; ``state`` is
        donated, and nothing syncs with the host."""

    def eval_params(self, state: Any, trial: int = 0) -> Params: ...

    def uses_convolution(self) -> bool | None:
        """Whether the step convolves (None: unknown); decides steps per dispatch on CPU."""

    def use_mesh(self, mesh: Mesh) -> None:
        """Trains data-parallel over ``mesh``; ConfigError where it cannot."""

    def logged_scalars(self, step: int) -> dict[str, float]:
        """Host values logged with the train scalars at ``step`` (e.g. DP's privacy spent)."""
        return {}

    def periodic_eval_batches(self, splits: dict, batch_size: int, seed: int) -> dict:
        """Per split, the batches periodic evaluation uses ({}: each split's first ones)."""
        return {}


def check_batch_divisible(batch_size: int, num_devices: int) -> None:
    """ConfigError unless ``batch_size`` splits evenly over ``num_devices``."""
    if batch_size % num_devices:
        lower = max(batch_size - batch_size % num_devices, num_devices)
        raise ConfigError(
            f"trainer.batch_size={batch_size} does not divide over {num_devices} devices for "
            f"data-parallel training: use a multiple of {num_devices} (e.g. {lower} or "
            f"{lower + num_devices}) or set trainer.data_parallel=false"
        )


class CentralizedTraining(Algorithm):
    """One optimizer step per shuffle-repeat batch pooled across the train clients.
    :attr:`update` is what :meth:`run_steps` scans, a sweep vmaps and a mesh shards;
    :meth:`step` is the plain jitted step (the reference the fast paths must equal)."""

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
        self.model, self.optimizer, self.train_data = model, optimizer, train_data
        self.batch_size = batch_size
        self.buffer_sizes = (client_buffer_size, example_buffer_size)
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
        args = (self.batch_size, *self.buffer_sizes, seed)
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
        return model_uses_convolution(self.model, fd.gather(np.arange(min(2, fd.num_examples))))

    def use_mesh(self, mesh: Mesh) -> None:
        """Data parallelism over ``mesh``: the state replicated, every batch split along its
        examples (equal to one device's up to reassociation of XLA's sums)."""
        check_batch_divisible(self.batch_size, mesh.size)
        self.shardings = (
            NamedSharding(mesh, PartitionSpec()),
            NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)),
        )
        self._runs = {}
