"""Federated EMNIST (``fedjax.datasets.emnist``): FedJAX's SQLite cache or TFF's h5 files.

Features after preprocessing (identical to FedJAX 0.0.17's ``emnist.load_data``):

- ``x``: float32 (N, 28, 28, 1), ``1 - pixels`` (ink 1.0, background 0.0);
- ``y``: int32 (N,), the label (0-9 digits, 10-35 'A'-'Z', 36-61 'a'-'z');
- ``domain_id``: int32 (N,), 0 for NIST's high-school writers, 1 for Census staff
  (see :func:`domain_id`).

Files are looked up in ``cache_dir`` (default ``~/.cache/fedjax``, FedJAX's), in either format:

- FedJAX SQLite: ``federated_emnist_{train,test}.sqlite``
  (``federated_emnist_digitsonly_{train,test}.sqlite`` for digits only);
- TFF h5: ``fed_emnist_{train,test}.h5`` (``fed_emnist_digitsonly_{train,test}.h5``).

Missing SQLite files are downloaded from FedJAX's bucket (see :mod:`.downloads` for the
atomicity, locking and checksum guarantees). Without network access, loading fails with one
error naming the missing files, their URLs and the ``cache_dir`` option.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from fedjax_exp.core.client_datasets import Examples
from fedjax_exp.core.federated_data import FederatedData
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.core.sqlite_federated_data import SQLiteFederatedData, load_sqlite_columns
from fedjax_exp.core.typing import ClientId
from fedjax_exp.datasets import downloads, tff_h5

__all__ = [
    "BASE_URL",
    "SPLITS",
    "DatasetNotAvailableError",
    "cite",
    "domain_id",
    "emnist_columns",
    "find_files",
    "load_data",
    "load_split",
    "preprocess_batch",
    "preprocess_client",
    "preprocess_split",
]

SPLITS = ("train", "test")
BASE_URL = "https://storage.googleapis.com/gresearch/fedjax/emnist"
MODES = ("auto", "sqlite", "h5")


class DatasetNotAvailableError(FileNotFoundError):
    """Dataset files are neither in the cache nor downloadable (e.g. offline)."""


def cite() -> str:
    """BibTeX for EMNIST (Cohen et al., IJCNN 2017)."""
    return (
        "@inproceedings{cohen2017emnist,\n"
        "  title={EMNIST: Extending MNIST to handwritten letters},\n"
        "  author={Cohen, Gregory and Afshar, Saeed and Tapson, Jonathan and"
        " Van Schaik, Andre},\n"
        "  booktitle={2017 International Joint Conference on Neural Networks (IJCNN)},\n"
        "  pages={2921--2926},\n"
        "  year={2017},\n"
        "  organization={IEEE}\n"
        "}"
    )


# --------------------------------------------------------------------------------------------
# Preprocessing (FedJAX semantics)
# --------------------------------------------------------------------------------------------


def domain_id(client_id: ClientId) -> int:
    """NIST source of a writer: 0 (Bethesda high school, writers 2100-2599) or 1 (Census).

    Accepts FedJAX ids ``<16 hex>:f<4 digits>_<2 digits>`` (25 bytes) and TFF/LEAF ids
    ``f<4 digits>_<2 digits>`` (8 bytes); anything else is a ValueError.
    """
    if len(client_id) == 25:
        writer = client_id[18:22]
    elif len(client_id) == 8:
        writer = client_id[1:5]
    else:
        raise ValueError(
            f"invalid EMNIST client id {client_id!r}: expected '<16 hex>:fNNNN_NN' or 'fNNNN_NN'"
        )
    try:
        number = int(writer)
    except ValueError:
        raise ValueError(f"invalid EMNIST client id {client_id!r}: no writer number") from None
    return 0 if 2100 <= number <= 2599 else 1


def preprocess_client(client_id: ClientId, examples: Examples) -> Examples:
    """Adds ``domain_id`` (same dtype as ``label``) to a client's raw examples."""
    return {**examples, "domain_id": np.full_like(examples["label"], domain_id(client_id))}


def preprocess_batch(examples: Examples) -> Examples:
    """Raw batch (``pixels``, ``label``, ``domain_id``) -> model batch (``x``, ``y``,
    ``domain_id``). Other keys (such as the padding mask) are dropped, as in FedJAX; the
    batching code re-attaches the mask after preprocessing."""
    return {
        "x": 1 - examples["pixels"][..., np.newaxis],
        "y": examples["label"],
        "domain_id": examples["domain_id"],
    }


def preprocess_split(fd: FederatedData) -> FederatedData:
    """Applies EMNIST preprocessing to an unprocessed split, choosing the fast form.

    For an in-memory column store without a client preprocessor, ``domain_id`` is added as a
    column (vectorized, so column batching stays available); otherwise the per-client
    preprocessor is attached, as FedJAX does. Both give identical examples.
    """
    if isinstance(fd, InMemoryFederatedData) and fd.supports_column_batching:
        ids = list(fd.client_ids())
        columns = emnist_columns(ids, fd.offsets, fd.columns)
        return InMemoryFederatedData.from_columns(
            ids,
            fd.offsets,
            columns,
            preprocess_batch=fd.batch_preprocessor.append(preprocess_batch),
        )
    return fd.preprocess_client(preprocess_client).preprocess_batch(preprocess_batch)


def emnist_columns(
    client_ids: Sequence[ClientId], offsets: np.ndarray, columns: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Raw EMNIST columns (``pixels``, ``label``) plus a ``domain_id`` column.

    ``uint8`` pixels (the embedded sample's compact storage) become float32 ``k / 255``, which
    reproduces the original float32 values exactly.
    """
    missing = {"pixels", "label"} - set(columns)
    if missing:
        raise ValueError(
            f"EMNIST preprocessing needs features 'pixels' and 'label'; missing {sorted(missing)}"
            f" (found {sorted(columns)})"
        )
    out = dict(columns)
    if out["pixels"].dtype == np.uint8:
        out["pixels"] = out["pixels"].astype(np.float32) / np.float32(255)
    sizes = np.diff(np.asarray(offsets, dtype=np.int64))
    domains = np.array([domain_id(cid) for cid in client_ids], dtype=out["label"].dtype)
    out["domain_id"] = np.repeat(domains, sizes)
    return out


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _sqlite_name(split: str, only_digits: bool) -> str:
    return f"federated_emnist_{'digitsonly_' if only_digits else ''}{split}.sqlite"


def _h5_name(split: str, only_digits: bool) -> str:
    return f"fed_emnist_{'digitsonly_' if only_digits else ''}{split}.h5"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def find_files(
    split: str,
    only_digits: bool = False,
    mode: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
) -> pathlib.Path | None:
    """The cached file for a split, or None. ``auto`` prefers SQLite over h5."""
    _check_split(split)
    _check_mode(mode)
    cache = pathlib.Path(cache_dir) if cache_dir is not None else downloads.default_cache_dir()
    candidates = []
    if mode in ("auto", "sqlite"):
        candidates.append(cache / _sqlite_name(split, only_digits))
    if mode in ("auto", "h5"):
        candidates.append(cache / _h5_name(split, only_digits))
    return next((p for p in candidates if p.is_file()), None)


def _resolve(
    splits: Sequence[str],
    only_digits: bool,
    mode: str,
    cache_dir: str | os.PathLike[str] | None,
    download: bool,
    base_url: str,
    sha256: Mapping[str, str] | None,
) -> dict[str, pathlib.Path]:
    """Finds or downloads every split's file; one error listing all that cannot be had."""
    cache = pathlib.Path(cache_dir) if cache_dir is not None else downloads.default_cache_dir()
    found = {s: find_files(s, only_digits, mode, cache) for s in splits}
    missing = [s for s in splits if found[s] is None]
    reason = "downloading is disabled (download=False)"
    if missing and mode == "h5":
        reason = "TFF h5 files are not downloaded automatically"
    elif missing and download:
        try:
            for split in missing:
                name = _sqlite_name(split, only_digits)
                found[split] = downloads.maybe_download(
                    f"{base_url}/{name}", cache, sha256=(sha256 or {}).get(name)
                )
            missing = []
        except downloads.ChecksumError:
            raise  # Bad bytes are not "unavailable": report the mismatch itself.
        except downloads.DownloadError as exc:
            reason = f"the download failed ({exc})"
    if missing:
        names = [_sqlite_name(s, only_digits) for s in missing]
        h5_names = [_h5_name(s, only_digits) for s in missing]
        urls = [f"{base_url}/{n}" for n in names]
        raise DatasetNotAvailableError(
            f"Federated EMNIST files not found in cache_dir {str(cache)!r}: "
            f"{', '.join(names)} (FedJAX SQLite) or {', '.join(h5_names)} (TFF h5); {reason}. "
            f"Download {' and '.join(urls)} into that directory, or pass cache_dir= (in the "
            "experiment config: dataset.loader.cache_dir=...) pointing to a directory that holds "
            "them."
        )
    return {s: p for s, p in found.items() if p is not None}


def _open(path: pathlib.Path, in_memory: bool) -> FederatedData:
    """Unprocessed federated data from an SQLite or h5 file (detected by magic bytes)."""
    if tff_h5.is_hdf5_file(path):
        return InMemoryFederatedData.from_columns(*tff_h5.read_h5_columns(path))
    if in_memory:
        return InMemoryFederatedData.from_columns(*load_sqlite_columns(path))
    return SQLiteFederatedData.new(path)


def load_split(
    split: str,
    only_digits: bool = False,
    mode: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    in_memory: bool = False,
    download: bool = True,
    base_url: str = BASE_URL,
    sha256: Mapping[str, str] | None = None,
) -> FederatedData:
    """Loads one unprocessed split (features ``pixels`` float32 (N,28,28), ``label`` int32).

    Args:
      split: ``'train'`` or ``'test'``.
      only_digits: the 10-class digits-only variant.
      mode: ``'auto'`` (SQLite or h5, whichever is cached; SQLite is downloaded when neither
        is), ``'sqlite'`` (FedJAX's files only) or ``'h5'`` (TFF's files only; not
        downloaded).
      cache_dir: where the files are (default ``~/.cache/fedjax``).
      in_memory: load SQLite into the in-memory column store (fast batching, ~2.1 GB for
        the full train split) instead of reading it lazily. h5 is always loaded in memory.
      download: allow downloading missing SQLite files.
      base_url: where to download from (FedJAX's bucket by default).
      sha256: expected digests by file name (see :mod:`.downloads`).
    """
    _check_split(split)
    _check_mode(mode)
    paths = _resolve([split], only_digits, mode, cache_dir, download, base_url, sha256)
    return _open(paths[split], in_memory)


def load_data(
    only_digits: bool = False,
    mode: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    in_memory: bool = False,
    download: bool = True,
    base_url: str = BASE_URL,
    sha256: Mapping[str, str] | None = None,
) -> tuple[FederatedData, FederatedData]:
    """Loads preprocessed (train, test) splits with features ``x``, ``y``, ``domain_id``.

    Arguments as in :func:`load_split`. FedJAX's ``mode='sqlite'`` still works.
    """
    _check_mode(mode)
    paths = _resolve(SPLITS, only_digits, mode, cache_dir, download, base_url, sha256)
    train = preprocess_split(_open(paths["train"], in_memory))
    test = preprocess_split(_open(paths["test"], in_memory))
    return train, test
