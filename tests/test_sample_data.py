"""The embedded FEMNIST sample: loads offline with EMNIST's features, and is an exact subset
of the shared FEMNIST files (whole writers, original pixel values)."""

from __future__ import annotations

import importlib.util
import sys

import h5py
import numpy as np
import pytest

from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.datasets import emnist, sample, tff_h5


def _load_make_sample(repo_root):
    spec = importlib.util.spec_from_file_location(
        "make_sample", repo_root / "scripts" / "make_sample.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_sample"] = module
    spec.loader.exec_module(module)
    return module


def test_files_are_shipped_and_small():
    sizes = {split: p.stat().st_size for split, p in sample.paths().items()}
    assert set(sizes) == {"train", "test"}
    assert 200_000 < sum(sizes.values()) < 3_000_000


def test_load_data_features_and_counts():
    train, test = sample.load_data()
    assert isinstance(train, InMemoryFederatedData)
    with h5py.File(sample.paths()["train"], "r") as f:
        stored_writers = f.attrs["writers"]
        stored_examples = f.attrs["examples"]
    assert train.num_clients() == stored_writers == 40
    assert train.num_examples == stored_examples
    assert list(train.client_ids()) == list(test.client_ids())  # whole writers in both splits
    assert sum(n for _, n in train.client_sizes()) == train.num_examples
    labels = []
    for cid, ds in train.clients():
        ex = ds.all_examples()
        assert sorted(ex) == ["domain_id", "x", "y"]
        assert ex["x"].dtype == np.float32 and ex["x"].shape == (len(ds), 28, 28, 1)
        assert ex["y"].dtype == np.int32 and ex["domain_id"].dtype == np.int32
        assert ex["x"].min() >= 0.0 and ex["x"].max() <= 1.0
        np.testing.assert_array_equal(ex["domain_id"], emnist.domain_id(cid))
        labels.append(ex["y"])
    assert np.unique(np.concatenate(labels)).size == 62
    assert {emnist.domain_id(c) for c in train.client_ids()} == {0, 1}


def test_preprocessed_equals_raw_through_emnist_preprocessing():
    raw = sample.load_split("test", preprocess=False)
    pre = sample.load_split("test")
    cid = next(raw.client_ids())
    r = raw.get_client(cid).all_examples()
    assert sorted(r) == ["label", "pixels"] and r["pixels"].dtype == np.float32
    expected = emnist.preprocess_batch(emnist.preprocess_client(cid, r))
    got = pre.get_client(cid).all_examples()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_padded_batches_have_masks():
    train, _ = sample.load_data()
    cid, ds = next(train.clients())
    batches = list(ds.padded_batch(batch_size=64))
    assert sum(int(b["__mask__"].sum()) for b in batches) == len(ds)


def test_bad_split():
    with pytest.raises(ValueError, match="split must be one of"):
        sample.load_split("valid")


@pytest.mark.shared_data
def test_sample_is_exact_subset_of_shared_femnist(shared_femnist_dir):
    raw_train = sample.load_split("train", preprocess=False)
    raw_test = sample.load_split("test", preprocess=False)
    for split, fd in (("train", raw_train), ("test", raw_test)):
        with h5py.File(shared_femnist_dir / f"femnist_leaf_{split}.h5", "r") as f:
            for cid, ds in fd.clients():
                group = f["examples"][cid.decode()]
                ex = ds.all_examples()
                # Whole writer, bit-identical pixels (uint8 storage round-trips exactly).
                np.testing.assert_array_equal(ex["pixels"], group["pixels"][()])
                np.testing.assert_array_equal(ex["label"], group["label"][()])


@pytest.mark.shared_data
def test_make_sample_is_deterministic(shared_femnist_dir, repo_root):
    make_sample = _load_make_sample(repo_root)
    train = tff_h5.read_h5_columns(shared_femnist_dir / "femnist_leaf_train.h5", ["label"])
    test = tff_h5.read_h5_columns(shared_femnist_dir / "femnist_leaf_test.h5", ["label"])
    chosen = make_sample.choose_writers(train, test, 40, seed=0)
    assert chosen == list(sample.load_split("train", preprocess=False).client_ids())
    assert make_sample.choose_writers(train, test, 40, seed=1) != chosen


def test_to_uint8_round_trip_and_refusal(repo_root):
    make_sample = _load_make_sample(repo_root)
    values = (np.arange(256) / 255).astype(np.float32)
    k = make_sample.to_uint8(values)
    np.testing.assert_array_equal(k, np.arange(256))
    with pytest.raises(ValueError, match="not exactly float32 k/255"):
        make_sample.to_uint8(np.array([0.5001], np.float32))
