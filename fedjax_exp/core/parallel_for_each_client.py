"""for_each_client backends that train all clients of a call in one compiled program.

The sequential backend dispatches one jitted step per batch per client, which leaves small
models launch-bound (a FedAvg round on the logistic EMNIST model is ~140 tiny steps). Here the
whole call is one XLA program:

- Clients are sorted by their number of batches (longest first) and grouped into blocks of
  ``block_size`` lanes; the client count is padded to a multiple of ``block_size`` with
  padding lanes that take no step, so one program serves every call with the same number of
  blocks.
- All batches of the call go to the device once, as one array per feature (row count rounded
  up to a few sizes); the program gathers each step's batches by index, so nothing is padded
  on the host but those rows.
- Every client is padded to a common number of steps ``T`` (rounded up to a power of two, so
  a new longest client rarely means a new compilation). A padded step is masked: the
  client's state and step result stay as they were, bit for bit.
- ``lax.map`` walks the blocks; in each block ``client_init``/``client_step``/``client_final``
  are vmapped over the lanes and ``lax.scan`` runs the steps. Steps past the block's longest
  client are skipped by ``lax.cond``, so sorting makes blocks of small clients cheap.
- The sharded backend splits the lanes of every block over a 1-D mesh of the local devices
  (``jax.sharding``); shared input is replicated. It replaces FedJAX's pmap backend.

When to use it (measured on a 2-core CPU, FedAvg, 10 EMNIST-sized clients of 2-28 steps,
``scripts/bench_for_each_client.py``): small models gain (logistic ~1.5-2.7x the sequential
backend's rounds/s, dense MLP ~1.4x), but convolutions inside XLA:CPU's compiled loops run
far slower than dispatched step by step, even unbatched (Haiku CNN: 51 s a round with 2
lanes, 37 s with 1, against 4.0 s), so keep the sequential ``'jit'`` backend for
convolutional models on CPU. Accelerators are launch-bound
on tiny steps, where one program per round is the point; measure there.

Batches of a client must share one shape, except that a smaller batch (e.g. the last one of
an epoch without ``drop_remainder``) is padded with examples masked out by ``__mask__``: the
step must honour that mask, as every loss, gradient and metric of this library does.
Clients come back in the order given; outputs are JAX arrays, one per client per leaf.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fedjax_exp.core.for_each_client import (
    ClientFinal,
    ClientInit,
    ClientStep,
    ForEachClient,
    ForEachClientBackend,
    cached_by_functions,
    empty_client_error,
)
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, PyTree

__all__ = [
    "ForEachClientParallelBackend",
    "ForEachClientShardedBackend",
    "default_lanes",
    "padded_size",
]

_CLIENTS_AXIS = "clients"


def padded_size(size: int, granularity: int) -> int:
    """``size`` rounded up to one of ``granularity`` values per doubling (beyond 2g).

    Up to ``2 * granularity`` is kept exact; above, sizes are rounded up to a multiple of a
    power of two, so less than 1/granularity of the result is padding and the number of
    distinct programs grows only logarithmically with the size. Granularity 1 gives powers
    of two.
    """
    unit = 1
    while size > 2 * granularity * unit:
        unit *= 2
    return -(-size // unit) * unit


def default_lanes(platform: str) -> int:
    """Clients vmapped together by default on ``platform`` (per device when sharded).

    Measured on a 2-core CPU (FedAvg rounds of 10 EMNIST-sized clients of 2-28 steps):
    2 lanes were fastest for the logistic and dense models (1.5x the sequential backend);
    8 lanes were slower than sequential for the dense model, as lanes wait for the block's
    longest client and XLA:CPU gains little from batching small matmuls. Accelerators run
    wide batches at nearly the cost of one, hence 8 there.
    """
    return 2 if platform == "cpu" else 8


def _is_key_array(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _stack(leaves: Sequence[Any]) -> Any:
    """Stacks one leaf of several pytrees along a new leading axis (on the host if possible)."""
    if any(_is_key_array(leaf) for leaf in leaves):
        return jax.random.wrap_key_data(
            jnp.stack([jax.random.key_data(leaf) for leaf in leaves]),
            impl=jax.random.key_impl(leaves[0]),
        )
    if any(isinstance(leaf, jax.Array) for leaf in leaves):
        return jnp.stack(leaves)  # One op on the device instead of a transfer per client.
    return np.stack(leaves)


def _select(mask: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """Per lane: ``new`` where ``mask`` else ``old`` (mask has the lanes axis only)."""

    def select(n, o):
        if jnp.issubdtype(n.dtype, jax.dtypes.prng_key):
            picked = _select(mask, jax.random.key_data(n), jax.random.key_data(o))
            return jax.random.wrap_key_data(picked, impl=jax.random.key_impl(n))
        return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)

    return jax.tree_util.tree_map(select, new, old)


class _BatchLayout:
    """The common feature shapes of a call's batches, and whether masks must be added."""

    def __init__(self, clients: Sequence[tuple[Any, list, Any]]):
        first_id, first_batches, _ = clients[0]
        template = first_batches[0]
        if not isinstance(template, Mapping):
            raise TypeError(
                "The parallel for_each_client backends need batches that are dicts of arrays "
                f"(feature -> array), got {type(template).__name__} for client {first_id!r}."
            )
        self.features = sorted(k for k in template if k != EXAMPLE_MASK_KEY)
        self.trailing: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, np.dtype] = {}
        sizes = set()
        has_mask = False
        for client_id, batches, _ in clients:
            for batch in batches:
                keys = sorted(k for k in batch if k != EXAMPLE_MASK_KEY)
                if keys != self.features:
                    raise ValueError(
                        f"for_each_client: client {client_id!r} has a batch with features "
                        f"{keys}, others have {self.features}; every batch of a call needs "
                        "the same features."
                    )
                has_mask |= EXAMPLE_MASK_KEY in batch
                for key in keys:
                    shape = np.shape(batch[key])
                    sizes.add(shape[0] if shape else None)
                    if self.trailing.setdefault(key, shape[1:]) != shape[1:]:
                        raise ValueError(
                            f"for_each_client: feature {key!r} of client {client_id!r} has "
                            f"shape {shape}, other batches have (n, *{self.trailing[key]}); "
                            "batches may differ only in their number of examples."
                        )
                    if key not in self.dtypes:
                        self.dtypes[key] = np.asarray(batch[key]).dtype
        if None in sizes:
            raise ValueError("for_each_client: batch features must have an examples axis.")
        self.batch_size = max(sizes)
        # A smaller batch is padded to batch_size; its padding rows are masked out.
        self.with_mask = has_mask or len(sizes) > 1

    def stack(self, batches: Sequence[Mapping[str, Any]], num_rows: int) -> dict[str, np.ndarray]:
        """All batches of the call as ``[num_rows, batch_size, ...]`` arrays, one per feature.

        Rows past the batches are zeros (no step reads them; they only fix the shape). A batch
        smaller than ``batch_size`` is padded with zeros and its padding examples masked out.
        """
        lead = (num_rows, self.batch_size)
        data = {k: np.empty(lead + self.trailing[k], self.dtypes[k]) for k in self.features}
        if self.with_mask:
            data[EXAMPLE_MASK_KEY] = np.empty(lead, bool)
        num = len(batches)
        for array in data.values():
            array[num:] = 0
        sizes = {len(batch[self.features[0]]) for batch in batches}
        if sizes == {self.batch_size}:
            # The common case: one copy per feature for the whole call.
            for key in self.features:
                np.stack([b[key] for b in batches], out=data[key][:num])
            if self.with_mask:
                shape = (self.batch_size,)
                np.stack(
                    [np.broadcast_to(b.get(EXAMPLE_MASK_KEY, True), shape) for b in batches],
                    out=data[EXAMPLE_MASK_KEY][:num],
                )
            return data
        for row, batch in enumerate(batches):
            size = len(batch[self.features[0]])
            for key in self.features:
                data[key][row, :size] = batch[key]
                data[key][row, size:] = 0
            data[EXAMPLE_MASK_KEY][row, :size] = batch.get(EXAMPLE_MASK_KEY, True)
            data[EXAMPLE_MASK_KEY][row, size:] = False
        return data


@cached_by_functions
def _block_program(
    client_init: ClientInit,
    client_step: ClientStep,
    client_final: ClientFinal,
    lanes_sharding: NamedSharding | None,
):
    """The jitted program running every block of a call; see the module docstring.

    Cached by its functions and sharding, so building for_each_client again from the same
    functions (e.g. an evaluation helper called every round) reuses the compiled program.
    """

    def constrain(tree: PyTree) -> PyTree:
        # Keep the lanes axis split over the mesh through init, scan and final.
        if lanes_sharding is None:
            return tree
        return jax.tree_util.tree_map(
            lambda x: jax.lax.with_sharding_constraint(x, lanes_sharding), tree
        )

    def run_block(shared_input, client_inputs, data, block):
        lane_clients, step_rows, step_mask, num_steps = block
        # Gathered on the device: padding lanes repeat client 0's input (never stepped).
        lane_inputs = jax.tree_util.tree_map(lambda x: x[lane_clients], client_inputs)
        states = constrain(jax.vmap(client_init, in_axes=(None, 0))(shared_input, lane_inputs))
        vmapped_step = jax.vmap(client_step)

        def masked_step(states, rows, mask):
            batch = constrain(jax.tree_util.tree_map(lambda x: x[rows], data))
            new_states, results = vmapped_step(states, batch)
            zeros = jax.tree_util.tree_map(jnp.zeros_like, results)
            return constrain(_select(mask, new_states, states)), _select(mask, results, zeros)

        result_shapes = jax.eval_shape(masked_step, states, step_rows[0], step_mask[0])[1]

        def skipped_step(states, rows, mask):
            del rows, mask
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), result_shapes)
            return states, zeros

        def body(states, xs):
            t, rows, mask = xs
            # Past the block's longest client every lane is padding: skip the work entirely.
            return jax.lax.cond(t < num_steps, masked_step, skipped_step, states, rows, mask)

        steps = jnp.arange(step_mask.shape[0])
        states, results = jax.lax.scan(body, states, (steps, step_rows, step_mask))
        outputs = jax.vmap(client_final, in_axes=(None, 0))(shared_input, states)
        return outputs, results

    @functools.partial(jax.jit, static_argnames=("num_clients",))
    def program(
        shared_input,
        client_inputs,
        data,
        lane_clients,
        step_rows,
        step_mask,
        block_steps,
        order,
        *,
        num_clients,
    ):
        outputs, results = jax.lax.map(
            functools.partial(run_block, shared_input, client_inputs, data),
            (lane_clients, step_rows, step_mask, block_steps),
        )
        num_lanes = step_mask.shape[0] * step_mask.shape[2]
        # [blocks, lanes, ...] -> [clients in the order given, ...].
        outputs = jax.tree_util.tree_map(
            lambda x: x.reshape((num_lanes,) + x.shape[2:])[order], outputs
        )
        # [blocks, steps, lanes, ...] -> [clients in the order given, steps, ...].
        results = jax.tree_util.tree_map(
            lambda x: jnp.swapaxes(x, 1, 2).reshape((num_lanes,) + x.shape[1:2] + x.shape[3:])[
                order
            ],
            results,
        )
        # One output buffer per client and leaf: the caller gets them without further ops.
        per_client = [
            jax.tree_util.tree_map(lambda x, i=i: x[i], (outputs, results))
            for i in range(num_clients)
        ]
        return per_client

    return program


class ForEachClientParallelBackend(ForEachClientBackend):
    """Trains the clients of a call together in one program on the default device.

    Args:
        block_size: lanes per block (clients vmapped together). Larger blocks use more
            parallel hardware but pad more (every lane runs as long as the block's longest
            client); a call with n clients compiles one program per ``ceil(n / block_size)``
            and padded step count. Default: ``default_lanes(platform)``.
        step_granularity: how finely the common number of steps is rounded up (see
            ``padded_size``). Padded steps past a block's longest client are skipped at run
            time, so coarse rounding (default: powers of two) costs little and compiles few
            programs.
        data_granularity: the same for the number of batches of the call, which are sent to
            the device together: padding here is data transferred for nothing, hence finer
            (default 2: ..., 64, 96, 128, 192, ...).
    """

    def __init__(
        self,
        block_size: int | None = None,
        step_granularity: int = 1,
        data_granularity: int = 2,
    ):
        if block_size is None:
            block_size = default_lanes(jax.default_backend())
        if min(block_size, step_granularity, data_granularity) < 1:
            raise ValueError(
                "block_size, step_granularity and data_granularity must be positive, got "
                f"{block_size}, {step_granularity} and {data_granularity}."
            )
        self.block_size = block_size
        self.step_granularity = step_granularity
        self.data_granularity = data_granularity

    def _mesh(self) -> Mesh | None:
        return None

    def __call__(
        self, client_init: ClientInit, client_step: ClientStep, client_final: ClientFinal
    ) -> ForEachClient:
        mesh = self._mesh()
        lanes_sharding = None if mesh is None else NamedSharding(mesh, P(_CLIENTS_AXIS))
        program = _block_program(client_init, client_step, client_final, lanes_sharding)
        block_size = self.block_size
        granularity = (self.step_granularity, self.data_granularity)

        def run(shared_input, clients: Iterable):
            clients = [(cid, list(batches), client_input) for cid, batches, client_input in clients]
            if not clients:
                return
            for client_id, batches, _ in clients:
                if not batches:
                    raise empty_client_error(client_id)
            inputs = _prepare(clients, block_size, granularity)
            if mesh is not None:
                inputs = _place(mesh, shared_input, inputs)
            else:
                inputs = (shared_input, *inputs)
            per_client = program(*inputs, num_clients=len(clients))
            if mesh is not None:
                # Off the mesh, like FedJAX's pmap backend: outputs then mix freely with
                # arrays committed to the first device (e.g. the server state).
                per_client = jax.device_put(per_client, mesh.devices.flat[0])
            for (client_id, batches, _), (output, results) in zip(clients, per_client, strict=True):
                yield client_id, output, _split_steps(results, len(batches))

        return run


def _prepare(clients, block_size: int, granularity: tuple[int, int]):
    """Host-side layout of a call: stacked inputs and batches, and the index arrays that
    place clients in lanes and batches in steps (the program gathers on the device)."""
    num_clients = len(clients)
    num_blocks = -(-num_clients // block_size)
    # Longest clients first, so each block's clients have similar lengths.
    by_length = sorted(range(num_clients), key=lambda i: -len(clients[i][1]))
    step_granularity, data_granularity = granularity
    num_steps = padded_size(len(clients[by_length[0]][1]), step_granularity)
    layout = _BatchLayout(clients)
    lane_clients = np.zeros((num_blocks, block_size), np.int32)
    step_rows = np.zeros((num_blocks, num_steps, block_size), np.int32)
    step_mask = np.zeros((num_blocks, num_steps, block_size), bool)
    block_steps = np.zeros(num_blocks, np.int32)
    order = np.empty(num_clients, np.int32)
    first_row = np.cumsum([0] + [len(batches) for _, batches, _ in clients])
    for position, index in enumerate(by_length):
        block, lane = divmod(position, block_size)
        count = len(clients[index][1])
        lane_clients[block, lane] = index
        step_rows[block, :count, lane] = np.arange(first_row[index], first_row[index] + count)
        step_mask[block, :count, lane] = True
        block_steps[block] = max(block_steps[block], count)
        order[index] = position
    all_batches = [batch for _, batches, _ in clients for batch in batches]
    data = layout.stack(all_batches, padded_size(len(all_batches), data_granularity))
    input_tree = jax.tree_util.tree_structure(clients[0][2])
    columns = []
    for client_id, _, client_input in clients:
        leaves, tree = jax.tree_util.tree_flatten(client_input)
        if tree != input_tree:
            raise ValueError(
                f"for_each_client: client {client_id!r} has client input {tree}, others "
                f"{input_tree}; every client input of a call needs the same structure."
            )
        columns.append(leaves)
    client_inputs = jax.tree_util.tree_unflatten(
        input_tree, [_stack(column) for column in zip(*columns, strict=True)]
    )
    return client_inputs, data, lane_clients, step_rows, step_mask, block_steps, order


def _place(mesh: Mesh, shared_input, inputs):
    """Puts a call's arrays on the mesh in one transfer: lanes split, the rest replicated."""
    replicated = NamedSharding(mesh, P())
    lanes = NamedSharding(mesh, P(None, _CLIENTS_AXIS))
    steps_lanes = NamedSharding(mesh, P(None, None, _CLIENTS_AXIS))
    client_inputs, data, *_ = inputs
    shardings = (
        jax.tree_util.tree_map(lambda _: replicated, shared_input),
        jax.tree_util.tree_map(lambda _: replicated, client_inputs),
        jax.tree_util.tree_map(lambda _: replicated, data),
        lanes,  # lane_clients
        steps_lanes,  # step_rows
        steps_lanes,  # step_mask
        replicated,  # block_steps
        replicated,  # order
    )
    return jax.device_put((shared_input, *inputs), shardings)


def _split_steps(results: PyTree, num_steps: int) -> list[PyTree]:
    """A client's ``[steps, ...]`` results as a list of its first ``num_steps`` step results."""
    leaves, tree = jax.tree_util.tree_flatten(results)
    if not leaves:
        return [results] * num_steps
    columns = [list(leaf[:num_steps]) for leaf in leaves]
    return [jax.tree_util.tree_unflatten(tree, step) for step in zip(*columns, strict=True)]


class ForEachClientShardedBackend(ForEachClientParallelBackend):
    """The parallel backend with each block's lanes split over a 1-D mesh of devices.

    Args:
        devices: the devices of the mesh; all local devices by default.
        block_size: lanes per block, rounded up to a multiple of the device count; by
            default ``default_lanes`` lanes per device.
        step_granularity, data_granularity: see ``ForEachClientParallelBackend``.
    """

    def __init__(
        self,
        devices: Sequence[jax.Device] | None = None,
        block_size: int | None = None,
        step_granularity: int = 1,
        data_granularity: int = 2,
    ):
        self.devices = list(devices) if devices is not None else jax.local_devices()
        num_devices = len(self.devices)
        block_size = block_size or num_devices * default_lanes(self.devices[0].platform)
        block_size = -(-block_size // num_devices) * num_devices
        super().__init__(block_size, step_granularity, data_granularity)

    def _mesh(self) -> Mesh:
        return Mesh(np.array(self.devices), (_CLIENTS_AXIS,))
