"""InMemoryFederatedData: a federated dataset held as a column store in NumPy arrays.

Layout (CSR style): one array per feature holding the examples of ALL clients back to back,
clients in sorted id order, and ``offsets`` (int64, ``num_clients + 1``) so that client ``i``
owns rows ``offsets[i]:offsets[i + 1]`` of every column. Consequences:

- a client's ClientDataset, and ``slice``, are zero-copy views;
- padded batches over the whole dataset are consecutive row ranges (no concatenation);
- shuffled batches are fancy indexing with an index array computed per epoch
  (:func:`shuffle_repeat_batch_indices`), so there is no Python loop over examples or clients
  per batch, and a trainer can gather batches itself, e.g. from device-resident columns.

The arrays are exposed read-only (:attr:`InMemoryFederatedData.columns`); a preprocessor that
tries to modify them in place fails instead of silently corrupting the dataset.

Clients with zero examples are allowed (FedJAX allows them, and partitioning can produce them):
they are listed by ``client_ids``/``client_sizes`` and contribute nothing to batches.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_exp.core import client_datasets
from fedjax_exp.core.client_datasets import (
    BatchPreprocessor,
    ClientDataset,
    Examples,
    NoOpBatchPreprocessor,
)
from fedjax_exp.core.federated_data import (
    ClientPreprocessor,
    FederatedData,
    NoOpClientPreprocessor,
)
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, ClientId

# Target bytes gathered per gather call by shuffle_repeat_batches (see there). Under 4 MiB:
# NumPy asks the kernel for transparent huge pages for arrays of 4 MiB and more, and each such
# fresh chunk can then wait for memory compaction (docs/performance-notes.md, "Shuffled
# batches").
_CHUNK_BYTES = 3 << 20
# Columns gathered at least this many bytes per chunk are split between two threads (np.take
# releases the GIL while it copies), when the process may run on more than one core.
_PARALLEL_GATHER_MIN_BYTES = 2 << 20

__all__ = [
    "InMemoryFederatedData",
    "shuffle_repeat_batch_indices",
    "shuffled_epoch_order",
]


# --------------------------------------------------------------------------------------------
# The shuffled index stream (pure functions of offsets and seed)
# --------------------------------------------------------------------------------------------


def _check_stream_args(client_buffer_size: Any, example_buffer_size: Any, seed: Any) -> None:
    client_datasets._check_int("client_buffer_size", client_buffer_size)
    client_datasets._check_int("example_buffer_size", example_buffer_size)
    client_datasets._check_int("seed", seed, minimum=0)


def shuffled_epoch_order(
    offsets: np.ndarray,
    epoch: int,
    client_buffer_size: int,
    example_buffer_size: int,
    seed: int,
) -> np.ndarray:
    """The example order of one epoch of the shuffled stream: a permutation of all rows.

    Algorithm (a windowed shuffle, the epoch-based counterpart of FedJAX's two buffers):

    1. Permute the non-empty clients uniformly at random.
    2. Cut that client sequence into consecutive windows; a window closes once it holds at
       least ``client_buffer_size`` clients AND at least ``example_buffer_size`` examples (a
       short last window joins the one before it).
    3. Lay the windows' examples out in order, each window's examples uniformly permuted.

    So consecutive batches mix examples of at least ``client_buffer_size`` clients, drawn from
    a pool of at least ``example_buffer_size`` examples, and each epoch covers every example
    exactly once. The randomness of epoch ``e`` depends only on ``(seed, e)``, which is what
    makes the stream resumable at any batch without replaying earlier epochs.

    Args:
      offsets: int64 CSR offsets, ``offsets[i]:offsets[i+1]`` are client ``i``'s rows.
      epoch: epoch number (>= 0).
      client_buffer_size: minimum clients per shuffle window.
      example_buffer_size: minimum examples per shuffle window.
      seed: non-negative integer seed.

    Returns:
      int64 array of length ``offsets[-1]``: row indices in stream order.
    """
    _check_stream_args(client_buffer_size, example_buffer_size, seed)
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    rng = np.random.default_rng([int(seed), int(epoch)])
    clients = rng.permutation(np.flatnonzero(sizes))
    client_sizes = sizes[clients]
    # Row indices of the permuted clients laid end to end: each row's index is its client's
    # start offset plus its position within the client, computed without a per-client loop.
    total = int(client_sizes.sum())
    ends = np.cumsum(client_sizes)
    starts_in_stream = ends - client_sizes
    order = np.arange(total, dtype=np.int64) + np.repeat(
        offsets[clients] - starts_in_stream, client_sizes
    )
    # Window boundaries (in clients): greedy, one searchsorted per window, not per client.
    bounds = [0]
    num = len(clients)
    while bounds[-1] < num:
        first = bounds[-1]
        by_clients = first + client_buffer_size
        base = ends[first - 1] if first else 0
        by_examples = int(np.searchsorted(ends, base + example_buffer_size)) + 1
        bounds.append(min(max(by_clients, by_examples), num))
    if len(bounds) > 2:
        last_clients = bounds[-1] - bounds[-2]
        last_examples = ends[-1] - ends[bounds[-2] - 1]
        if last_clients < client_buffer_size or last_examples < example_buffer_size:
            del bounds[-2]  # Merge a short tail window into the previous one.
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        a = ends[lo - 1] if lo else 0
        b = ends[hi - 1]
        order[a:b] = order[a:b][rng.permutation(b - a)]
    return order


def shuffle_repeat_batch_indices(
    offsets: np.ndarray,
    batch_size: int,
    client_buffer_size: int,
    example_buffer_size: int,
    seed: int,
    start_batch: int = 0,
) -> Iterator[np.ndarray]:
    """Endless stream of row-index arrays, one per shuffled batch, for a column store.

    The stream is the concatenation of epochs (:func:`shuffled_epoch_order` for epoch 0, 1,
    ...) cut into consecutive chunks of ``batch_size``; a batch that straddles an epoch
    boundary takes the next epoch's first rows, so every batch is full.

    Guarantees: deterministic for ``seed``; stream rows ``[e*N, (e+1)*N)`` (N = total
    examples) are exactly the rows of epoch ``e``, every example once; batch ``k`` uses rows
    ``[k*batch_size, (k+1)*batch_size)`` of the stream.

    Resuming: ``start_batch=k`` yields exactly the stream's batches from ``k`` on, computing
    only the epochs those batches touch (cost independent of ``k``).

    Usage (gather batches yourself, e.g. from device arrays)::

        for idx in shuffle_repeat_batch_indices(fd.offsets, 128, 16, 1024, seed=0):
            batch = {k: col[idx] for k, col in device_columns.items()}

    Yields:
      int64 arrays of shape ``(batch_size,)`` (read-only; do not modify them).

    Raises:
      ValueError: non-positive sizes, a negative seed or start_batch, or no examples.
    """
    return _batch_index_chunks(
        np.asarray(offsets, dtype=np.int64),
        batch_size,
        client_buffer_size,
        example_buffer_size,
        seed,
        start_batch,
    )


def _batch_index_chunks(
    offsets: np.ndarray,
    batch_size: Any,
    client_buffer_size: Any,
    example_buffer_size: Any,
    seed: Any,
    start_batch: Any,
    row_bytes: int = 0,
) -> Iterator[np.ndarray]:
    """The validated shuffled stream from batch ``start_batch`` on, in chunks of whole batches.

    One batch per chunk when ``row_bytes`` is 0; otherwise as many batches as fit
    ``_CHUNK_BYTES`` of rows of that width. Validates here, where the stream is requested, so
    bad arguments fail at the call rather than at the first ``next()`` of the lazy stream.
    """
    client_datasets._check_batch_size(batch_size)
    _check_stream_args(client_buffer_size, example_buffer_size, seed)
    client_datasets._check_int("start_batch", start_batch, minimum=0)
    total = int(offsets[-1]) if len(offsets) else 0
    if total == 0:
        raise ValueError(
            "cannot draw shuffled batches from a dataset with no examples; "
            "check that the dataset (or its slice) has clients with data"
        )
    batches_per_chunk = max(1, _CHUNK_BYTES // (row_bytes * batch_size)) if row_bytes else 1
    return _index_chunks(
        offsets,
        batches_per_chunk * batch_size,
        client_buffer_size,
        example_buffer_size,
        seed,
        start_batch * batch_size,
        total,
    )


def _index_chunks(
    offsets: np.ndarray,
    chunk_rows: int,
    client_buffer_size: int,
    example_buffer_size: int,
    seed: int,
    start_row: int,
    total: int,
) -> Iterator[np.ndarray]:
    """The stream's row indices from ``start_row`` on, in consecutive chunks of ``chunk_rows``.

    A chunk inside one epoch is a read-only view of that epoch's order (no copy); one that
    straddles epochs is concatenated (``chunk_rows`` may exceed an epoch: whole epochs are
    taken as needed).
    """

    def epoch_order(epoch: int) -> np.ndarray:
        order = shuffled_epoch_order(offsets, epoch, client_buffer_size, example_buffer_size, seed)
        order.flags.writeable = False  # Yielded chunks are views of it.
        return order

    epoch, pos = divmod(start_row, total)
    order = epoch_order(epoch)
    while True:
        if pos + chunk_rows <= total:
            yield order[pos : pos + chunk_rows]  # The hot path: a view.
            pos += chunk_rows
        else:
            parts = [order[pos:]]
            need = chunk_rows - (total - pos)
            while need > 0:
                epoch += 1
                order = epoch_order(epoch)
                parts.append(order[:need])
                need -= len(parts[-1])
            pos = len(parts[-1])
            chunk = np.concatenate(parts)
            chunk.flags.writeable = False
            yield chunk
        if pos == total:
            epoch, pos = epoch + 1, 0
            order = epoch_order(epoch)


# --------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------


# Rows at least this wide are gathered with np.take: its per-row copy loop beats fancy
# indexing by ~15% on 28x28 float32 images (a DRAM-bound copy); for narrow rows such as
# int32 labels fancy indexing has the lower fixed cost.
_TAKE_MIN_ROW_BYTES = 64


def _row_bytes(column: np.ndarray) -> int:
    return column.itemsize * int(np.prod(column.shape[1:], dtype=np.int64))


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
        return os.cpu_count() or 1


_helper: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _gather_helper() -> concurrent.futures.ThreadPoolExecutor:
    """The one helper thread that copies half of each large chunk (started on first use).

    Per process: a forked child (a data-loader worker, a launcher job) inherits the executor
    but not its thread, and would wait forever on it; it gets its own.
    """
    global _helper
    if _helper is None or _helper[0] != os.getpid():
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fedjax_exp-gather")
        _helper = (os.getpid(), executor)
    return _helper[1]


class _RowGatherer:
    """Gathers rows of one column, chunk after chunk, the fastest way measured here.

    - Narrow rows (labels): fancy indexing, the lowest fixed cost.
    - Wide rows (images): ``np.take`` into a fresh output array, split between the calling
      thread and one helper thread (``np.take`` releases the GIL while it copies) for chunks
      of at least ``_PARALLEL_GATHER_MIN_BYTES`` where the process may use more than one
      core.
    """

    def __init__(self, column: np.ndarray, rows_per_call: int):
        self._column = column
        self._narrow = column.ndim < 2 or _row_bytes(column) < _TAKE_MIN_ROW_BYTES
        self._two_threads = (
            rows_per_call * _row_bytes(column) >= _PARALLEL_GATHER_MIN_BYTES and _usable_cores() > 1
        )

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        if self._narrow:
            return self._column[indices]
        column = self._column
        # A fresh array per chunk: the caller owns its batches (views of it) for as long as
        # it likes.
        out = np.empty((len(indices), *column.shape[1:]), column.dtype)
        # mode="clip" skips a bounds pass; indices come from the stream and are in range.
        if not self._two_threads:
            return np.take(self._column, indices, axis=0, out=out, mode="clip")
        half = len(indices) // 2
        helper = _gather_helper().submit(
            np.take, self._column, indices[:half], 0, out[:half], "clip"
        )
        np.take(self._column, indices[half:], axis=0, out=out[half:], mode="clip")
        helper.result()
        return out


def _split_batches(
    keys: tuple[str, ...],
    columns: list[np.ndarray],
    num_batches: int,
    batch_size: int,
    mask: np.ndarray | None = None,
) -> Iterator[Examples]:
    """The ``num_batches`` consecutive ``batch_size``-row batches of ``columns``, as views.

    ``mask``, when given, is added (the same array) to every batch under
    ``EXAMPLE_MASK_KEY``. At batch 8 the per-batch Python cost is a visible share of a
    stream: iterating over a reshaped array makes each view in C (about 3x cheaper than
    slicing), and the common key counts build their dict from a literal.

    Raises:
      ValueError: a column cannot be reshaped without a copy (not contiguous).
    """
    parts: list[Iterable[np.ndarray]] = [
        column.reshape(-1, batch_size, *column.shape[1:], copy=False) for column in columns
    ]
    if mask is not None:
        keys = (*keys, EXAMPLE_MASK_KEY)
        parts.append(itertools.repeat(mask, num_batches))
    if not keys:
        return ({} for _ in range(num_batches))
    if len(keys) == 1:
        (k0,) = keys
        return ({k0: a} for a in parts[0])
    if len(keys) == 2:
        k0, k1 = keys
        return ({k0: a, k1: b} for a, b in zip(*parts, strict=True))
    if len(keys) == 3:
        k0, k1, k2 = keys
        return ({k0: a, k1: b, k2: c} for a, b, c in zip(*parts, strict=True))
    if len(keys) == 4:
        k0, k1, k2, k3 = keys
        return ({k0: a, k1: b, k2: c, k3: d} for a, b, c, d in zip(*parts, strict=True))
    return (dict(zip(keys, views, strict=True)) for views in zip(*parts, strict=True))


def _readonly(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False  # Only the view: the caller's own array stays writable.
    return view


def _sorted_ids(ids: Sequence[Any]) -> list[Any]:
    try:
        return sorted(ids)
    except TypeError as e:
        types = sorted({type(i).__name__ for i in ids})
        raise ValueError(
            f"client ids must be mutually comparable (all bytes), got types {types}"
        ) from e


def _column(
    client_data: Mapping[ClientId, Mapping[str, np.ndarray]],
    sorted_ids: Sequence[ClientId],
    offsets: np.ndarray,
    name: str,
) -> np.ndarray:
    """Feature ``name`` of all clients back to back, written once into a preallocated array."""
    first = np.asarray(client_data[sorted_ids[0]][name])
    column = np.empty((int(offsets[-1]), *first.shape[1:]), dtype=first.dtype)
    for i, client_id in enumerate(sorted_ids):
        value = np.asarray(client_data[client_id][name])
        if value.dtype != first.dtype or value.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"feature {name!r} of client {client_id!r} is {value.dtype}"
                f"{list(value.shape[1:])} per example but client {sorted_ids[0]!r} has "
                f"{first.dtype}{list(first.shape[1:])}; cast them to one dtype and shape"
            )
        column[offsets[i] : offsets[i + 1]] = value
    return column


class InMemoryFederatedData(FederatedData):
    """A federated dataset held in memory as a column store (see the module docstring).

    Two constructors:

    - ``InMemoryFederatedData(client_data)`` (FedJAX's signature) from ``{client_id: {feature:
      array}}``; copies the data once into columns.
    - :meth:`from_columns` from ready-made columns and offsets; no copy when the ids are
      already sorted. Use it for large data.
    """

    def __init__(
        self,
        client_data: Mapping[ClientId, Mapping[str, np.ndarray]],
        preprocess_client: ClientPreprocessor = NoOpClientPreprocessor,
        preprocess_batch: BatchPreprocessor = NoOpBatchPreprocessor,
    ):
        """Builds the store from one mapping of features to arrays per client.

        Raises:
          ValueError: clients with different features, dtypes or per-example shapes, or a
            client whose features have different numbers of rows.
        """
        ids = _sorted_ids(list(client_data))
        features: list[str] = list(client_data[ids[0]]) if ids else []
        sizes = np.zeros(len(ids), dtype=np.int64)
        for i, client_id in enumerate(ids):
            examples = client_data[client_id]
            if set(examples) != set(features):
                raise ValueError(
                    f"client {client_id!r} has features {sorted(examples)} but client "
                    f"{ids[0]!r} has {sorted(features)}; all clients need the same features"
                )
            try:
                sizes[i] = client_datasets.num_examples(examples)
            except ValueError as e:
                raise ValueError(f"client {client_id!r}: {e}") from e
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        columns = {name: _column(client_data, ids, offsets, name) for name in features}
        self._init(ids, offsets, columns, preprocess_client, preprocess_batch)

    @classmethod
    def from_columns(
        cls,
        client_ids: Sequence[ClientId],
        offsets: np.ndarray,
        columns: Mapping[str, np.ndarray],
        preprocess_client: ClientPreprocessor = NoOpClientPreprocessor,
        preprocess_batch: BatchPreprocessor = NoOpBatchPreprocessor,
    ) -> InMemoryFederatedData:
        """Builds the store from columns and CSR offsets (the fast constructor).

        Args:
          client_ids: one id per client, in the order their rows appear in the columns.
          offsets: integer array of length ``len(client_ids) + 1``, starting at 0,
            non-decreasing; client ``i`` owns rows ``offsets[i]:offsets[i+1]``.
          columns: feature name -> array whose leading dimension is ``offsets[-1]``.
          preprocess_client: client-level preprocessor.
          preprocess_batch: batch-level preprocessor.

        The arrays are used without copying when ``client_ids`` is sorted; otherwise the rows
        are reordered into sorted-id order once (one copy).

        Raises:
          ValueError: inconsistent ids, offsets or column lengths (the message says which).
        """
        ids = list(client_ids)
        offsets = np.asarray(offsets)
        if offsets.ndim != 1 or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(
                f"offsets must be a 1-D integer array, got dtype {offsets.dtype} "
                f"and shape {offsets.shape}"
            )
        offsets = offsets.astype(np.int64, copy=False)
        if len(offsets) != len(ids) + 1:
            raise ValueError(
                f"offsets must have len(client_ids) + 1 = {len(ids) + 1} entries, "
                f"got {len(offsets)}"
            )
        if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
            raise ValueError("offsets must start at 0 and be non-decreasing")
        if len(set(ids)) != len(ids):
            dupes = [i for i, count in collections.Counter(ids).items() if count > 1]
            raise ValueError(f"client ids must be unique, got duplicates {dupes[:10]}")
        num_rows = int(offsets[-1])
        arrays: dict[str, np.ndarray] = {}
        for name, column in columns.items():
            column = np.asarray(column)
            if column.ndim == 0 or column.shape[0] != num_rows:
                raise ValueError(
                    f"column {name!r} has shape {column.shape} but offsets[-1] = {num_rows}; "
                    "every column needs one row per example"
                )
            arrays[name] = column
        if ids and not arrays:
            raise ValueError("columns must have at least one feature")
        order = _sorted_ids(ids)
        if order != ids:
            # Reorder rows so clients appear in sorted id order (FedJAX's iteration order),
            # which keeps every later slice and padded batch a contiguous view.
            position = {client_id: i for i, client_id in enumerate(ids)}
            perm = np.array([position[c] for c in order], dtype=np.int64)
            sizes = np.diff(offsets)[perm]
            new_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            rows = np.arange(num_rows, dtype=np.int64) + np.repeat(
                offsets[:-1][perm] - new_offsets[:-1], sizes
            )
            arrays = {k: v[rows] for k, v in arrays.items()}
            ids, offsets = order, new_offsets
        store = cls.__new__(cls)
        store._init(ids, offsets, arrays, preprocess_client, preprocess_batch)
        return store

    def _init(
        self,
        sorted_ids: list[ClientId],
        offsets: np.ndarray,
        columns: Mapping[str, np.ndarray],
        preprocess_client: ClientPreprocessor,
        preprocess_batch: BatchPreprocessor,
    ) -> None:
        self._ids = sorted_ids
        self._position = {client_id: i for i, client_id in enumerate(sorted_ids)}
        self._offsets = _readonly(np.asarray(offsets, dtype=np.int64))
        self._columns = {k: _readonly(v) for k, v in columns.items()}
        self._preprocess_client = preprocess_client
        self._preprocess_batch = preprocess_batch

    def _derive(
        self,
        lo: int,
        hi: int,
        preprocess_client: ClientPreprocessor | None = None,
        preprocess_batch: BatchPreprocessor | None = None,
    ) -> InMemoryFederatedData:
        """A store over clients ``lo:hi`` sharing this one's arrays (zero copy)."""
        a, b = int(self._offsets[lo]), int(self._offsets[hi])
        store = type(self).__new__(type(self))
        store._init(
            self._ids[lo:hi],
            self._offsets[lo : hi + 1] - a,
            {k: v[a:b] for k, v in self._columns.items()},
            self._preprocess_client if preprocess_client is None else preprocess_client,
            self._preprocess_batch if preprocess_batch is None else preprocess_batch,
        )
        return store

    # ---- column-store accessors (beyond FedJAX's interface) ----

    @property
    def offsets(self) -> np.ndarray:
        """Read-only int64 CSR offsets (``num_clients + 1``), clients in sorted id order."""
        return self._offsets

    @property
    def columns(self) -> Mapping[str, np.ndarray]:
        """Read-only raw feature columns (before any preprocessing), rows in offsets order."""
        return dict(self._columns)

    @property
    def num_examples(self) -> int:
        """Total number of examples over all clients."""
        return int(self._offsets[-1])

    @property
    def nbytes(self) -> int:
        """Bytes held by the feature columns."""
        return sum(v.nbytes for v in self._columns.values())

    @property
    def batch_preprocessor(self) -> BatchPreprocessor:
        """The preprocessor run on every batch (see :meth:`preprocess_batch`)."""
        return self._preprocess_batch

    @property
    def client_preprocessor(self) -> ClientPreprocessor:
        """The preprocessor run on each client's examples (see :meth:`preprocess_client`)."""
        return self._preprocess_client

    @property
    def supports_column_batching(self) -> bool:
        """Whether whole-dataset batching may work on the columns directly.

        False when a client preprocessor is set: it may change a client's examples (even
        their number), so batching must go client by client through it.
        """
        return not self._preprocess_client.fns

    def gather(self, indices: np.ndarray) -> Examples:
        """The batch of rows ``indices`` (e.g. from :meth:`shuffle_repeat_batch_indices`),
        batch-preprocessed. Ignores the client preprocessor."""
        return self._preprocess_batch({k: v[indices] for k, v in self._columns.items()})

    def shuffle_repeat_batch_indices(
        self,
        batch_size: int,
        client_buffer_size: int,
        example_buffer_size: int,
        seed: int,
        start_batch: int = 0,
    ) -> Iterator[np.ndarray]:
        """:func:`shuffle_repeat_batch_indices` over this store's offsets."""
        return shuffle_repeat_batch_indices(
            self._offsets, batch_size, client_buffer_size, example_buffer_size, seed, start_batch
        )

    def shuffle_repeat_batches(
        self,
        batch_size: int,
        client_buffer_size: int,
        example_buffer_size: int,
        seed: int | None = None,
        start_batch: int = 0,
    ) -> Iterator[Examples]:
        """Endless full shuffled batches (the fast ``shuffle_repeat_batch_federated_data``).

        Batch ``k`` is ``gather`` of the ``k``-th index array of
        :meth:`shuffle_repeat_batch_indices`; ``seed=None`` draws a fresh random seed.

        Raises:
          ValueError: a client preprocessor is set (use
            ``shuffle_repeat_batch_federated_data``, which then walks the clients), or see
            :func:`shuffle_repeat_batch_indices`.
        """
        if not self.supports_column_batching:
            raise ValueError(
                "shuffle_repeat_batches works on raw columns and cannot apply a client "
                "preprocessor; use shuffle_repeat_batch_federated_data(fd, ...) instead"
            )
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0])
        # Gather several batches per call: at small batch sizes the per-call overhead would
        # otherwise rival the copy itself. Each batch is then a view of its chunk. What is
        # left is memory bound: on the 2-core box a shuffled 28x28 float32 row costs ~0.23 us
        # to gather (DRAM bandwidth, ~13 GB/s), about what a sequential copy of it costs.
        chunks = _batch_index_chunks(
            self._offsets,
            batch_size,
            client_buffer_size,
            example_buffer_size,
            seed,
            start_batch,
            row_bytes=max(1, sum(_row_bytes(v) for v in self._columns.values())),
        )
        return self._gather_batches(chunks, batch_size)

    def _gather_batches(self, chunks: Iterator[np.ndarray], batch_size: int) -> Iterator[Examples]:
        keys = tuple(self._columns)
        gathers = None
        preprocess = self._preprocess_batch if self._preprocess_batch.fns else None
        for idx in chunks:
            if gathers is None:  # Chosen for the chunk length (all chunks have the first's).
                gathers = [_RowGatherer(v, len(idx)) for v in self._columns.values()]
            # Each batch is a view of its chunk's rows: batches share no rows, so a caller may
            # keep or modify any batch.
            batches = _split_batches(
                keys, [gather(idx) for gather in gathers], len(idx) // batch_size, batch_size
            )
            if preprocess is None:
                yield from batches
            else:
                yield from map(preprocess, batches)

    def padded_batches(
        self, batch_size: int, num_batch_size_buckets: int = 1
    ) -> Iterator[Examples]:
        """Padded batches over all examples in client-id order (the fast
        ``padded_batch_federated_data``; identical batches to FedJAX's).

        Full batches are read-only views of the columns plus an all-True mask.

        Raises:
          ValueError: ``batch_size`` is not positive, or a client preprocessor is set.
        """
        client_datasets._check_batch_size(batch_size)
        if not self.supports_column_batching:
            raise ValueError(
                "padded_batches works on raw columns and cannot apply a client preprocessor; "
                "use padded_batch_federated_data(fd, ...) instead"
            )
        return self._padded_batches(batch_size, num_batch_size_buckets)

    def _padded_batches(self, batch_size: int, num_batch_size_buckets: int) -> Iterator[Examples]:
        total = self.num_examples
        preprocess = self._preprocess_batch
        full_mask = np.ones([batch_size], dtype=np.bool_)
        full_mask.flags.writeable = False  # One array shared by all full batches.
        num_full = total // batch_size
        # FedJAX carries an exactly-full final batch through its padding step; values agree.
        full_rows = num_full * batch_size
        views = None
        if not preprocess.fns and EXAMPLE_MASK_KEY not in self._columns:
            try:
                views = _split_batches(
                    tuple(self._columns),
                    [v[:full_rows] for v in self._columns.values()],
                    num_full,
                    batch_size,
                    full_mask,
                )
            except ValueError:  # A column that is not contiguous: slice batch by batch.
                views = None
        if views is not None:
            yield from views
        else:
            for start in range(0, full_rows, batch_size):
                rows = slice(start, start + batch_size)
                batch = preprocess({k: v[rows] for k, v in self._columns.items()})
                yield client_datasets.attach_mask(batch, full_mask)
        rest = total - full_rows
        # FedJAX also emits one all-padding batch when there are clients but no examples.
        if rest or (total == 0 and self._ids):
            tail = preprocess({k: v[total - rest :] for k, v in self._columns.items()})
            size = client_datasets.pick_final_batch_size(rest, batch_size, num_batch_size_buckets)
            yield client_datasets.pad_examples(tail, size)

    # ---- FederatedData interface ----

    def slice(
        self, start: ClientId | None = None, stop: ClientId | None = None
    ) -> InMemoryFederatedData:
        lo = 0 if start is None else bisect.bisect_left(self._ids, start)
        hi = len(self._ids) if stop is None else bisect.bisect_left(self._ids, stop)
        return self._derive(lo, max(lo, hi))

    def num_clients(self) -> int:
        return len(self._ids)

    def client_ids(self) -> Iterator[ClientId]:
        return iter(self._ids)

    def client_sizes(self) -> Iterator[tuple[ClientId, int]]:
        if self._preprocess_client.fns:
            # Sizes after the client preprocessor (which may drop or add examples), as FedJAX.
            return ((client_id, len(dataset)) for client_id, dataset in self.clients())
        return zip(self._ids, np.diff(self._offsets).tolist(), strict=True)

    def _index(self, client_id: ClientId) -> int:
        try:
            return self._position[client_id]
        except (KeyError, TypeError):
            raise KeyError(
                f"unknown client id {client_id!r}; ids are bytes such as {self._ids[:1]!r}, "
                "see client_ids()"
            ) from None

    def client_size(self, client_id: ClientId) -> int:
        i = self._index(client_id)
        if self._preprocess_client.fns:
            return len(self._client_dataset(i))
        return int(self._offsets[i + 1] - self._offsets[i])

    def clients(self) -> Iterator[tuple[ClientId, ClientDataset]]:
        for i, client_id in enumerate(self._ids):
            yield client_id, self._client_dataset(i)

    def get_clients(
        self, client_ids: Iterable[ClientId]
    ) -> Iterator[tuple[ClientId, ClientDataset]]:
        for client_id in client_ids:
            yield client_id, self._client_dataset(self._index(client_id))

    def get_client(self, client_id: ClientId) -> ClientDataset:
        return self._client_dataset(self._index(client_id))

    def preprocess_client(
        self, fn: Callable[[ClientId, Examples], Examples]
    ) -> InMemoryFederatedData:
        return self._derive(0, len(self._ids), preprocess_client=self._preprocess_client.append(fn))

    def preprocess_batch(self, fn: Callable[[Examples], Examples]) -> InMemoryFederatedData:
        return self._derive(0, len(self._ids), preprocess_batch=self._preprocess_batch.append(fn))

    def _client_dataset(self, i: int) -> ClientDataset:
        a, b = int(self._offsets[i]), int(self._offsets[i + 1])
        examples = {k: v[a:b] for k, v in self._columns.items()}
        examples = self._preprocess_client(self._ids[i], examples)
        return ClientDataset(examples, self._preprocess_batch)

    def __repr__(self) -> str:
        features = {k: f"{v.dtype}{list(v.shape[1:])}" for k, v in self._columns.items()}
        return (
            f"InMemoryFederatedData(num_clients={len(self._ids)}, "
            f"num_examples={self.num_examples}, features={features})"
        )
