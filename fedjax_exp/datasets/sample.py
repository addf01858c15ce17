"""A small real federated EMNIST sample shipped inside the package (no network, no downloads).

Provenance: whole writers from LEAF's FEMNIST sample of NIST Special Database 19 (the files
``femnist_leaf_{train,test}.h5`` of the project's shared data), chosen by
``scripts/make_sample.py`` (seeded draw of writers that have both train and test data,
stratified by NIST source). Every chosen writer keeps all its train and test examples.

Contents (``--writers 40 --seed 0``): 40 writers in both splits, 5,844 train and 669 test
examples, all 62 classes in train (61 in test), both NIST domains. Stored as uint8 pixels in
gzip'd h5 (``data/femnist_sample_{train,test}.h5``, about 1.5 MB together) and restored to the
original float32 values exactly.

Features after :func:`load_data` are those of :func:`fedjax_exp.datasets.emnist.load_data`:
``x`` float32 (N, 28, 28, 1), ``y`` int32 (N,), ``domain_id`` int32 (N,). Accuracies on this
sample are not comparable with published federated EMNIST figures (3,400 writers).
"""

from __future__ import annotations

import pathlib

from fedjax_exp.core.federated_data import FederatedData
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.datasets import emnist, tff_h5

__all__ = ["DATA_DIR", "FILE_NAMES", "load_data", "load_split", "paths"]

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
FILE_NAMES = {"train": "femnist_sample_train.h5", "test": "femnist_sample_test.h5"}


def paths() -> dict[str, pathlib.Path]:
    """Where the sample's files are installed."""
    return {split: DATA_DIR / name for split, name in FILE_NAMES.items()}


def load_split(split: str, preprocess: bool = True) -> FederatedData:
    """One split of the sample as an in-memory column store.

    With ``preprocess=False`` the features are the raw ``pixels`` (float32 (N, 28, 28), 1.0 =
    background) and ``label``, as in the source files.
    """
    if split not in FILE_NAMES:
        raise ValueError(f"split must be one of {tuple(FILE_NAMES)}, got {split!r}")
    path = paths()[split]
    if not path.is_file():
        raise FileNotFoundError(
            f"the embedded sample file {str(path)!r} is missing from the installed package; "
            "reinstall fedjax_exp or rebuild it with scripts/make_sample.py"
        )
    ids, offsets, columns = tff_h5.read_h5_columns(path)
    columns = emnist.emnist_columns(ids, offsets, columns)  # uint8 -> float32 k/255
    if not preprocess:
        del columns["domain_id"]  # Raw means the source files' features only.
        return InMemoryFederatedData.from_columns(ids, offsets, columns)
    fd = InMemoryFederatedData.from_columns(ids, offsets, columns)
    return fd.preprocess_batch(emnist.preprocess_batch)


def load_data(preprocess: bool = True) -> tuple[FederatedData, FederatedData]:
    """(train, test) of the embedded sample, preprocessed like EMNIST (``x``, ``y``,
    ``domain_id``) unless ``preprocess=False``."""
    return load_split("train", preprocess), load_split("test", preprocess)
