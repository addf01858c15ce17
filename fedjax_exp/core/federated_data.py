"""The FederatedData interface: client ids -> client datasets, plus whole-dataset batching.

A :class:`FederatedData` maps client ids (``bytes``) to :class:`ClientDataset` objects and their
sizes. Implementations differ in storage (in memory, SQLite, ...); access methods are ordered
by how I/O-friendly they are: :meth:`~FederatedData.clients` and
:meth:`~FederatedData.shuffled_clients` (sequential), :meth:`~FederatedData.get_clients`
(random, prefetchable), :meth:`~FederatedData.get_client` (one at a time, for exploration).

Two preprocessing hooks, as in FedJAX: a :class:`ClientPreprocessor` sees the client id and
all of a client's examples before its ClientDataset is built; a
:class:`~fedjax_exp.core.client_datasets.BatchPreprocessor` runs on every batch.

The whole-dataset batchers dispatch on the storage type: for
:class:`~fedjax_exp.core.in_memory_federated_data.InMemoryFederatedData` they use its column
store (index arithmetic, no per-client Python loop); for anything else they walk the clients.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from fedjax_exp.core import client_datasets
from fedjax_exp.core.client_datasets import ClientDataset, Examples
from fedjax_exp.core.typing import ClientId

__all__ = [
    "ClientId",
    "ClientPreprocessor",
    "FederatedData",
    "FederatedDataBuilder",
    "NoOpClientPreprocessor",
    "RepeatableIterator",
    "SubsetFederatedData",
    "buffered_shuffle_clients_forever",
    "intersect_slice_ranges",
    "padded_batch_federated_data",
    "shuffle_repeat_batch_federated_data",
]


class ClientPreprocessor:
    """An ordered chain of ``(client_id, examples) -> examples`` functions.

    Like :class:`~fedjax_exp.core.client_datasets.BatchPreprocessor` but per client and aware
    of the client id; it may change the number of examples (e.g. cap them).
    """

    def __init__(self, fns: Iterable[Callable[[ClientId, Examples], Examples]] = ()):
        self._fns = tuple(fns)

    @property
    def fns(self) -> tuple[Callable[[ClientId, Examples], Examples], ...]:
        """The functions, in the order they run."""
        return self._fns

    def __call__(self, client_id: ClientId, examples: Examples) -> Examples:
        if not self._fns:
            return examples
        out = dict(examples)
        for fn in self._fns:
            out = fn(client_id, out)
        client_datasets.assert_consistent_rows(out)
        return out

    def append(self, fn: Callable[[ClientId, Examples], Examples]) -> ClientPreprocessor:
        """A new preprocessor that runs ``fn`` after this one's functions."""
        return ClientPreprocessor((*self._fns, fn))

    def __repr__(self) -> str:
        return f"ClientPreprocessor({self._fns})"


NoOpClientPreprocessor = ClientPreprocessor()


class FederatedData(abc.ABC):
    """A federated dataset: client ids (bytes), their sizes and their ClientDatasets."""

    @abc.abstractmethod
    def slice(self, start: ClientId | None = None, stop: ClientId | None = None) -> FederatedData:
        """The clients with ``start <= id < stop`` (either bound may be None)."""

    @abc.abstractmethod
    def num_clients(self) -> int:
        """Number of clients."""

    @abc.abstractmethod
    def client_ids(self) -> Iterator[ClientId]:
        """All client ids (order is implementation-defined; sorted for the in-memory store)."""

    @abc.abstractmethod
    def client_sizes(self) -> Iterator[tuple[ClientId, int]]:
        """``(client_id, number of examples)`` for every client."""

    @abc.abstractmethod
    def client_size(self, client_id: ClientId) -> int:
        """Number of examples of one client; KeyError for an unknown id."""

    @abc.abstractmethod
    def clients(self) -> Iterator[tuple[ClientId, ClientDataset]]:
        """Every client once, in a deterministic order."""

    def shuffled_clients(
        self, buffer_size: int, seed: int | None = None
    ) -> Iterator[tuple[ClientId, ClientDataset]]:
        """Clients in buffered-shuffle order (a buffer of ``buffer_size`` clients), forever.

        The default re-walks :meth:`clients` each pass with FedJAX's buffered shuffle, so the
        order equals FedJAX's for the same seed; storage formats may override it.
        """
        return buffered_shuffle_clients_forever(self.clients, buffer_size, seed)

    @abc.abstractmethod
    def get_clients(
        self, client_ids: Iterable[ClientId]
    ) -> Iterator[tuple[ClientId, ClientDataset]]:
        """The given clients, in the given order; KeyError for an unknown id."""

    @abc.abstractmethod
    def get_client(self, client_id: ClientId) -> ClientDataset:
        """One client's dataset; KeyError for an unknown id."""

    @abc.abstractmethod
    def preprocess_client(self, fn: Callable[[ClientId, Examples], Examples]) -> FederatedData:
        """A new FederatedData whose client preprocessor also runs ``fn``."""

    @abc.abstractmethod
    def preprocess_batch(self, fn: Callable[[Examples], Examples]) -> FederatedData:
        """A new FederatedData whose batch preprocessor also runs ``fn``."""


def intersect_slice_ranges(
    current_start: ClientId | None,
    current_stop: ClientId | None,
    new_start: ClientId | None,
    new_stop: ClientId | None,
) -> tuple[ClientId | None, ClientId | None]:
    """The intersection of two ``[start, stop)`` id ranges (None = unbounded), so that
    slicing a slice never widens it."""
    if current_start is not None:
        new_start = current_start if new_start is None else max(current_start, new_start)
    if current_stop is not None:
        new_stop = current_stop if new_stop is None else min(current_stop, new_stop)
    return new_start, new_stop


def _in_memory_store(fd: FederatedData) -> Any:
    """``fd`` if it is the column store and its fast paths apply, else None."""
    # Imported here: in_memory_federated_data imports this module (it implements the interface).
    from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData

    if isinstance(fd, InMemoryFederatedData) and fd.supports_column_batching:
        return fd
    return None


def padded_batch_federated_data(
    fd: FederatedData,
    hparams: client_datasets.PaddedBatchHParams | None = None,
    **kwargs: Any,
) -> Iterator[Examples]:
    """Padded batches over all clients of ``fd`` in :meth:`FederatedData.clients` order.

    The same batches as FedJAX (see
    :func:`~fedjax_exp.core.client_datasets.padded_batch_client_datasets`): batches span
    client boundaries, only the last is padded, every batch has ``EXAMPLE_MASK_KEY``. Useful
    for evaluating on a whole federated dataset.
    """
    hparams = client_datasets._resolve_hparams(client_datasets.PaddedBatchHParams, hparams, kwargs)
    store = _in_memory_store(fd)
    if store is not None:
        return store.padded_batches(hparams.batch_size, hparams.num_batch_size_buckets)
    datasets = (dataset for _, dataset in fd.clients())
    return client_datasets.padded_batch_client_datasets(datasets, hparams)


def shuffle_repeat_batch_federated_data(
    fd: FederatedData,
    batch_size: int,
    client_buffer_size: int,
    example_buffer_size: int,
    seed: int | None = None,
) -> Iterator[Examples]:
    """An endless stream of full, shuffled batches drawn across all clients of ``fd``.

    For training a centralized baseline on federated data. Deterministic for an integer seed;
    use ``itertools.islice`` to cap it.

    Two implementations, chosen by the type of ``fd``:

    - :class:`~fedjax_exp.core.in_memory_federated_data.InMemoryFederatedData` (without a
      client preprocessor): epoch-based windowed shuffle over the column store, see
      :func:`~fedjax_exp.core.in_memory_federated_data.shuffle_repeat_batch_indices`. Every
      example appears exactly once per epoch of the stream; the order is NOT FedJAX's.
    - any other FederatedData: FedJAX's algorithm (buffered shuffle of clients, then buffered
      shuffle of examples through ``example_buffer_size`` slots), same order as FedJAX for
      the same seed, but no per-epoch coverage guarantee.

    Raises:
      ValueError: non-positive batch or buffer size, or no examples at all.
    """
    client_datasets._check_batch_size(batch_size)
    client_datasets._check_int("client_buffer_size", client_buffer_size)
    client_datasets._check_int("example_buffer_size", example_buffer_size)
    store = _in_memory_store(fd)
    if store is not None:
        return store.shuffle_repeat_batches(
            batch_size, client_buffer_size, example_buffer_size, seed
        )
    # Checked here, not in the generator, so the error comes at the call rather than at next().
    if sum(size for _, size in fd.client_sizes()) == 0:
        raise ValueError(
            "shuffle_repeat_batch_federated_data needs at least one example; "
            "every client of this FederatedData is empty"
        )
    return _generic_shuffle_repeat_batch(
        fd, batch_size, client_buffer_size, example_buffer_size, seed
    )


def _generic_shuffle_repeat_batch(
    fd: FederatedData,
    batch_size: int,
    client_buffer_size: int,
    example_buffer_size: int,
    seed: int | None,
) -> Iterator[Examples]:
    rng = np.random.RandomState(seed)
    client_seed = rng.randint(1 << 32)  # Drawn first, as FedJAX does, to keep orders equal.
    datasets = (ds for _, ds in fd.shuffled_clients(client_buffer_size, client_seed))
    yield from client_datasets.buffered_shuffle_batch_client_datasets(
        datasets, batch_size=batch_size, buffer_size=example_buffer_size, rng=rng
    )


class RepeatableIterator:
    """An iterator that, once exhausted, starts again from the first value.

    The first pass pulls from ``base`` and remembers the values (lists, tuples, dicts, str
    and bytes are replayed directly); later passes replay them. Useful to interleave expensive
    loading with compute on the first pass and reuse it afterwards. Stateful: do not
    interleave two consumers.
    """

    def __init__(self, base: Iterable[Any]):
        self._iter = iter(base)
        if isinstance(base, (list, tuple, dict, str, bytes)):
            self._first_pass = False
            self._buf: Any = base
        else:
            self._first_pass = True
            self._buf = []

    def __iter__(self) -> RepeatableIterator:
        return self

    def __next__(self) -> Any:
        try:
            value = next(self._iter)
        except StopIteration:
            self._first_pass = False
            self._iter = iter(self._buf)
            raise
        if self._first_pass:
            self._buf.append(value)
        return value


def buffered_shuffle_clients_forever(
    clients: Callable[[], Iterator[tuple[ClientId, ClientDataset]]],
    buffer_size: int,
    seed: int | None,
) -> Iterator[tuple[ClientId, ClientDataset]]:
    """Endless buffered shuffle of ``clients()``, re-walked each pass.

    The RNG use matches FedJAX's ``shuffled_clients``, so orders agree for a seed.
    """
    rng = np.random.RandomState(seed)
    while True:
        yield from client_datasets.buffered_shuffle(clients(), buffer_size, rng)


class SubsetFederatedData(FederatedData):
    """A view of ``base`` restricted to an arbitrary set of client ids.

    Args:
      base: the full FederatedData.
      client_ids: ids to keep.
      validate: check every id exists in ``base`` (ValueError otherwise).
    """

    def __init__(self, base: FederatedData, client_ids: Iterable[ClientId], validate: bool = True):
        self._base = base
        self._client_ids = set(client_ids)
        if validate:
            unknown = self._client_ids.difference(base.client_ids())
            if unknown:
                raise ValueError(
                    f"{len(unknown)} client ids are not in the base FederatedData "
                    f"(first up to 10: {sorted(unknown)[:10]})"
                )

    def _check(self, client_id: ClientId) -> None:
        if client_id not in self._client_ids:
            raise KeyError(f"client id {client_id!r} is not in this SubsetFederatedData")

    def slice(self, start: ClientId | None = None, stop: ClientId | None = None) -> FederatedData:
        ids = {
            i
            for i in self._client_ids
            if (start is None or i >= start) and (stop is None or i < stop)
        }
        return SubsetFederatedData(self._base.slice(start, stop), ids, validate=False)

    def num_clients(self) -> int:
        return len(self._client_ids)

    def client_ids(self) -> Iterator[ClientId]:
        return iter(sorted(self._client_ids))

    def client_sizes(self) -> Iterator[tuple[ClientId, int]]:
        for client_id, size in self._base.client_sizes():
            if client_id in self._client_ids:
                yield client_id, size

    def client_size(self, client_id: ClientId) -> int:
        self._check(client_id)
        return self._base.client_size(client_id)

    def clients(self) -> Iterator[tuple[ClientId, ClientDataset]]:
        yield from self.get_clients(sorted(self._client_ids))

    def get_clients(
        self, client_ids: Iterable[ClientId]
    ) -> Iterator[tuple[ClientId, ClientDataset]]:
        def checked() -> Iterator[ClientId]:
            for client_id in client_ids:
                self._check(client_id)
                yield client_id

        yield from self._base.get_clients(checked())

    def get_client(self, client_id: ClientId) -> ClientDataset:
        self._check(client_id)
        return self._base.get_client(client_id)

    def preprocess_client(self, fn: Callable[[ClientId, Examples], Examples]) -> FederatedData:
        return SubsetFederatedData(
            self._base.preprocess_client(fn), self._client_ids, validate=False
        )

    def preprocess_batch(self, fn: Callable[[Examples], Examples]) -> FederatedData:
        return SubsetFederatedData(
            self._base.preprocess_batch(fn), self._client_ids, validate=False
        )


class FederatedDataBuilder(abc.ABC):
    """Writes ``(client_id, examples)`` pairs to a storage format; used as a context manager.

    ::

        with SomeBuilder(path) as builder:
            builder.add_many([(b'a', {'x': xa}), (b'b', {'x': xb})])

    Leaving the ``with`` block finalizes the output; implementations raise on failure.
    """

    @abc.abstractmethod
    def __enter__(self) -> FederatedDataBuilder:
        """Returns the builder."""

    @abc.abstractmethod
    def __exit__(self, exc_type: Any, exc_value: Any, exc_traceback: Any) -> Any:
        """Finalizes (or abandons, on an exception) the output."""

    @abc.abstractmethod
    def add_many(self, client_ids_examples: Iterable[tuple[ClientId, Examples]]) -> None:
        """Adds several clients."""
