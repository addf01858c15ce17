"""Training algorithms: what one step of the loop does to the state.

The loop (:mod:`fedjax_exp.experiment.loop`) only knows the :class:`Algorithm` protocol: a
state pytree, a stream of step inputs that can restart at any position, a step function and
the parameters to evaluate. Centralized training draws one shuffled batch per step; a
federated algorithm (FedAvg: a round of sampled clients per step) is another implementation
of the same protocol, selected by ``algorithm=...`` in the config.

The pure update (:meth:`CentralizedTraining.update`) is kept apart from its jitted wrapper so it
can be reused: scanned over several steps per dispatch, vmapped over hyper-parameters, or
sharded over devices.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, BatchExample, Params, PRNGKey


class Algorithm(Protocol):
    """A training algorithm driven by the experiment loop."""

    def init(self, rng: PRNGKey) -> Any:
        """The initial state pytree (everything a checkpoint must hold besides the step)."""

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        """Step inputs from position ``start`` on: input ``k`` is the same for every call."""

    def step(self, state: Any, inputs: Any, rng: PRNGKey) -> tuple[Any, Mapping[str, jax.Array]]:
        """One step; returns the new state and device-side scalars (e.g. ``{"loss": ...}``).

        Must not synchronise with the host: the loop reads the scalars only at log intervals.
        The input ``state`` may be donated (invalid after the call).
        """

    def eval_params(self, state: Any) -> Params:
        """The parameters to evaluate in ``state``."""


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

    def update(
        state: TrainState, batch: BatchExample, rng: PRNGKey
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads = jax.value_and_grad(lambda p: masked_mean_loss(model, p, batch, rng))(
            state.params
        )
        opt_state, params = optimizer.apply(grads, state.opt_state, state.params)
        return TrainState(params=params, opt_state=opt_state), {"loss": loss}

    return update


class CentralizedTraining:
    """One optimizer step per shuffled batch pooled across all clients of the train data.

    Batches come from the data layer's shuffle-repeat stream (``batch_size`` examples, clients
    shuffled within ``client_buffer_size``, examples within ``example_buffer_size``).
    """

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
        # Donating the state lets XLA update parameters and moments in place.
        self._step = jax.jit(self.update, donate_argnums=0)

    def init(self, rng: PRNGKey) -> TrainState:
        params = self.model.init(rng)
        return TrainState(params=params, opt_state=self.optimizer.init(params))

    def data_stream(self, seed: int, start: int) -> Iterator[BatchExample]:
        from fedjax_exp.core import federated_data

        fd = self.train_data
        if getattr(fd, "supports_column_batching", False):
            # The column store restarts at any batch without replaying the ones before.
            return fd.shuffle_repeat_batches(
                self.batch_size,
                self.client_buffer_size,
                self.example_buffer_size,
                seed,
                start_batch=start,
            )
        stream = federated_data.shuffle_repeat_batch_federated_data(
            fd, self.batch_size, self.client_buffer_size, self.example_buffer_size, seed
        )
        return itertools.islice(stream, start, None)

    def step(
        self, state: TrainState, inputs: BatchExample, rng: PRNGKey
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        return self._step(state, inputs, rng)

    def eval_params(self, state: TrainState) -> Params:
        return state.params
