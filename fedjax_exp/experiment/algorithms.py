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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np

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


def multi_step(
    update: Callable[[Any, Any, PRNGKey], tuple[Any, Mapping[str, jax.Array]]],
    num_steps: int,
    gather: Callable[[Any, Any], Any] | None = None,
    shardings: tuple[Any, Any] | None = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """``num_steps`` steps of ``update`` as one jitted (donated) dispatch.

    The result is ``run(state, block, base_rng, first_step, columns=None) -> (state,
    scalars)``: ``block`` holds the step inputs stacked along a leading axis of
    ``num_steps``; step ``first_step + i`` uses ``fold_in(base_rng, first_step + i)``, derived
    inside the program (no per-step host work); ``scalars`` have a leading ``num_steps`` axis.
    With ``gather``, an input is first turned into a batch by ``gather(columns, input)`` (e.g.
    row indices into device-resident columns). ``num_steps > 1`` runs a ``lax.scan``; 1 is a
    plain call. ``shardings = (replicated, block_sharding)`` compiles for a device mesh.
    """

    def one(state: Any, inputs: Any, base_rng: PRNGKey, step: jax.Array, columns: Any) -> Any:
        batch = inputs if gather is None else gather(columns, inputs)
        return update(state, batch, jax.random.fold_in(base_rng, step))

    def run(state: Any, block: Any, base_rng: PRNGKey, first_step: jax.Array, columns: Any):
        if num_steps == 1:
            inputs = jax.tree_util.tree_map(lambda x: x[0], block)
            state, scalars = one(state, inputs, base_rng, first_step, columns)
            return state, jax.tree_util.tree_map(lambda x: x[None], dict(scalars))

        def body(state: Any, xs: tuple[Any, jax.Array]) -> Any:
            return one(state, xs[0], base_rng, xs[1], columns)

        steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
        return jax.lax.scan(body, state, (block, steps))

    if shardings is None:
        jitted = jax.jit(run, donate_argnums=0)
    else:
        replicated, block_sharding = shardings
        jitted = jax.jit(
            run,
            in_shardings=(replicated, block_sharding, replicated, replicated, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )

    def call(state: Any, block: Any, base_rng: PRNGKey, first_step: int, columns: Any = None):
        return jitted(state, block, base_rng, np.int32(first_step), columns)

    return call


def gather_rows(columns: Mapping[str, jax.Array], indices: jax.Array) -> dict[str, jax.Array]:
    """The batch of rows ``indices`` of every column (inside jit: a device-side gather)."""
    return {k: jnp.take(v, indices, axis=0) for k, v in columns.items()}


# Primitives after which XLA:CPU may run a step much slower inside a lax.scan (measured with
# scripts/bench_dispatch.py: the Haiku CNN's step 13x slower scanned than stepped, also when
# unrolled; the stax CNN's about as fast), so the CPU default is one step per dispatch.
CONVOLUTION_PRIMITIVES = frozenset({"conv_general_dilated"})


def _sub_jaxprs(value: Any) -> Iterator[Any]:
    """The jaxprs nested in one equation parameter (pjit, scan, cond, custom_jvp ...)."""
    if isinstance(value, jax_core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax_core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _sub_jaxprs(item)


def jaxpr_primitives(jaxpr: Any) -> set[str]:
    """Names of every primitive in ``jaxpr`` (a Jaxpr or ClosedJaxpr), nested ones included."""
    names: set[str] = set()
    stack = [getattr(jaxpr, "jaxpr", jaxpr)]
    while stack:
        current = stack.pop()
        for eqn in current.eqns:
            names.add(eqn.primitive.name)
            for value in eqn.params.values():
                stack.extend(_sub_jaxprs(value))
    return names


def uses_convolution(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` computes a convolution (traced abstractly: nothing runs).

    ``args`` may be arrays or ``jax.ShapeDtypeStruct`` s.
    """
    return bool(jaxpr_primitives(jax.make_jaxpr(fn)(*args)) & CONVOLUTION_PRIMITIVES)


def stack_inputs(items: Sequence[Any]) -> Any:
    """Step inputs stacked along a new leading axis, on the host (NumPy)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *items)


class CentralizedTraining:
    """One optimizer step per shuffled batch pooled across all clients of the train data.

    Batches come from the data layer's shuffle-repeat stream (``batch_size`` examples, clients
    shuffled within ``client_buffer_size``, examples within ``example_buffer_size``).

    Fast path used by the loop: :meth:`prepare` stacks several step inputs and starts their
    transfer to the device (it runs on the prefetch thread); :meth:`run_steps` runs them as
    one dispatch (:func:`multi_step`). After :meth:`enable_device_data` the train columns live
    on the device and the stream yields row indices, gathered inside the step.
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
        self.device_columns: dict[str, jax.Array] | None = None
        self._runs: dict[int, Callable[..., Any]] = {}

    # ---- device-resident data ----

    def device_data_supported(self) -> bool:
        """Whether the train data can be gathered on the device (an in-memory column store
        without a client preprocessor)."""
        fd = self.train_data
        return bool(getattr(fd, "supports_column_batching", False)) and hasattr(fd, "columns")

    def enable_device_data(self, device: Any = None) -> None:
        """Puts the train columns on ``device`` (a device or sharding) once; from then on the
        data stream yields row indices and the steps gather their batches on the device.

        The batch preprocessor is applied once to all rows before the copy, which equals
        preprocessing each batch for per-example preprocessors (FedJAX's, e.g. EMNIST's
        ``x = 1 - pixels``); one that mixes examples within a batch must not be used here.

        Raises:
          ValueError: the train data is not an in-memory column store.
        """
        if not self.device_data_supported():
            raise ValueError(
                "trainer.device_data=true needs in-memory column data without a client "
                "preprocessor; set trainer.device_data=false"
            )
        fd = self.train_data
        columns = dict(fd.columns)
        preprocessor = getattr(fd, "batch_preprocessor", None)
        if preprocessor is not None:
            columns = dict(preprocessor(columns))
        self.device_columns = jax.device_put(columns, device)
        self._runs = {}

    @property
    def gather(self) -> Callable[[Any, Any], Any] | None:
        """``(columns, inputs) -> batch`` inside the step, or None for host batches."""
        return gather_rows if self.device_columns is not None else None

    def sample_batch(self, rows: int = 2) -> BatchExample | None:
        """A small preprocessed batch of the train data (the first ``rows`` examples), or
        None when the data offers no cheap row access (e.g. SQLite)."""
        fd = self.train_data
        if not (self.device_data_supported() and callable(getattr(fd, "gather", None))):
            return None
        count = min(rows, int(getattr(fd, "num_examples", rows)))
        return dict(fd.gather(np.arange(count)))

    def uses_convolution(self) -> bool | None:
        """Whether the train step computes a convolution (decides steps per dispatch on
        CPU); None when no sample batch is at hand to trace the step with."""
        batch = self.sample_batch()
        if batch is None:
            return None
        key = jax.random.PRNGKey(0)
        state = jax.eval_shape(self.init, key)
        abstract = {
            k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()
        }
        return uses_convolution(self.update, state, abstract, key)

    # ---- Algorithm protocol ----

    def init(self, rng: PRNGKey) -> TrainState:
        params = self.model.init(rng)
        return TrainState(params=params, opt_state=self.optimizer.init(params))

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        from fedjax_exp.core import federated_data

        fd = self.train_data
        if self.device_columns is not None:
            # int32 indices: a quarter of the bytes of int64 per transfer, and all a GPU needs.
            indices = fd.shuffle_repeat_batch_indices(
                self.batch_size,
                self.client_buffer_size,
                self.example_buffer_size,
                seed,
                start_batch=start,
            )
            return (idx.astype(np.int32) for idx in indices)
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
        self, state: TrainState, inputs: Any, rng: PRNGKey
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        if self.device_columns is not None:
            inputs = self.train_data.gather(np.asarray(inputs))
        return self._step(state, inputs, rng)

    def eval_params(self, state: TrainState) -> Params:
        return state.params

    # ---- several steps per dispatch ----

    def prepare(self, items: Sequence[Any]) -> Any:
        """Stacks step inputs and starts their (asynchronous) transfer to the device."""
        return jax.device_put(stack_inputs(items))

    def run_steps(
        self, state: TrainState, block: Any, base_rng: PRNGKey, first_step: int
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """Steps ``first_step, first_step + 1, ...`` over the prepared ``block``."""
        num_steps = int(jax.tree_util.tree_leaves(block)[0].shape[0])
        run = self._runs.get(num_steps)
        if run is None:
            run = self._runs[num_steps] = multi_step(self.update, num_steps, self.gather)
        return run(state, block, base_rng, first_step, self.device_columns)
