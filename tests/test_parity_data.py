"""Parity with FedJAX 0.0.17 on the same data: identical batches, ids, sizes and examples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

fedjax = pytest.importorskip("fedjax")
fedjax_client_datasets = pytest.importorskip("fedjax.core.client_datasets")

import fedjax_exp  # noqa: E402
from fedjax_exp.core import client_datasets as cd  # noqa: E402
from fedjax_exp.core import federated_data as fdm  # noqa: E402

SIZES = [5, 0, 3, 12, 7, 1, 9, 4, 16, 2]


def client_data() -> dict[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    # Ids inserted out of order: both libraries must sort them.
    names = [f"w{i:02d}_{(7 * i) % 10}".encode() for i in range(len(SIZES))][::-1]
    return {
        name: {
            "x": rng.normal(size=(n, 3, 2)).astype(np.float32),
            "y": rng.integers(0, 62, n).astype(np.int32),
        }
        for name, n in zip(names, SIZES, strict=True)
    }


@pytest.fixture(scope="module")
def pair():
    data = client_data()
    return fedjax_exp.InMemoryFederatedData(data), fedjax.InMemoryFederatedData(data)


def assert_same_batches(ours, theirs):
    ours, theirs = list(ours), list(theirs)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert set(a) == set(b)
        for k in a:
            assert a[k].dtype == b[k].dtype, k
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_ids_sizes_and_examples_identical(pair):
    ours, theirs = pair
    assert ours.num_clients() == theirs.num_clients()
    assert list(ours.client_ids()) == list(theirs.client_ids())
    assert list(ours.client_sizes()) == list(theirs.client_sizes())
    for (id_a, ds_a), (id_b, ds_b) in zip(ours.clients(), theirs.clients(), strict=True):
        assert id_a == id_b and len(ds_a) == len(ds_b)
        assert_same_batches([ds_a.all_examples()], [ds_b.all_examples()])
    some = list(theirs.client_ids())[2:6]
    assert list(ours.slice(some[0], some[-1]).client_ids()) == list(
        theirs.slice(some[0], some[-1]).client_ids()
    )


@pytest.mark.parametrize(
    "batch_size,buckets", [(1, 1), (4, 1), (4, 3), (8, 2), (10, 4), (59, 1), (64, 4), (100, 3)]
)
def test_padded_batch_federated_data_identical(pair, batch_size, buckets):
    ours, theirs = pair
    hp = dict(batch_size=batch_size, num_batch_size_buckets=buckets)
    assert_same_batches(
        fedjax_exp.padded_batch_federated_data(ours, **hp),
        fedjax.padded_batch_federated_data(theirs, **hp),
    )


def test_padded_batch_identical_with_preprocessors(pair):
    ours, theirs = pair

    def batch_fn(e):
        return {**e, "y2": e["y"] * 2}

    def client_fn(cid, e):
        return {k: v[: len(cid) % 4] for k, v in e.items()}

    assert_same_batches(
        fedjax_exp.padded_batch_federated_data(ours.preprocess_batch(batch_fn), batch_size=6),
        fedjax.padded_batch_federated_data(theirs.preprocess_batch(batch_fn), batch_size=6),
    )
    assert_same_batches(
        fedjax_exp.padded_batch_federated_data(ours.preprocess_client(client_fn), batch_size=3),
        fedjax.padded_batch_federated_data(theirs.preprocess_client(client_fn), batch_size=3),
    )


def test_padded_batch_identical_when_all_clients_are_empty():
    data = {b"a": {"x": np.zeros((0, 2), np.float32)}, b"b": {"x": np.zeros((0, 2), np.float32)}}
    assert_same_batches(
        fedjax_exp.padded_batch_federated_data(
            fedjax_exp.InMemoryFederatedData(data), batch_size=4
        ),
        fedjax.padded_batch_federated_data(fedjax.InMemoryFederatedData(data), batch_size=4),
    )


def client_pair():
    data = client_data()
    name = next(k for k, v in data.items() if len(v["y"]) == 16)
    return cd.ClientDataset(data[name]), fedjax.ClientDataset(data[name])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_size=3),
        dict(batch_size=5, drop_remainder=True),
        dict(batch_size=16),
        dict(batch_size=40),
    ],
)
def test_client_dataset_batch_identical(kwargs):
    ours, theirs = client_pair()
    assert_same_batches(ours.batch(**kwargs), theirs.batch(**kwargs))


@pytest.mark.parametrize("bs,buckets", [(3, 1), (5, 3), (16, 2), (40, 4), (7, 10)])
def test_client_dataset_padded_batch_identical(bs, buckets):
    ours, theirs = client_pair()
    kw = dict(batch_size=bs, num_batch_size_buckets=buckets)
    assert_same_batches(ours.padded_batch(**kw), theirs.padded_batch(**kw))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(batch_size=3, seed=0),
        dict(batch_size=5, num_epochs=3, seed=11),
        dict(batch_size=5, num_epochs=3, drop_remainder=True, seed=2),
        dict(batch_size=40, num_epochs=4, seed=3),
        dict(batch_size=4, num_epochs=None, num_steps=13, seed=4),
        dict(batch_size=6, num_epochs=2, skip_shuffle=True),
    ],
)
def test_client_dataset_shuffle_repeat_batch_identical(kwargs):
    ours, theirs = client_pair()
    assert_same_batches(ours.shuffle_repeat_batch(**kwargs), theirs.shuffle_repeat_batch(**kwargs))


def test_buffered_shuffle_batching_identical():
    data = client_data()
    ours = [cd.ClientDataset(data[k]) for k in sorted(data)]
    theirs = [fedjax.ClientDataset(data[k]) for k in sorted(data)]
    assert_same_batches(
        cd.buffered_shuffle_batch_client_datasets(ours, 4, 7, np.random.RandomState(5)),
        fedjax_client_datasets.buffered_shuffle_batch_client_datasets(
            theirs, 4, 7, np.random.RandomState(5)
        ),
    )


def test_buffered_shuffle_keeps_ragged_and_bytes_features_as_fedjax():
    # Object arrays of ragged sequences and fixed-width bytes (as in text datasets) batch
    # with their dtypes intact, example for example as FedJAX.
    tokens = np.empty(5, dtype=object)
    tokens[:] = [np.arange(n) for n in (2, 3, 1, 4, 2)]
    data = {"tokens": tokens, "word": np.array([b"ab", b"cde", b"f", b"ghij", b"k"], "S5")}
    ours = [cd.ClientDataset(dict(data)), cd.ClientDataset({k: v[:3] for k, v in data.items()})]
    theirs = [
        fedjax.ClientDataset(dict(data)),
        fedjax.ClientDataset({k: v[:3] for k, v in data.items()}),
    ]
    a = list(cd.buffered_shuffle_batch_client_datasets(ours, 3, 4, np.random.RandomState(1)))
    b = list(
        fedjax_client_datasets.buffered_shuffle_batch_client_datasets(
            theirs, 3, 4, np.random.RandomState(1)
        )
    )
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert x["word"].dtype == y["word"].dtype == np.dtype("S5")
        np.testing.assert_array_equal(x["word"], y["word"])
        assert x["tokens"].dtype == y["tokens"].dtype == object
        assert [list(t) for t in x["tokens"]] == [list(t) for t in y["tokens"]]


def test_client_sizes_count_after_the_client_preprocessor(pair):
    ours, theirs = pair

    def keep_two(client_id, examples):
        return {k: v[:2] for k, v in examples.items()}

    ours, theirs = ours.preprocess_client(keep_two), theirs.preprocess_client(keep_two)
    assert list(ours.client_sizes()) == list(theirs.client_sizes())
    assert all(size <= 2 for _, size in ours.client_sizes())
    some = next(iter(theirs.client_ids()))
    assert ours.client_size(some) == theirs.client_size(some)


def test_shuffled_clients_identical(pair):
    ours, theirs = pair
    a = [cid for cid, _ in itertools.islice(ours.shuffled_clients(4, seed=9), 25)]
    b = [cid for cid, _ in itertools.islice(theirs.shuffled_clients(4, seed=9), 25)]
    assert a == b


def test_generic_shuffle_repeat_batch_identical(pair):
    """Behind the generic path (here a subset view) the stream is FedJAX's, batch for batch."""
    ours, theirs = pair
    ids = list(theirs.client_ids())
    a = fdm.shuffle_repeat_batch_federated_data(
        fdm.SubsetFederatedData(ours, ids), 4, 3, 10, seed=8
    )
    b = fedjax.shuffle_repeat_batch_federated_data(
        fedjax.SubsetFederatedData(theirs, ids), 4, 3, 10, seed=8
    )
    assert_same_batches(itertools.islice(a, 40), itertools.islice(b, 40))


@pytest.mark.shared_data
def test_real_femnist_padded_batches_identical(shared_femnist_dir):
    h5py = pytest.importorskip("h5py")
    data = {}
    with h5py.File(shared_femnist_dir / "femnist_leaf_train.h5", "r") as f:
        for name in sorted(f["examples"])[:25]:
            group = f["examples"][name]
            data[name.encode()] = {
                "x": 1 - group["pixels"][()][..., None],
                "y": group["label"][()],
            }
    ours, theirs = fedjax_exp.InMemoryFederatedData(data), fedjax.InMemoryFederatedData(data)
    assert list(ours.client_sizes()) == list(theirs.client_sizes())
    for bs in (8, 128):
        assert_same_batches(
            fedjax_exp.padded_batch_federated_data(ours, batch_size=bs, num_batch_size_buckets=3),
            fedjax.padded_batch_federated_data(theirs, batch_size=bs, num_batch_size_buckets=3),
        )
