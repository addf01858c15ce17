"""ClientDataset batching: sizes, masks, padding buckets, shuffling, multi-client batching."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fedjax_exp.core import client_datasets as cd
from fedjax_exp.core.client_datasets import (
    EXAMPLE_MASK_KEY,
    BatchHParams,
    BatchPreprocessor,
    ClientDataset,
    PaddedBatchHParams,
    ShuffleRepeatBatchHParams,
)


def make_dataset(n: int, offset: int = 0, preprocessor=cd.NoOpBatchPreprocessor) -> ClientDataset:
    ids = np.arange(offset, offset + n)
    return ClientDataset({"x": ids.reshape(n, 1) * 10, "id": ids}, preprocessor)


def test_mask_key_is_the_shared_constant():
    from fedjax_exp.core import typing

    assert EXAMPLE_MASK_KEY == typing.EXAMPLE_MASK_KEY == "__mask__"


def test_len_slice_and_all_examples():
    ds = make_dataset(10, preprocessor=BatchPreprocessor([lambda e: {**e, "z": e["id"] + 1}]))
    assert len(ds) == 10
    sub = ds[2:5]
    assert len(sub) == 3
    out = sub.all_examples()
    np.testing.assert_array_equal(out["id"], [2, 3, 4])
    np.testing.assert_array_equal(out["z"], [3, 4, 5])
    with pytest.raises(ValueError, match="only slicing"):
        ds[3]


@pytest.mark.parametrize(
    "data_size,batch_size,buckets,expected",
    [
        (10, 4, 1, 4),
        (10, 4, 2, 2),  # remainder 2: candidates 4, 2
        (11, 8, 3, 4),  # remainder 3: candidates 8, 4, 2 -> 4
        (9, 8, 3, 2),  # remainder 1: 8, 4, 2 (only 3 buckets) -> 2
        (9, 8, 10, 1),  # remainder 1: halving goes down to 1
        (16, 8, 3, 8),  # no remainder
        (5, 100, 3, 25),  # 100, 50, 25
    ],
)
def test_pick_final_batch_size(data_size, batch_size, buckets, expected):
    assert cd.pick_final_batch_size(data_size, batch_size, buckets) == expected


def test_padded_batch_sizes_masks_and_zero_padding():
    ds = make_dataset(11)
    batches = list(ds.padded_batch(batch_size=8, num_batch_size_buckets=3))
    assert [len(b["id"]) for b in batches] == [8, 4]
    np.testing.assert_array_equal(batches[0][EXAMPLE_MASK_KEY], [True] * 8)
    np.testing.assert_array_equal(batches[1][EXAMPLE_MASK_KEY], [True, True, True, False])
    np.testing.assert_array_equal(batches[1]["id"], [8, 9, 10, 0])
    np.testing.assert_array_equal(batches[1]["x"], [[80], [90], [100], [0]])
    assert batches[1]["x"].dtype == ds.raw_examples["x"].dtype
    # Re-iterable and identical.
    again = list(ds.padded_batch(PaddedBatchHParams(8, 3)))
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["id"], b["id"])


def test_padded_batch_runs_preprocessor_before_padding():
    pre = BatchPreprocessor([lambda e: {**e, "id": e["id"] * 2}])
    batches = list(make_dataset(3, preprocessor=pre).padded_batch(batch_size=2))
    np.testing.assert_array_equal(batches[1]["id"], [4, 0])


def test_batch_and_drop_remainder():
    ds = make_dataset(7)
    assert [list(b["id"]) for b in ds.batch(batch_size=3)] == [[0, 1, 2], [3, 4, 5], [6]]
    hp = BatchHParams(batch_size=3)
    assert [len(b["id"]) for b in ds.batch(hp, drop_remainder=True)] == [3, 3]


@pytest.mark.parametrize("bad", [0, -1, 2.5, None, True])
def test_bad_batch_size(bad):
    ds = make_dataset(3)
    for method in (ds.batch, ds.padded_batch, ds.shuffle_repeat_batch):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            method(batch_size=bad)


def test_shuffle_repeat_batch_covers_each_epoch_and_is_deterministic():
    ds = make_dataset(10)
    batches = [b["id"] for b in ds.shuffle_repeat_batch(batch_size=4, num_epochs=3, seed=7)]
    assert len(batches) == 8  # ceil(30 / 4)
    assert all(len(b) == 4 for b in batches)
    stream = np.concatenate(batches)
    for epoch in range(3):
        assert sorted(stream[epoch * 10 : (epoch + 1) * 10]) == list(range(10))
    again = [b["id"] for b in ds.shuffle_repeat_batch(batch_size=4, num_epochs=3, seed=7)]
    np.testing.assert_array_equal(np.concatenate(again), stream)
    other = np.concatenate([b["id"] for b in ds.shuffle_repeat_batch(batch_size=4, seed=8)])
    assert not np.array_equal(other, stream[: len(other)])


@pytest.mark.parametrize(
    "kwargs,expected_steps",
    [
        ({"num_epochs": 3}, 8),
        ({"num_epochs": 3, "drop_remainder": True}, 7),
        ({"num_epochs": None, "num_steps": 5}, 5),
        ({"num_epochs": 3, "num_steps": 5}, 5),
        ({"num_epochs": 1, "num_steps": 50}, 3),
    ],
)
def test_shuffle_repeat_batch_step_counts(kwargs, expected_steps):
    ds = make_dataset(10)
    hp = ShuffleRepeatBatchHParams(batch_size=4, seed=0)
    assert len(list(ds.shuffle_repeat_batch(hp, **kwargs))) == expected_steps


def test_shuffle_repeat_batch_unbounded_and_skip_shuffle():
    ds = make_dataset(3)
    it = iter(ds.shuffle_repeat_batch(batch_size=2, num_epochs=None, skip_shuffle=True))
    got = [list(next(it)["id"]) for _ in range(4)]
    assert got == [[0, 1], [2, 0], [1, 2], [0, 1]]


def test_shuffle_repeat_batch_empty_dataset():
    empty = make_dataset(0)
    # Epoch-bounded: zero batches, as in FedJAX. Unbounded: an error (FedJAX would hang).
    assert list(empty.shuffle_repeat_batch(batch_size=2, num_epochs=3)) == []
    with pytest.raises(ValueError, match="needs at least one example"):
        empty.shuffle_repeat_batch(batch_size=2, num_epochs=None)
    with pytest.raises(ValueError, match="needs at least one example"):
        empty.shuffle_repeat_batch(batch_size=2, num_epochs=None, num_steps=4)


def test_inconsistent_rows_and_mask_key_conflicts():
    with pytest.raises(ValueError, match="has 3 rows but feature 'y' has 2"):
        ClientDataset({"x": np.zeros(3), "y": np.zeros(2)})
    with pytest.raises(ValueError, match="at least one feature"):
        ClientDataset({})
    clash = ClientDataset({"x": np.zeros(3), EXAMPLE_MASK_KEY: np.ones(3, bool)})
    with pytest.raises(ValueError, match="reserved for padding masks"):
        list(clash.padded_batch(batch_size=2))


def test_batch_preprocessor_chain_is_immutable():
    base = BatchPreprocessor([lambda e: {**e, "a": e["x"] + 1}])
    longer = base.append(lambda e: {**e, "b": e["a"] * 2})
    out = longer({"x": np.array([1, 2])})
    np.testing.assert_array_equal(out["b"], [4, 6])
    assert "b" not in base({"x": np.array([1, 2])})
    with pytest.raises(ValueError, match="one row per example"):
        BatchPreprocessor([lambda e: {**e, "bad": np.zeros(5)}])({"x": np.zeros(2)})


def test_padded_batch_client_datasets_spans_clients_and_pads_only_the_end():
    datasets = [make_dataset(3, 0), make_dataset(0, 3), make_dataset(6, 3), make_dataset(2, 9)]
    batches = list(
        cd.padded_batch_client_datasets(datasets, batch_size=4, num_batch_size_buckets=2)
    )
    assert [list(b["id"]) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0]]
    np.testing.assert_array_equal(batches[-1][EXAMPLE_MASK_KEY], [True, True, True, False])
    batches = list(
        cd.padded_batch_client_datasets(datasets, batch_size=8, num_batch_size_buckets=2)
    )
    assert [len(b["id"]) for b in batches] == [8, 4]


def test_multi_client_batching_rejects_mixed_preprocessors_and_features():
    a = make_dataset(3)
    b = make_dataset(3, preprocessor=BatchPreprocessor())
    with pytest.raises(ValueError, match="share one BatchPreprocessor"):
        list(cd.padded_batch_client_datasets([a, b], batch_size=2))
    c = ClientDataset({"x": np.zeros((3, 1))})
    with pytest.raises(ValueError, match="same features"):
        list(cd.padded_batch_client_datasets([a, c], batch_size=2))


def test_buffered_shuffle_is_a_deterministic_permutation():
    out1 = list(cd.buffered_shuffle(range(50), 8, np.random.RandomState(3)))
    out2 = list(cd.buffered_shuffle(range(50), 8, np.random.RandomState(3)))
    assert out1 == out2
    assert sorted(out1) == list(range(50))
    assert out1 != list(range(50))
    with pytest.raises(ValueError, match="buffer_size"):
        list(cd.buffered_shuffle(range(3), 0, np.random.RandomState(0)))


def test_buffered_shuffle_batch_client_datasets_covers_all_examples():
    datasets = [make_dataset(5, 0), make_dataset(7, 5), make_dataset(4, 12)]
    rng = np.random.RandomState(0)
    batches = list(cd.buffered_shuffle_batch_client_datasets(datasets, 3, 6, rng))
    assert [len(b["id"]) for b in batches] == [3, 3, 3, 3, 3, 1]
    ids = np.concatenate([b["id"] for b in batches])
    assert sorted(ids) == list(range(16))
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches])[:, 0], ids * 10)
    first = next(
        cd.buffered_shuffle_batch_client_datasets(
            itertools.chain(datasets), 3, 6, np.random.RandomState(0)
        )
    )
    np.testing.assert_array_equal(first["id"], batches[0]["id"])
