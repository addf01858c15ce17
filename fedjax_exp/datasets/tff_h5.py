"""TensorFlow Federated's h5 layout for federated datasets: read into columns, write atomically.

Layout: one group per client under ``examples``, one dataset per feature, all of a client's
features sharing their leading length::

    examples/<client_id>/pixels   float32 (n, 28, 28)   # EMNIST
    examples/<client_id>/label    int32   (n,)

Reading fills one preallocated array per feature with one ``read_direct`` per client dataset
(no per-example work, no intermediate copies). Client ids come back as UTF-8 ``bytes`` in the
file's (sorted) group order.

A client with zero examples is an error by default: TFF's files never have one, so it signals a
broken file, and an empty client would silently vanish from sampling. ``empty_clients='drop'``
leaves such clients out instead.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import h5py
import numpy as np

from fedjax_exp.core.atomic_file import AtomicFile

__all__ = ["HDF5_MAGIC", "ClientColumns", "is_hdf5_file", "read_h5_columns", "write_h5_columns"]

# HDF5 files start with this signature (at offset 0 unless a user block precedes it).
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class ClientColumns(NamedTuple):
    """A federated dataset as columns: client ``i`` owns rows ``offsets[i]:offsets[i+1]``."""

    client_ids: list[bytes]
    offsets: np.ndarray  # int64, len(client_ids) + 1, offsets[0] == 0
    columns: dict[str, np.ndarray]  # leading dimension offsets[-1]

    @property
    def num_examples(self) -> int:
        return int(self.offsets[-1])

    def client(self, index: int) -> dict[str, np.ndarray]:
        """Client ``index``'s examples (views into the columns)."""
        lo, hi = int(self.offsets[index]), int(self.offsets[index + 1])
        return {name: col[lo:hi] for name, col in self.columns.items()}


def is_hdf5_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts with the HDF5 signature."""
    with open(path, "rb") as f:
        return f.read(len(HDF5_MAGIC)) == HDF5_MAGIC


def _open(path: pathlib.Path) -> h5py.File:
    if not path.exists():
        raise FileNotFoundError(f"TFF h5 file not found: {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"expected an h5 file, got a directory: {str(path)!r}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(
            f"{str(path)!r} is not a readable HDF5 file (truncated or corrupt?): {exc}"
        ) from exc


def read_h5_columns(
    path: str | os.PathLike[str],
    features: Sequence[str] | None = None,
    empty_clients: str = "error",
) -> ClientColumns:
    """Reads a TFF-layout h5 file into :class:`ClientColumns`.

    Args:
      path: the h5 file.
      features: features to read (default: all features of the first client).
      empty_clients: ``'error'`` (default) or ``'drop'`` for clients with zero examples.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: not HDF5 / truncated / corrupt; no ``examples`` group; a client whose
        features differ from the others' or whose features have different lengths; a client
        with zero examples (unless dropped).
    """
    if empty_clients not in ("error", "drop"):
        raise ValueError(f"empty_clients must be 'error' or 'drop', got {empty_clients!r}")
    path = pathlib.Path(path)
    with _open(path) as f:
        try:
            return _read(f, path, features, empty_clients)
        except (OSError, KeyError, RuntimeError) as exc:
            # h5py raises these when a truncated file's metadata or data cannot be read.
            raise ValueError(
                f"{str(path)!r}: failed reading HDF5 data (truncated or corrupt?): {exc}"
            ) from exc


def _read(
    f: h5py.File, path: pathlib.Path, features: Sequence[str] | None, empty_clients: str
) -> ClientColumns:
    if "examples" not in f or not isinstance(f["examples"], h5py.Group):
        raise ValueError(
            f"{str(path)!r} has no 'examples' group (top-level keys: {sorted(f.keys())}); "
            "expected TFF's layout examples/<client_id>/<feature>"
        )
    examples = f["examples"]
    names = list(examples.keys())
    if not names:
        raise ValueError(f"{str(path)!r}: the 'examples' group holds no clients")

    # Pass 1: metadata only (shapes, dtypes), to size the output arrays.
    schema: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None
    kept: list[tuple[str, int]] = []
    for name in names:
        group = examples[name]
        if not isinstance(group, h5py.Group):
            raise ValueError(f"{str(path)!r}: examples/{name} is not a group of features")
        if schema is None:
            wanted = list(group.keys()) if features is None else list(features)
            if not wanted:
                raise ValueError(f"{str(path)!r}: client {name!r} has no features")
            schema = {}
            for feature in wanted:
                if feature not in group:
                    raise ValueError(
                        f"{str(path)!r}: client {name!r} lacks feature {feature!r} "
                        f"(it has {sorted(group.keys())})"
                    )
                ds = group[feature]
                schema[feature] = (ds.shape[1:], ds.dtype)
        n = _client_length(path, name, group, schema)
        if n == 0:
            if empty_clients == "error":
                raise ValueError(
                    f"{str(path)!r}: client {name!r} has zero examples; pass "
                    "empty_clients='drop' to leave such clients out (in run.py: "
                    "dataset.loader.empty_clients=drop)"
                )
            continue
        kept.append((name, n))

    assert schema is not None
    if not kept:
        raise ValueError(f"{str(path)!r}: every client has zero examples")
    sizes = np.array([n for _, n in kept], dtype=np.int64)
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    total = int(offsets[-1])
    columns = {
        feature: np.empty((total, *shape), dtype=dtype)
        for feature, (shape, dtype) in schema.items()
    }

    # Pass 2: one read_direct per client dataset straight into its rows.
    for i, (name, _) in enumerate(kept):
        group = examples[name]
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        for feature, out in columns.items():
            group[feature].read_direct(out, dest_sel=np.s_[lo:hi])
    return ClientColumns([name.encode("utf-8") for name, _ in kept], offsets, columns)


def _client_length(
    path: pathlib.Path,
    name: str,
    group: h5py.Group,
    schema: Mapping[str, tuple[tuple[int, ...], np.dtype]],
) -> int:
    lengths = {}
    for feature, (shape, dtype) in schema.items():
        if feature not in group:
            raise ValueError(
                f"{str(path)!r}: client {name!r} lacks feature {feature!r} "
                f"(it has {sorted(group.keys())}); every client needs the same features"
            )
        ds = group[feature]
        if not isinstance(ds, h5py.Dataset) or ds.ndim == 0:
            raise ValueError(f"{str(path)!r}: examples/{name}/{feature} is not an array dataset")
        if ds.shape[1:] != shape or ds.dtype != dtype:
            raise ValueError(
                f"{str(path)!r}: client {name!r} feature {feature!r} has per-example shape "
                f"{ds.shape[1:]} and dtype {ds.dtype}, but the first client has {shape} and "
                f"{dtype}"
            )
        lengths[feature] = ds.shape[0]
    if len(set(lengths.values())) > 1:
        raise ValueError(
            f"{str(path)!r}: client {name!r} has features of different lengths {lengths}; "
            "all features of a client must have one entry per example"
        )
    return next(iter(lengths.values()))


def write_h5_columns(
    path: str | os.PathLike[str],
    client_ids: Sequence[bytes | str],
    offsets: np.ndarray,
    columns: Mapping[str, np.ndarray],
    compression: str | None = None,
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Writes columns as a TFF-layout h5 file, atomically (temp file + ``os.replace``).

    Args:
      path: destination.
      client_ids: one id per client (bytes are decoded as UTF-8 for the group names).
      offsets: int array of ``len(client_ids) + 1`` non-decreasing row offsets from 0.
      columns: ``{feature: array}`` with leading dimension ``offsets[-1]``.
      compression: h5py compression for every dataset (e.g. ``'gzip'``), or None.
      attrs: attributes for the file's root (e.g. provenance notes).
      overwrite: replace an existing file (default: FileExistsError).
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.shape != (len(client_ids) + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"offsets must be non-decreasing from 0 with len(client_ids) + 1 = "
            f"{len(client_ids) + 1} entries, got {offsets!r}"
        )
    for name, col in columns.items():
        if len(col) != offsets[-1]:
            raise ValueError(
                f"column {name!r} has {len(col)} rows, but offsets[-1] = {int(offsets[-1])}"
            )
    names = [cid.decode("utf-8") if isinstance(cid, bytes) else str(cid) for cid in client_ids]
    if len(set(names)) != len(names):
        raise ValueError("client ids must be unique")

    with AtomicFile(path, overwrite=overwrite) as atomic, h5py.File(atomic.tmp, "w") as f:
        for key, value in (attrs or {}).items():
            f.attrs[key] = value
        examples = f.create_group("examples")
        for i, name in enumerate(names):
            group = examples.create_group(name)
            lo, hi = int(offsets[i]), int(offsets[i + 1])
            for feature, col in columns.items():
                group.create_dataset(feature, data=col[lo:hi], compression=compression)
