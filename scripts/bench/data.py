"""The benchmark's datasets, held once and handed to both libraries without copies.

Both libraries get the SAME arrays: the examples live in two columns (``x`` float32
(N, 28, 28, 1), ``y`` int32 (N,)) with CSR client offsets. FedJAX receives a dict of per-client
views into them (its ``InMemoryFederatedData`` keeps the mapping as is); fedjax_exp receives the
columns themselves (``InMemoryFederatedData.from_columns``, no copy for sorted ids). Full-size
synthetic data is 2.1 GB of pixels, so holding it once matters.
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any

import numpy as np

# Full federated EMNIST (train split): 3400 writers, 671,585 examples, 62 classes.
EMNIST_CLIENTS = 3400
EMNIST_TRAIN_EXAMPLES = 671_585
NUM_CLASSES = 62

DEFAULT_FEMNIST_DIR = pathlib.Path(__file__).resolve().parents[3] / "shared" / "data" / "femnist"


@dataclass
class Columns:
    """A federated dataset as columns: client ``i`` owns rows ``offsets[i]:offsets[i+1]``."""

    name: str
    client_ids: list[bytes]  # sorted, as both libraries iterate clients in sorted-id order
    offsets: np.ndarray  # int64, len(client_ids) + 1
    x: np.ndarray  # float32 (N, 28, 28, 1), 1 - pixels (ink is 1.0)
    y: np.ndarray  # int32 (N,)

    @property
    def num_examples(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_clients(self) -> int:
        return len(self.client_ids)

    @property
    def nbytes(self) -> int:
        return int(self.x.nbytes + self.y.nbytes)

    def client_dict(self) -> dict[bytes, dict[str, np.ndarray]]:
        """``{client_id: {"x": view, "y": view}}`` (views: no example is copied)."""
        o = self.offsets
        return {
            cid: {"x": self.x[o[i] : o[i + 1]], "y": self.y[o[i] : o[i + 1]]}
            for i, cid in enumerate(self.client_ids)
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "clients": self.num_clients,
            "examples": self.num_examples,
            "array_bytes": self.nbytes,
        }


def load_tff_h5(path: str | os.PathLike[str], name: str | None = None) -> Columns:
    """Reads a TFF-layout h5 file (``examples/<writer>/pixels|label``) into :class:`Columns`.

    Applies FedJAX's EMNIST preprocessing, ``x = 1 - pixels[..., None]`` and ``y = label``,
    writing straight into preallocated columns.
    """
    import h5py

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"FEMNIST h5 file not found: {path}; pass --femnist-dir DIR holding "
            "femnist_leaf_train.h5 and femnist_leaf_test.h5, or --datasets synthetic"
        )
    with h5py.File(path, "r") as f:
        if "examples" not in f:
            raise ValueError(f"{path} has no 'examples' group; expected the TFF h5 layout")
        group = f["examples"]
        names = sorted(group)
        sizes = np.array([group[n]["label"].shape[0] for n in names], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        x = np.empty((int(offsets[-1]), 28, 28, 1), np.float32)
        y = np.empty((int(offsets[-1]),), np.int32)
        for i, n in enumerate(names):
            lo, hi = offsets[i], offsets[i + 1]
            pixels = x[lo:hi, ..., 0]
            group[n]["pixels"].read_direct(pixels)
            np.subtract(np.float32(1), pixels, out=pixels)
            group[n]["label"].read_direct(y[lo:hi])
    return Columns(name or path.stem, [n.encode() for n in names], offsets, x, y)


def synthetic(
    num_clients: int = EMNIST_CLIENTS,
    num_examples: int = EMNIST_TRAIN_EXAMPLES,
    seed: int = 0,
    name: str = "synthetic",
) -> Columns:
    """Deterministic EMNIST-shaped federated data (random pixels and labels).

    Client sizes are log-normal (like EMNIST's writers, mean ~200) scaled to sum exactly to
    ``num_examples``, each client at least one example. Ids look like EMNIST's
    (``<16 hex>:f0000_00``). Same ``seed``, same data.
    """
    if num_clients <= 0 or num_examples < num_clients:
        raise ValueError(
            f"need num_clients > 0 and num_examples >= num_clients, got {num_clients} clients "
            f"and {num_examples} examples"
        )
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(mean=0.0, sigma=0.6, size=num_clients)
    spare = num_examples - num_clients
    sizes = np.floor(weights / weights.sum() * spare).astype(np.int64) + 1
    sizes[: num_examples - int(sizes.sum())] += 1  # Hand out the rounding remainder.
    ids = sorted(
        f"{rng.bytes(8).hex()}:f{i // 100:04d}_{i % 100:02d}".encode() for i in range(num_clients)
    )
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    x = rng.random((num_examples, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=num_examples, dtype=np.int32)
    return Columns(name, ids, offsets, x, y)


def fedjax_federated_data(cols: Columns) -> Any:
    """FedJAX's ``InMemoryFederatedData`` over views of ``cols``."""
    import fedjax

    return fedjax.InMemoryFederatedData(cols.client_dict())


def ours_federated_data(cols: Columns) -> Any:
    """fedjax_exp's column store over ``cols`` (no copy: the ids are sorted)."""
    from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData

    return InMemoryFederatedData.from_columns(
        cols.client_ids, cols.offsets, {"x": cols.x, "y": cols.y}
    )
