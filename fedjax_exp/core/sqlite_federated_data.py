"""Federated data stored in FedJAX's SQLite format: lazy reading, writing, bulk loading.

The file holds one table, one row per client::

    CREATE TABLE federated_data (
      client_id BLOB NOT NULL PRIMARY KEY,
      data BLOB NOT NULL,
      num_examples INTEGER NOT NULL
    );

``data`` is ``zlib.compress(msgpack(examples))`` where ``examples`` is a ``{feature: ndarray}``
dict. Inside the msgpack stream an ndarray is an extension value (type code 1) whose payload is
itself msgpack of ``(shape, dtype name, C-order bytes)``. Arrays of ``bytes`` objects use type
code 4 with payload ``(shape, flat list of bytes)``; numpy scalars use code 3 (read only).
This is the same wire format as FedJAX 0.0.17, so files go both ways: FedJAX reads what
:class:`SQLiteFederatedDataBuilder` writes, and :class:`SQLiteFederatedData` reads FedJAX's
EMNIST cache files.

Two ways to read:

- :class:`SQLiteFederatedData` (``SQLiteFederatedData.new(path)``): lazy; every access queries
  the database. Memory stays small, which matters for large datasets.
- :func:`load_sqlite_columns` / :func:`load_sqlite_in_memory`: decode every row once into
  preallocated column arrays (CSR-style offsets), for the fast in-memory batching path.
"""

from __future__ import annotations

import os
import pathlib
import sqlite3
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import msgpack
import numpy as np

from fedjax_exp.core import client_datasets
from fedjax_exp.core import federated_data as fd_lib
from fedjax_exp.core.atomic_file import AtomicFile
from fedjax_exp.core.client_datasets import BatchPreprocessor, ClientDataset, Examples
from fedjax_exp.core.federated_data import ClientPreprocessor, FederatedData, FederatedDataBuilder
from fedjax_exp.core.typing import ClientId

__all__ = [
    "SQLITE_MAGIC",
    "SQLiteFederatedData",
    "SQLiteFederatedDataBuilder",
    "decompress_and_deserialize",
    "deserialize_examples",
    "load_sqlite_columns",
    "load_sqlite_in_memory",
    "serialize_examples",
    "write_sqlite",
]

# Every SQLite 3 database file starts with these 16 bytes.
SQLITE_MAGIC = b"SQLite format 3\x00"

_EXT_NDARRAY = 1
_EXT_NPSCALAR = 3
_EXT_BYTES_NDARRAY = 4

_CREATE_TABLE = (
    "CREATE TABLE federated_data ("
    " client_id BLOB NOT NULL PRIMARY KEY,"
    " data BLOB NOT NULL,"
    " num_examples INTEGER NOT NULL);"
)


# --------------------------------------------------------------------------------------------
# Serialization (FedJAX wire format)
# --------------------------------------------------------------------------------------------


def _pack_ext(value: Any) -> msgpack.ExtType:
    """msgpack ``default`` hook: encodes numpy arrays (and jax arrays) as extension values."""
    if not isinstance(value, np.ndarray) and hasattr(value, "__array__"):
        value = np.asarray(value)  # jax.Array and friends: store their host copy.
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            flat = list(value.reshape(-1))
            if not all(isinstance(item, bytes) for item in flat):
                raise ValueError("object arrays can be serialized only when they hold bytes")
            payload = msgpack.packb((value.shape, flat), use_bin_type=True)
            return msgpack.ExtType(_EXT_BYTES_NDARRAY, payload)
        if value.dtype.fields is not None:
            raise ValueError(f"structured dtype {value.dtype} cannot be serialized")
        payload = msgpack.packb(
            (value.shape, value.dtype.name, value.tobytes(order="C")), use_bin_type=True
        )
        return msgpack.ExtType(_EXT_NDARRAY, payload)
    if isinstance(value, np.generic):
        # Read back as a scalar (code 3), as FedJAX does.
        arr = np.asarray(value)
        payload = msgpack.packb((arr.shape, arr.dtype.name, arr.tobytes()), use_bin_type=True)
        return msgpack.ExtType(_EXT_NPSCALAR, payload)
    raise TypeError(f"cannot serialize value of type {type(value).__name__}")


def _array_from_payload(payload: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
    dtype = np.dtype(dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name)
    # frombuffer gives a read-only view of the payload: no copy for large arrays.
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _unpack_ext(code: int, payload: bytes) -> Any:
    """msgpack ``ext_hook``: the inverse of :func:`_pack_ext`."""
    if code == _EXT_NDARRAY:
        return _array_from_payload(payload)
    if code == _EXT_NPSCALAR:
        return _array_from_payload(payload)[()]
    if code == _EXT_BYTES_NDARRAY:
        shape, flat = msgpack.unpackb(payload, raw=True)
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(shape)
    return msgpack.ExtType(code, payload)


def serialize_examples(examples: Mapping[str, Any]) -> bytes:
    """``{feature: array}`` -> zlib-compressed msgpack bytes (FedJAX's ``data`` column)."""
    packed = msgpack.packb(dict(examples), default=_pack_ext, strict_types=True)
    return zlib.compress(packed)


def deserialize_examples(data: bytes) -> dict[str, np.ndarray]:
    """The inverse of :func:`serialize_examples`. Arrays are read-only views of ``data``."""
    return msgpack.unpackb(zlib.decompress(data), ext_hook=_unpack_ext, raw=False)


# FedJAX's name for the default parser.
decompress_and_deserialize = deserialize_examples


# --------------------------------------------------------------------------------------------
# Opening and validating files
# --------------------------------------------------------------------------------------------


def _check_sqlite_file(path: pathlib.Path) -> None:
    """Clear errors for a missing file or one that is not an SQLite database."""
    if not path.exists():
        raise FileNotFoundError(f"SQLite federated data file not found: {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"expected an SQLite file, got a directory: {str(path)!r}")
    with open(path, "rb") as f:
        head = f.read(len(SQLITE_MAGIC))
    if head != SQLITE_MAGIC:
        raise ValueError(
            f"{str(path)!r} is not an SQLite database (bad header {head[:16]!r}); "
            "expected FedJAX's SQLite federated data format"
        )


def _connect_read_only(path: pathlib.Path) -> sqlite3.Connection:
    """A read-only connection (never creates a file, unlike ``sqlite3.connect(path)``)."""
    _check_sqlite_file(path)
    uri = path.resolve().as_uri() + "?mode=ro"
    # check_same_thread=False: prefetching readers may call from a worker thread; the database
    # is opened read-only and sqlite serializes access to one connection.
    connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
        columns = {
            row[1] for row in connection.execute("PRAGMA table_info(federated_data);").fetchall()
        }
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise ValueError(f"{str(path)!r} is a corrupt or truncated SQLite database: {exc}") from exc
    missing = {"client_id", "data", "num_examples"} - columns
    if missing:
        connection.close()
        if not columns:
            raise ValueError(
                f"{str(path)!r} has no 'federated_data' table; expected FedJAX's layout "
                "federated_data(client_id BLOB PRIMARY KEY, data BLOB, num_examples INTEGER)"
            )
        raise ValueError(
            f"{str(path)!r}: table 'federated_data' lacks columns {sorted(missing)}; "
            f"found {sorted(columns)}"
        )
    return connection


def _decode_row(
    client_id: ClientId, data: bytes, parse: Callable[[bytes], Examples], path: str
) -> Examples:
    try:
        return parse(data)
    except (zlib.error, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(
            f"corrupt data for client {client_id!r} in {path!r}: {exc}; re-download or "
            "rebuild that file"
        ) from exc


def _database_path(connection: sqlite3.Connection) -> str:
    """The file behind ``connection`` (for error messages; the connection knows it)."""
    return connection.execute("PRAGMA database_list;").fetchone()[2]


# --------------------------------------------------------------------------------------------
# Lazy reader
# --------------------------------------------------------------------------------------------


class SQLiteFederatedData(FederatedData):
    """A :class:`FederatedData` read lazily from an SQLite file in FedJAX's format.

    Client order is the table's row order (``ORDER BY rowid``), as in FedJAX. Unknown client
    ids raise ``KeyError``. Open with :meth:`new`.
    """

    @staticmethod
    def new(
        path: str | os.PathLike[str],
        parse_examples: Callable[[bytes], Examples] = deserialize_examples,
    ) -> SQLiteFederatedData:
        """Opens ``path`` read-only; FileNotFoundError / ValueError for a missing or bad file."""
        connection = _connect_read_only(pathlib.Path(path))
        return SQLiteFederatedData(connection, parse_examples)

    def __init__(
        self,
        connection: sqlite3.Connection,
        parse_examples: Callable[[bytes], Examples] = deserialize_examples,
        start: ClientId | None = None,
        stop: ClientId | None = None,
        preprocess_client: ClientPreprocessor = fd_lib.NoOpClientPreprocessor,
        preprocess_batch: BatchPreprocessor = client_datasets.NoOpBatchPreprocessor,
    ):
        self._connection = connection
        self._parse_examples = parse_examples
        self._start = start
        self._stop = stop
        self._preprocess_client = preprocess_client
        self._preprocess_batch = preprocess_batch

    def _replace(self, **changes: Any) -> SQLiteFederatedData:
        kwargs = dict(
            connection=self._connection,
            parse_examples=self._parse_examples,
            start=self._start,
            stop=self._stop,
            preprocess_client=self._preprocess_client,
            preprocess_batch=self._preprocess_batch,
        )
        kwargs.update(changes)
        return SQLiteFederatedData(**kwargs)

    def slice(
        self, start: ClientId | None = None, stop: ClientId | None = None
    ) -> SQLiteFederatedData:
        start, stop = fd_lib.intersect_slice_ranges(self._start, self._stop, start, stop)
        return self._replace(start=start, stop=stop)

    def preprocess_client(
        self, fn: Callable[[ClientId, Examples], Examples]
    ) -> SQLiteFederatedData:
        return self._replace(preprocess_client=self._preprocess_client.append(fn))

    def preprocess_batch(self, fn: Callable[[Examples], Examples]) -> SQLiteFederatedData:
        return self._replace(preprocess_batch=self._preprocess_batch.append(fn))

    # -- queries --------------------------------------------------------------------------

    def _where(self) -> str:
        clauses = []
        if self._start is not None:
            clauses.append(":start <= client_id")
        if self._stop is not None:
            clauses.append("client_id < :stop")
        return " AND ".join(clauses) if clauses else "1"

    def _params(self) -> dict[str, Any]:
        return {"start": self._start, "stop": self._stop}

    def _in_range(self, client_id: ClientId) -> bool:
        return (self._start is None or self._start <= client_id) and (
            self._stop is None or client_id < self._stop
        )

    def _query(self, columns: str) -> Iterator[tuple[Any, ...]]:
        sql = f"SELECT {columns} FROM federated_data WHERE {self._where()} ORDER BY rowid;"
        yield from self._connection.execute(sql, self._params())

    def num_clients(self) -> int:
        sql = f"SELECT COUNT(*) FROM federated_data WHERE {self._where()};"
        return int(self._connection.execute(sql, self._params()).fetchone()[0])

    def client_ids(self) -> Iterator[ClientId]:
        for (client_id,) in self._query("client_id"):
            yield bytes(client_id)

    def client_sizes(self) -> Iterator[tuple[ClientId, int]]:
        for client_id, size in self._query("client_id, num_examples"):
            yield bytes(client_id), int(size)

    def _lookup(self, client_id: ClientId, column: str) -> Any:
        """One column of one client's row; KeyError if the id is unknown or outside the slice."""
        if self._in_range(client_id):
            row = self._connection.execute(
                f"SELECT {column} FROM federated_data WHERE client_id = ?;", (client_id,)
            ).fetchone()
            if row is not None:
                return row[0]
        raise KeyError(f"unknown client id {client_id!r} (or outside this slice); see client_ids()")

    def client_size(self, client_id: ClientId) -> int:
        return int(self._lookup(client_id, "num_examples"))

    def clients(self) -> Iterator[tuple[ClientId, ClientDataset]]:
        for client_id, data in self._query("client_id, data"):
            client_id = bytes(client_id)
            yield client_id, self._client_dataset(client_id, data)

    def shuffled_clients(
        self, buffer_size: int, seed: int | None = None
    ) -> Iterator[tuple[ClientId, ClientDataset]]:
        # Same buffered shuffle and RNG stream as FedJAX, so orders match for a seed.
        rng = np.random.RandomState(seed)
        while True:
            rows = ((bytes(k), v) for k, v in self._query("client_id, data"))
            for client_id, data in client_datasets.buffered_shuffle(rows, buffer_size, rng):
                yield client_id, self._client_dataset(client_id, data)

    def get_clients(
        self, client_ids: Iterable[ClientId]
    ) -> Iterator[tuple[ClientId, ClientDataset]]:
        for client_id in client_ids:
            yield client_id, self.get_client(client_id)

    def get_client(self, client_id: ClientId) -> ClientDataset:
        return self._client_dataset(client_id, self._lookup(client_id, "data"))

    def _client_dataset(self, client_id: ClientId, data: bytes) -> ClientDataset:
        examples = _decode_row(
            client_id, data, self._parse_examples, _database_path(self._connection)
        )
        return ClientDataset(self._preprocess_client(client_id, examples), self._preprocess_batch)

    def close(self) -> None:
        """Closes the shared connection (all slices / views of this file stop working)."""
        self._connection.close()


# --------------------------------------------------------------------------------------------
# Bulk loading into columns
# --------------------------------------------------------------------------------------------


def load_sqlite_columns(
    path: str | os.PathLike[str],
    features: Sequence[str] | None = None,
    empty_clients: str = "error",
) -> tuple[list[ClientId], np.ndarray, dict[str, np.ndarray]]:
    """Reads a whole SQLite file into ``(client_ids, offsets, columns)``.

    ``columns[f][offsets[i]:offsets[i+1]]`` is client ``client_ids[i]``'s feature ``f``.
    Clients come in row order. Arrays are allocated once from the ``num_examples`` column
    and filled row by row, so peak memory is the result plus one decoded client.

    Args:
      path: the SQLite file.
      features: features to keep (default: all, as found in the first client).
      empty_clients: ``'error'`` (default) raises ValueError for a client with no examples;
        ``'drop'`` leaves such clients out.

    Raises:
      FileNotFoundError, ValueError: missing / corrupt file, a client whose data does not match
        its ``num_examples`` or the other clients' features, dtypes and shapes.
    """
    if empty_clients not in ("error", "drop"):
        raise ValueError(f"empty_clients must be 'error' or 'drop', got {empty_clients!r}")
    path = pathlib.Path(path)
    connection = _connect_read_only(path)
    try:
        try:
            rows = connection.execute(
                "SELECT client_id, num_examples FROM federated_data ORDER BY rowid;"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise ValueError(
                f"{str(path)!r} is a corrupt or truncated SQLite database: {exc}"
            ) from exc
        if not rows:
            raise ValueError(f"{str(path)!r} holds no clients")
        empty = [bytes(cid) for cid, n in rows if n == 0]
        if empty and empty_clients == "error":
            raise ValueError(
                f"{str(path)!r}: {len(empty)} client(s) have zero examples (first: "
                f"{empty[0]!r}); pass empty_clients='drop' to leave them out (in run.py: "
                "dataset.loader.empty_clients=drop)"
            )
        rows = [(bytes(cid), int(n)) for cid, n in rows if n > 0]
        client_ids = [cid for cid, _ in rows]
        sizes = np.array([n for _, n in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        position = {cid: i for i, cid in enumerate(client_ids)}

        columns: dict[str, np.ndarray] | None = None
        cursor = connection.execute(
            "SELECT client_id, data FROM federated_data WHERE num_examples > 0 ORDER BY rowid;"
        )
        try:
            for client_id, data in cursor:
                client_id = bytes(client_id)
                examples = _decode_row(client_id, data, deserialize_examples, str(path))
                if columns is None:
                    keep = list(examples) if features is None else list(features)
                    columns = _allocate(examples, keep, int(offsets[-1]), client_id)
                i = position[client_id]
                _fill(columns, examples, int(offsets[i]), int(sizes[i]), client_id)
        except sqlite3.DatabaseError as exc:
            raise ValueError(
                f"{str(path)!r} is a corrupt or truncated SQLite database: {exc}"
            ) from exc
        assert columns is not None
        return client_ids, offsets, columns
    finally:
        connection.close()


def _allocate(
    examples: Examples, features: Sequence[str], total: int, client_id: ClientId
) -> dict[str, np.ndarray]:
    missing = [f for f in features if f not in examples]
    if missing:
        raise ValueError(
            f"client {client_id!r} lacks features {missing}; it has {sorted(examples)}"
        )
    return {
        f: np.empty((total, *np.shape(examples[f])[1:]), dtype=np.asarray(examples[f]).dtype)
        for f in features
    }


def _fill(
    columns: dict[str, np.ndarray],
    examples: Examples,
    start: int,
    size: int,
    client_id: ClientId,
) -> None:
    for name, out in columns.items():
        if name not in examples:
            raise ValueError(f"client {client_id!r} lacks feature {name!r}")
        value = np.asarray(examples[name])
        if value.shape != (size, *out.shape[1:]) or value.dtype != out.dtype:
            raise ValueError(
                f"client {client_id!r}: feature {name!r} has shape {value.shape} and dtype "
                f"{value.dtype}, expected {(size, *out.shape[1:])} and {out.dtype} (from the "
                "num_examples column and the first client)"
            )
        out[start : start + size] = value


def load_sqlite_in_memory(
    path: str | os.PathLike[str],
    features: Sequence[str] | None = None,
    empty_clients: str = "error",
) -> FederatedData:
    """Loads a whole SQLite file into an ``InMemoryFederatedData`` column store."""
    from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData

    client_ids, offsets, columns = load_sqlite_columns(path, features, empty_clients)
    return InMemoryFederatedData.from_columns(client_ids, offsets, columns)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


class SQLiteFederatedDataBuilder(FederatedDataBuilder):
    """Writes a FedJAX-format SQLite file, atomically.

    Rows go to a temporary file beside ``path``; a clean exit of the ``with`` block moves it
    into place with ``os.replace``, an exception deletes it. So ``path`` is either absent or
    complete, never half-written. ::

        with SQLiteFederatedDataBuilder('data.sqlite') as builder:
            builder.add_many([(b'client_0', {'x': x0, 'y': y0}), ...])

    Args:
      path: destination file.
      overwrite: replace an existing ``path`` (default: FileExistsError).
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False):
        self._file = AtomicFile(path, overwrite=overwrite)
        try:
            self._connection: sqlite3.Connection | None = sqlite3.connect(self._file.tmp)
            self._connection.execute(_CREATE_TABLE)
            self._connection.commit()
        except BaseException:
            self._file.discard()
            raise

    def __enter__(self) -> SQLiteFederatedDataBuilder:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, exc_traceback: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add_many(self, client_ids_examples: Iterable[tuple[ClientId, Examples]]) -> None:
        """Adds clients; ValueError for an empty client, mismatched lengths or a duplicate id."""
        if self._connection is None:
            raise RuntimeError("the builder is closed")

        def rows() -> Iterator[tuple[bytes, bytes, int]]:
            for client_id, examples in client_ids_examples:
                if not isinstance(client_id, bytes):
                    raise TypeError(f"client ids must be bytes, got {client_id!r}")
                try:
                    n = client_datasets.num_examples(examples, validate=True)
                except ValueError as exc:
                    raise ValueError(f"client {client_id!r}: {exc}") from exc
                if n == 0:
                    raise ValueError(
                        f"client {client_id!r} has zero examples; leave empty clients out"
                    )
                yield client_id, serialize_examples(examples), n

        try:
            self._connection.executemany("INSERT INTO federated_data VALUES (?, ?, ?);", rows())
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"duplicate client id: {exc}") from exc
        self._connection.commit()

    def close(self) -> None:
        """Finishes the file and moves it to ``path``."""
        if self._connection is None:
            return
        self._connection.commit()
        self._connection.close()
        self._connection = None
        self._file.commit()

    def abort(self) -> None:
        """Discards everything written; ``path`` is left untouched."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        self._file.discard()


def write_sqlite(
    path: str | os.PathLike[str],
    client_ids: Sequence[ClientId],
    offsets: np.ndarray,
    columns: Mapping[str, np.ndarray],
    overwrite: bool = False,
) -> None:
    """Writes a column store ``(client_ids, offsets, columns)`` as a FedJAX SQLite file."""
    offsets = np.asarray(offsets)
    if offsets.shape != (len(client_ids) + 1,):
        raise ValueError(
            f"offsets must have len(client_ids) + 1 = {len(client_ids) + 1} entries, "
            f"got shape {offsets.shape}"
        )
    with SQLiteFederatedDataBuilder(path, overwrite=overwrite) as builder:
        builder.add_many(
            (
                cid,
                {
                    name: np.ascontiguousarray(col[offsets[i] : offsets[i + 1]])
                    for name, col in columns.items()
                },
            )
            for i, cid in enumerate(client_ids)
        )
