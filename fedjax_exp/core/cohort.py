"""The cohort engine: every sampled client of a federated round trained in one compiled program.

A round of a library algorithm (``fedjax_exp.algorithms``) loops over its clients through
``for_each_client``. Here the same client functions (captured from the library with
:func:`capture_client_functions`, so the arithmetic is the library's) run for the whole cohort
at once:

- Host side, per round (:class:`CohortPlanner`, NumPy only, a function of ``(seed, round)``
  alone so a resumed run replays exactly): the clients (``UniformGetClientSampler``'s draw),
  each client's batches as row indices into the train data (the order of
  ``ClientDataset.shuffle_repeat_batch``) and their layout in *lanes*: clients sorted by
  their number of local steps, longest first, ``lanes`` per block.
- Device side (:func:`train_cohort`, traced into the caller's program): the train data's
  columns live on the device once; each step gathers its batches by row index. Within a
  block, ``client_init``/``client_step``/``client_final`` are vmapped over the lanes and a
  ``lax.scan`` runs the steps; a lane past its client's last step keeps its state (masked),
  and steps past the block's longest client are skipped by ``lax.cond``. ``lax.map`` walks
  the blocks.
- :class:`StepwiseCohort` runs the same layout with one dispatch per local step (vmap over
  the block's lanes, no scan): convolutions inside compiled loops are slow on XLA:CPU (see
  ``parallel_for_each_client``), so convolutional models on CPU take this path.

Every lane's output is returned (``[num_lanes, ...]``); padding lanes (``real`` False in the
round inputs) carry garbage the caller must mask. Sharding: the lanes axis may be split over
a device mesh by passing ``constrain`` (a ``with_sharding_constraint`` of the lanes axis).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core import for_each_client
from fedjax_exp.core.client_datasets import ShuffleRepeatBatchHParams
from fedjax_exp.core.client_samplers import _MLCG_MODULUS, _MLCG_MULTIPLIER
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, PyTree

__all__ = [
    "ClientFunctions",
    "CohortPlanner",
    "StepwiseCohort",
    "capture_client_functions",
    "federated_columns",
    "padded_batch_rows",
    "round_shuffle_seed",
    "shuffle_repeat_rows",
    "train_cohort",
]


@dataclasses.dataclass(frozen=True)
class ClientFunctions:
    """A library algorithm's per-client functions; ``step`` returns ``(state, result)``."""

    init: Callable[[PyTree, PyTree], PyTree]
    step: Callable[[PyTree, Mapping[str, jax.Array]], tuple[PyTree, PyTree]]
    final: Callable[[PyTree, PyTree], PyTree]


class _CaptureBackend(for_each_client.ForEachClientBackend):
    """A for_each_client backend that records the functions it is given and runs nothing."""

    def __init__(self) -> None:
        self.captured: list[ClientFunctions] = []

    def __call__(self, client_init, client_step, client_final):
        self.captured.append(ClientFunctions(client_init, client_step, client_final))

        def run(shared_input, clients):
            raise RuntimeError("a captured for_each_client is not meant to be called")

        return run


def capture_client_functions(build: Callable[[], Any]) -> tuple[list[ClientFunctions], Any]:
    """Runs ``build()`` (e.g. ``lambda: fed_avg.federated_averaging(...)``) and returns the
    client functions it handed to ``for_each_client``, in order, and what it returned."""
    backend = _CaptureBackend()
    with for_each_client.for_each_client_backend(backend):
        built = build()
    return backend.captured, built


def federated_columns(fd: Any) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every example of ``fd`` preprocessed, one array per feature, and the CSR offsets of its
    clients in ``fd.client_ids()`` order.

    A column store without a client preprocessor is gathered in one call; its batch
    preprocessor must work row by row (every preprocessor of this library does), since it runs
    on the whole column rather than batch by batch.
    """
    from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData

    if isinstance(fd, InMemoryFederatedData) and fd.supports_column_batching:
        columns = dict(fd.gather(np.arange(fd.num_examples)))
        return {k: np.asarray(v) for k, v in columns.items()}, np.asarray(fd.offsets)
    parts = [dataset.all_examples() for _, dataset in fd.clients()]
    sizes = [len(next(iter(p.values()))) if p else 0 for p in parts]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    keys = list(parts[0]) if parts else []
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in keys}, offsets


def num_shuffle_repeat_steps(num_examples: int, hparams: ShuffleRepeatBatchHParams) -> int:
    """How many batches ``shuffle_repeat_batch(hparams)`` gives a client of that size."""
    steps = hparams.num_steps
    if hparams.num_epochs is not None:
        total = num_examples * hparams.num_epochs
        by_epochs = (
            total // hparams.batch_size
            if hparams.drop_remainder
            else -(-total // hparams.batch_size)
        )
        steps = by_epochs if steps is None else min(steps, by_epochs)
    if steps is None:
        raise ValueError(
            "client batches need num_epochs or num_steps: an endless client cannot train"
        )
    return int(steps)


def shuffle_repeat_rows(
    num_examples: int,
    hparams: ShuffleRepeatBatchHParams,
    random_state: np.random.RandomState | None = None,
) -> np.ndarray:
    """``[steps, batch_size]`` example indices of ``shuffle_repeat_batch(hparams)``, batch by
    batch: the same NumPy calls in the same order, hence the same batches.

    ``random_state``: reseeded with ``hparams.seed`` and used instead of a new RandomState
    (creating one costs ~0.4 ms, reseeding ~2 us).
    """
    steps = num_shuffle_repeat_steps(num_examples, hparams)
    return _shuffled_rows(
        num_examples, steps, hparams.batch_size, hparams.seed, hparams.skip_shuffle, random_state
    )


def _shuffled_rows(num_examples, steps, batch_size, seed, skip_shuffle, random_state):
    if random_state is None or seed is None:
        random_state = np.random.RandomState(seed)
    else:
        random_state.seed(seed)
    order = np.arange(num_examples, dtype=np.int32)
    epochs = []
    for _ in range(-(-steps * batch_size // num_examples) if steps else 0):
        if not skip_shuffle:
            random_state.shuffle(order)
        epochs.append(order.copy())
    flat = np.concatenate(epochs) if epochs else np.zeros(0, np.int32)
    return flat[: steps * batch_size].reshape(steps, batch_size)


def padded_batch_rows(num_examples: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``padded_batch(batch_size)``'s batches as ``[steps, batch_size]`` example indices and
    the example mask (padding rows point at example 0 and are masked out)."""
    steps = -(-num_examples // batch_size)
    flat = np.arange(steps * batch_size, dtype=np.int32)
    mask = flat < num_examples
    return np.where(mask, flat, 0).reshape(steps, batch_size), mask.reshape(steps, batch_size)


def round_shuffle_seed(seed: int, round_num: int) -> int:
    """The ``ShuffleRepeatBatchHParams.seed`` of round ``round_num``'s clients: a fresh
    order every round (FedJAX's unseeded default), yet reproducible from ``(seed, round)``."""
    return int(np.random.SeedSequence([seed, round_num]).generate_state(1)[0] >> 1)


class CohortPlanner:
    """Host-side layout of each round: clients, their batches as rows, lanes and blocks.

    Args:
        offsets: CSR offsets of the train clients (``federated_columns``), in client-id order.
        clients_per_round: clients drawn per round, as ``UniformGetClientSampler``.
        batch_hparams: client training batches (``seed`` is replaced per round by
            :func:`round_shuffle_seed`).
        lanes: clients per block (vmapped together); the cohort is padded to a multiple.
        grads_batch_size: also plan a full pass of padded batches of this size per client
            (Mime's server gradient).
    """

    def __init__(
        self,
        offsets: np.ndarray,
        clients_per_round: int,
        batch_hparams: ShuffleRepeatBatchHParams,
        lanes: int,
        grads_batch_size: int | None = None,
    ):
        self.offsets = np.asarray(offsets, np.int64)
        self.sizes = np.diff(self.offsets)
        self.num_clients = len(self.sizes)
        if not 0 < clients_per_round <= self.num_clients:
            raise ValueError(
                f"clients_per_round={clients_per_round} but the train data has "
                f"{self.num_clients} clients: sample between 1 and {self.num_clients}"
            )
        self.clients_per_round = clients_per_round
        self.batch_hparams = batch_hparams
        self.lanes = max(1, min(lanes, clients_per_round))
        self.num_blocks = -(-clients_per_round // self.lanes)
        self.steps = np.array([num_shuffle_repeat_steps(int(n), batch_hparams) for n in self.sizes])
        # Fixed for the run: every round has the same shapes, so one program serves them all.
        self.max_steps = int(self.steps.max())
        self.grads_batch_size = grads_batch_size
        self._random_state = np.random.RandomState(0)
        self._starts: dict[int, int] = {}
        if grads_batch_size is not None:
            self.grads_steps = -(-self.sizes // grads_batch_size)
            self.max_grads_steps = int(self.grads_steps.max())

    @property
    def num_lanes(self) -> int:
        return self.num_blocks * self.lanes

    def sample(self, seed: int, round_num: int) -> np.ndarray:
        """Positions (in client-id order) of round ``round_num``'s clients, in the order
        ``UniformGetClientSampler(fd, clients_per_round, seed)`` draws them (its generator
        state, ``client_samplers.get_pseudo_random_state``, set on a reused RandomState)."""
        if seed not in self._starts:
            self._starts[seed] = np.random.RandomState(seed).randint(1, _MLCG_MODULUS - 1)
        state = pow(_MLCG_MULTIPLIER, round_num, _MLCG_MODULUS) * self._starts[seed]
        self._random_state.seed(state % _MLCG_MODULUS)
        return self._random_state.choice(
            self.num_clients, size=self.clients_per_round, replace=False
        )

    def plan(self, seed: int, round_num: int) -> dict[str, Any]:
        """Round ``round_num``'s inputs of :func:`train_cohort` and of the round's server step.

        ``clients``/``slot``/``real``/``weights`` are per lane: the client's position in the
        data (``num_clients`` for padding), its position in the round's draw (whose rng it
        gets), whether it is real, and its number of examples (0 for padding).
        """
        sampled = self.sample(seed, round_num)
        order = sorted(range(len(sampled)), key=lambda i: -int(self.steps[sampled[i]]))
        lanes, blocks = self.lanes, self.num_blocks
        slot = np.zeros(self.num_lanes, np.int32)
        slot[: len(order)] = order
        real = np.arange(self.num_lanes) < len(order)
        clients = np.where(real, sampled[slot], self.num_clients).astype(np.int32)
        weights = np.where(real, self.sizes[np.minimum(clients, self.num_clients - 1)], 0)
        shuffle_seed, hparams = round_shuffle_seed(seed, round_num), self.batch_hparams

        def train_rows(client: int) -> tuple[np.ndarray, None]:
            size, steps = int(self.sizes[client]), int(self.steps[client])
            seed_, skip = shuffle_seed, hparams.skip_shuffle
            rows = _shuffled_rows(size, steps, hparams.batch_size, seed_, skip, self._random_state)
            return rows, None

        train = self._layout(clients, real, self.max_steps, train_rows)
        plan = {
            "round": np.int32(round_num),
            "clients": clients.reshape(blocks, lanes),
            "slot": slot.reshape(blocks, lanes),
            "real": real.reshape(blocks, lanes),
            "weights": weights.astype(np.float32).reshape(blocks, lanes),
            "train": train,
        }
        if self.grads_batch_size is not None:
            plan["grads"] = self._layout(
                clients,
                real,
                self.max_grads_steps,
                lambda c: padded_batch_rows(int(self.sizes[c]), self.grads_batch_size),
            )
        return plan

    def _layout(self, clients, real, max_steps, rows_of) -> dict[str, np.ndarray]:
        lanes, blocks = self.lanes, self.num_blocks
        batch_size = None
        rows = counts = mask = None
        for lane, client in enumerate(clients):
            if not real[lane]:
                continue
            local, local_mask = rows_of(int(client))
            if rows is None:
                batch_size = local.shape[1]
                rows = np.zeros((blocks, max_steps, lanes, batch_size), np.int32)
                counts = np.zeros((blocks, lanes), np.int32)
                if local_mask is not None:
                    mask = np.zeros((blocks, max_steps, lanes, batch_size), bool)
            block, position = divmod(lane, lanes)
            n = len(local)
            rows[block, :n, position] = local + self.offsets[client]
            counts[block, position] = n
            if mask is not None:
                mask[block, :n, position] = local_mask
        layout = {"rows": rows, "counts": counts, "block_steps": counts.max(axis=1)}
        if mask is not None:
            layout["mask"] = mask
        return layout


def _select(active: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Per lane: ``new`` where ``active`` else ``old`` (``active`` has the lanes axis only)."""

    def pick(n: jax.Array, o: jax.Array) -> jax.Array:
        return jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)

    return jax.tree_util.tree_map(pick, new, old)


def _gather_batch(columns: Mapping[str, jax.Array], rows: jax.Array, mask: Any) -> dict:
    batch = {k: v[rows] for k, v in columns.items()}
    if mask is not None:
        batch[EXAMPLE_MASK_KEY] = mask
    return batch


def _no_constraint(tree: PyTree) -> PyTree:
    return tree


def train_cohort(
    fns: ClientFunctions,
    shared: PyTree,
    lane_inputs: PyTree,
    columns: Mapping[str, jax.Array],
    layout: Mapping[str, jax.Array],
    *,
    loss_fn: Callable[[PyTree, Mapping[str, jax.Array]], jax.Array] | None = None,
    constrain: Callable[[PyTree], PyTree] = _no_constraint,
) -> tuple[PyTree, jax.Array]:
    """Every lane's client trained (traceable; see the module docstring).

    Args:
        fns: the client functions.
        shared: the input all clients share (e.g. the server params).
        lane_inputs: per-lane client inputs, leaves ``[blocks, lanes, ...]``.
        columns: the train data on the device, ``[num_examples, ...]`` per feature.
        layout: a pass of :meth:`CohortPlanner.plan` (``rows``, ``counts``, ``block_steps``,
            optionally ``mask``).
        loss_fn: ``(client_state, batch) -> loss``, evaluated before each real step.
        constrain: applied to every lanes-leading tree (sharding constraint).

    Returns:
        ``(outputs, loss_sums)``: ``client_final``'s outputs, leaves ``[blocks * lanes,
        ...]``, and per lane the sum of ``loss_fn`` over its steps (zeros without it).
    """

    def run_block(block):
        states = constrain(jax.vmap(fns.init, in_axes=(None, 0))(shared, block["inputs"]))
        counts, block_steps = block["counts"], block["block_steps"]

        def step(carry, xs):
            states, losses = carry
            batch = constrain(_gather_batch(columns, xs["rows"], xs.get("mask")))
            active = xs["t"] < counts
            if loss_fn is not None:
                losses = losses + jnp.where(active, jax.vmap(loss_fn)(states, batch), 0.0)
            new_states, _ = jax.vmap(fns.step)(states, batch)
            return constrain(_select(active, new_states, states)), losses

        def body(carry, xs):
            # Past the block's longest client every lane is done: skip the work.
            return jax.lax.cond(xs["t"] < block_steps, step, lambda c, _: c, carry, xs), None

        steps = {k: block[k] for k in ("rows", "mask") if k in block}
        steps["t"] = jnp.arange(block["rows"].shape[0])
        loss0 = jnp.zeros(counts.shape, jnp.float32)
        (states, losses), _ = jax.lax.scan(body, (states, loss0), steps)
        return jax.vmap(fns.final, in_axes=(None, 0))(shared, states), losses

    blocks = {k: layout[k] for k in ("rows", "counts", "block_steps", "mask") if k in layout}
    outputs, losses = jax.lax.map(run_block, {**blocks, "inputs": lane_inputs})
    flat = lambda x: x.reshape((-1,) + x.shape[2:])  # noqa: E731
    return jax.tree_util.tree_map(flat, outputs), flat(losses)


@functools.lru_cache(maxsize=32)
def _stepwise_programs(fns: ClientFunctions, loss_fn: Any):
    """Jitted init / masked step / final of one block, cached by their functions."""

    @jax.jit
    def init(shared, inputs):
        return jax.tree_util.tree_map(
            jnp.copy, jax.vmap(fns.init, in_axes=(None, 0))(shared, inputs)
        )

    @functools.partial(jax.jit, donate_argnums=0)
    def step(carry, columns, rows, counts, mask, t):
        states, losses = carry
        batch = _gather_batch(columns, rows[t], None if mask is None else mask[t])
        if counts.shape[0] == 1:
            # One lane runs exactly its client's steps: no mask, and no vmap, whose batched
            # (grouped) convolutions ran slower than plain ones on XLA:CPU.
            one = jax.tree_util.tree_map(lambda x: x[0], (states, batch))
            new_state, _ = fns.step(*one)
            if loss_fn is not None:
                losses = losses + loss_fn(*one)
            return jax.tree_util.tree_map(lambda x: x[None], new_state), losses
        active = t < counts
        if loss_fn is not None:
            losses = losses + jnp.where(active, jax.vmap(loss_fn)(states, batch), 0.0)
        new_states, _ = jax.vmap(fns.step)(states, batch)
        return _select(active, new_states, states), losses

    @jax.jit
    def final(shared, states):
        return jax.vmap(fns.final, in_axes=(None, 0))(shared, states)

    return init, step, final


class StepwiseCohort:
    """:func:`train_cohort` with one dispatch per block and local step (no compiled loop).

    Called eagerly (outside jit) with the same arguments; the layout must hold host (NumPy)
    ``counts``/``block_steps`` so the number of dispatches is known without a device sync.
    """

    def __call__(
        self,
        fns: ClientFunctions,
        shared: PyTree,
        lane_inputs: PyTree,
        columns: Mapping[str, jax.Array],
        layout: Mapping[str, Any],
        *,
        loss_fn: Callable[..., jax.Array] | None = None,
        constrain: Callable[[PyTree], PyTree] = _no_constraint,
    ) -> tuple[PyTree, jax.Array]:
        del constrain  # The inputs' own shardings carry over from dispatch to dispatch.
        init, step, final = _stepwise_programs(fns, loss_fn)
        block_steps = np.asarray(layout["block_steps"])  # Host values: no device sync.
        outputs, losses = [], []
        for b in range(len(block_steps)):
            inputs = jax.tree_util.tree_map(lambda x, b=b: x[b], lane_inputs)
            # To the device once per block, not at every step's call.
            rows, counts = jax.device_put((layout["rows"][b], layout["counts"][b]))
            mask = jax.device_put(layout["mask"][b]) if "mask" in layout else None
            carry = (init(shared, inputs), jnp.zeros(counts.shape, jnp.float32))
            for t in range(int(block_steps[b])):
                carry = step(carry, columns, rows, counts, mask, np.int32(t))
            outputs.append(final(shared, carry[0]))
            losses.append(carry[1])
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *outputs)
        return stacked, jnp.concatenate(losses)
