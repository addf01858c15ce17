"""Load any federated dataset file: TFF h5 or FedJAX SQLite, detected by its first bytes.

The experiment layer's dataset config points at a train file and a test file; this module
turns them into :class:`~fedjax_exp.core.federated_data.FederatedData`, optionally with
EMNIST's preprocessing (``x``, ``y``, ``domain_id``).
"""

from __future__ import annotations

import os
import pathlib

from fedjax_exp.core.federated_data import FederatedData
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.core.sqlite_federated_data import (
    SQLITE_MAGIC,
    SQLiteFederatedData,
    load_sqlite_columns,
)
from fedjax_exp.datasets import emnist, tff_h5

__all__ = ["detect_format", "load_federated_file", "load_federated_files"]

PREPROCESS = ("auto", "emnist", "none")


def detect_format(path: str | os.PathLike[str]) -> str:
    """``'h5'`` or ``'sqlite'`` from the file's magic bytes; errors for anything else."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"federated data file not found: {str(path)!r}")
    if not path.is_file():
        raise ValueError(f"expected a file, got a directory: {str(path)!r}")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(tff_h5.HDF5_MAGIC):
        return "h5"
    if head == SQLITE_MAGIC:
        return "sqlite"
    raise ValueError(
        f"{str(path)!r} is neither an HDF5 (TFF h5) nor an SQLite (FedJAX) file "
        f"(first bytes {head!r}); is it truncated, compressed or of another format?"
    )


def load_federated_file(
    path: str | os.PathLike[str],
    preprocess: str = "auto",
    in_memory: bool = True,
    empty_clients: str = "error",
) -> FederatedData:
    """Loads one federated dataset file.

    Args:
      path: a TFF-layout h5 file or a FedJAX SQLite file.
      preprocess: ``'emnist'`` applies EMNIST preprocessing (needs ``pixels`` and ``label``
        and EMNIST-style client ids); ``'none'`` returns raw features; ``'auto'`` (default)
        applies EMNIST preprocessing exactly when the features are ``pixels`` and ``label``.
      in_memory: for SQLite, load into the column store (default) instead of reading lazily.
        h5 files are always loaded into memory.
      empty_clients: ``'error'`` or ``'drop'`` for clients with zero examples (in-memory
        loads).

    Raises:
      FileNotFoundError / ValueError: missing, truncated, corrupt or wrongly laid-out file.
    """
    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    if detect_format(path) == "h5":
        store = tff_h5.read_h5_columns(path, empty_clients=empty_clients)
        fd: FederatedData = InMemoryFederatedData.from_columns(*store)
    elif in_memory:
        fd = InMemoryFederatedData.from_columns(
            *load_sqlite_columns(path, empty_clients=empty_clients)
        )
    else:
        fd = SQLiteFederatedData.new(path)
    if _wants_emnist(preprocess, fd):
        return emnist.preprocess_split(fd)
    return fd


def _wants_emnist(preprocess: str, fd: FederatedData) -> bool:
    if preprocess == "auto":
        first = next(fd.clients(), None)  # Features are the same for every client.
        return first is not None and set(first[1].raw_examples) == {"pixels", "label"}
    return preprocess == "emnist"


def load_federated_files(
    train_path: str | os.PathLike[str],
    test_path: str | os.PathLike[str],
    preprocess: str = "auto",
    in_memory: bool = True,
    empty_clients: str = "error",
) -> tuple[FederatedData, FederatedData]:
    """(train, test) from two files; see :func:`load_federated_file`."""
    return (
        load_federated_file(train_path, preprocess, in_memory, empty_clients),
        load_federated_file(test_path, preprocess, in_memory, empty_clients),
    )
