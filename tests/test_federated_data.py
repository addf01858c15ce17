"""FederatedData, the column store, padded batching and the shuffled index stream."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fedjax_exp
from fedjax_exp.core import federated_data as fdm
from fedjax_exp.core import in_memory_federated_data as imfd
from fedjax_exp.core.client_datasets import EXAMPLE_MASK_KEY
from fedjax_exp.core.in_memory_federated_data import (
    InMemoryFederatedData,
    shuffle_repeat_batch_indices,
    shuffled_epoch_order,
)

SIZES = [5, 0, 3, 12, 7, 1, 9, 4]  # 41 examples; client c1 is empty.


def client_data(sizes=SIZES) -> dict[bytes, dict[str, np.ndarray]]:
    """Client i's example j has id = global row number, x = (id, -id)."""
    data, row = {}, 0
    for i, n in enumerate(sizes):
        ids = np.arange(row, row + n, dtype=np.int64)
        data[f"c{i}".encode()] = {"id": ids, "x": np.stack([ids, -ids], 1).astype(np.float32)}
        row += n
    return data


@pytest.fixture
def fd() -> InMemoryFederatedData:
    return InMemoryFederatedData(client_data())


def generic(fd: InMemoryFederatedData) -> fdm.FederatedData:
    """The same data behind the generic (client-by-client) code paths."""
    return fdm.SubsetFederatedData(fd, list(fd.client_ids()))


def test_public_namespace_exposes_the_names():
    assert fedjax_exp.InMemoryFederatedData is InMemoryFederatedData
    assert fedjax_exp.FederatedData is fdm.FederatedData
    assert fedjax_exp.EXAMPLE_MASK_KEY == "__mask__"


def test_mapping_constructor_ids_sizes_and_examples(fd):
    assert fd.num_clients() == 8
    assert list(fd.client_ids()) == [f"c{i}".encode() for i in range(8)]
    assert list(fd.client_sizes()) == [(f"c{i}".encode(), n) for i, n in enumerate(SIZES)]
    assert fd.client_size(b"c3") == 12
    np.testing.assert_array_equal(fd.get_client(b"c2").all_examples()["id"], [5, 6, 7])
    assert len(fd.get_client(b"c1")) == 0
    got = [(cid, len(ds)) for cid, ds in fd.get_clients([b"c4", b"c0"])]
    assert got == [(b"c4", 7), (b"c0", 5)]
    assert fd.num_examples == 41
    np.testing.assert_array_equal(fd.offsets, np.cumsum([0, *SIZES]))


def test_from_columns_without_copy_and_with_reordering():
    data = client_data()
    ids = list(data)
    offsets = np.cumsum([0, *SIZES])
    columns = {k: np.concatenate([data[c][k] for c in ids]) for k in ("id", "x")}
    fd = InMemoryFederatedData.from_columns(ids, offsets, columns)
    assert np.shares_memory(fd.columns["x"], columns["x"])  # Sorted ids: no copy.
    assert columns["x"].flags.writeable  # The caller's array is untouched.
    assert not fd.columns["x"].flags.writeable
    # Same data, clients given in reverse order: reordered to sorted ids.
    rev_ids = ids[::-1]
    rev_cols = {k: np.concatenate([data[c][k] for c in rev_ids]) for k in ("id", "x")}
    rev = InMemoryFederatedData.from_columns(rev_ids, np.cumsum([0, *SIZES[::-1]]), rev_cols)
    assert list(rev.client_sizes()) == list(fd.client_sizes())
    np.testing.assert_array_equal(rev.columns["id"], np.arange(41))
    np.testing.assert_array_equal(rev.columns["x"], fd.columns["x"])


@pytest.mark.parametrize(
    "ids,offsets,columns,match",
    [
        ([b"a", b"b"], [0, 2, 3], {"x": np.zeros(4)}, "offsets\\[-1\\] = 3"),
        ([b"a", b"b"], [0, 3], {"x": np.zeros(3)}, "len\\(client_ids\\) \\+ 1 = 3"),
        ([b"a", b"b"], [0, 3, 2], {"x": np.zeros(2)}, "non-decreasing"),
        ([b"a", b"b"], [1, 2, 3], {"x": np.zeros(3)}, "start at 0"),
        ([b"a", b"a"], [0, 1, 2], {"x": np.zeros(2)}, "unique"),
        ([b"a"], [0.0, 1.0], {"x": np.zeros(1)}, "integer"),
        ([b"a"], [0, 1], {}, "at least one feature"),
        ([b"a"], [0, 2], {"x": np.zeros(2), "y": np.zeros(3)}, "column 'y'"),
    ],
)
def test_from_columns_rejects_inconsistent_input(ids, offsets, columns, match):
    with pytest.raises(ValueError, match=match):
        InMemoryFederatedData.from_columns(ids, np.asarray(offsets), columns)


def test_mapping_constructor_rejects_inconsistent_clients():
    with pytest.raises(ValueError, match="same features"):
        InMemoryFederatedData({b"a": {"x": np.zeros(2)}, b"b": {"y": np.zeros(2)}})
    with pytest.raises(ValueError, match="client b'a'.*one row per example"):
        InMemoryFederatedData({b"a": {"x": np.zeros(2), "y": np.zeros(3)}})
    with pytest.raises(ValueError, match="cast them to one dtype"):
        InMemoryFederatedData(
            {b"a": {"x": np.zeros(2, np.int32)}, b"b": {"x": np.zeros(2, np.int64)}}
        )


def test_unknown_client_id_is_a_key_error(fd):
    with pytest.raises(KeyError, match="unknown client id b'nope'"):
        fd.get_client(b"nope")
    with pytest.raises(KeyError, match="unknown client id"):
        fd.client_size("c0")  # str, not bytes
    with pytest.raises(KeyError):
        list(fd.get_clients([b"c0", b"zz"]))


def test_slice_is_a_zero_copy_id_range(fd):
    sub = fd.slice(b"c2", b"c5")
    assert list(sub.client_ids()) == [b"c2", b"c3", b"c4"]
    np.testing.assert_array_equal(sub.get_client(b"c3").all_examples()["id"], np.arange(8, 20))
    assert np.shares_memory(sub.columns["x"], fd.columns["x"])
    assert list(fd.slice(stop=b"c1").client_ids()) == [b"c0"]
    assert list(fd.slice(start=b"c7").client_ids()) == [b"c7"]
    assert fd.slice(b"c5", b"c2").num_clients() == 0
    assert list(fd.slice(b"c5", b"c2").client_sizes()) == []


def test_columns_are_read_only_even_through_preprocessors(fd):
    def mutate(client_id, examples):
        examples["x"][:] = 0
        return examples

    with pytest.raises(ValueError, match="read-only"):
        fd.preprocess_client(mutate).get_client(b"c0")


def test_preprocess_client_and_batch(fd):
    capped = fd.preprocess_client(lambda cid, e: {k: v[:2] for k, v in e.items()})
    assert len(capped.get_client(b"c3")) == 2
    assert fd.client_size(b"c3") == 12  # The original is unchanged.
    doubled = fd.preprocess_batch(lambda e: {**e, "id": e["id"] * 2})
    np.testing.assert_array_equal(doubled.get_client(b"c2").all_examples()["id"], [10, 12, 14])
    assert not capped.supports_column_batching and doubled.supports_column_batching


def as_lists(batches):
    return [{k: v.tolist() for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("batch_size,buckets", [(4, 1), (4, 3), (8, 3), (1, 1), (41, 2), (50, 3)])
def test_padded_batch_fast_path_equals_generic_path(fd, batch_size, buckets):
    fast = list(
        fdm.padded_batch_federated_data(fd, batch_size=batch_size, num_batch_size_buckets=buckets)
    )
    slow = list(
        fdm.padded_batch_federated_data(
            generic(fd), batch_size=batch_size, num_batch_size_buckets=buckets
        )
    )
    assert as_lists(fast) == as_lists(slow)
    ids = np.concatenate([b["id"][b[EXAMPLE_MASK_KEY]] for b in fast])
    np.testing.assert_array_equal(ids, np.arange(41))


def test_padded_batch_views_of_strided_columns_and_read_only_mask():
    rows = np.arange(41, dtype=np.int64)
    wide = np.stack([rows, -rows, 2 * rows], 1).astype(np.float32)
    ids = [f"c{i}".encode() for i in range(len(SIZES))]
    offsets = np.cumsum([0, *SIZES])
    strided = InMemoryFederatedData.from_columns(ids, offsets, {"id": rows, "x": wide[:, ::2]})
    dense = InMemoryFederatedData.from_columns(
        ids, offsets, {"id": rows, "x": np.ascontiguousarray(wide[:, ::2])}
    )
    a = list(fdm.padded_batch_federated_data(strided, batch_size=4))
    b = list(fdm.padded_batch_federated_data(dense, batch_size=4))
    assert as_lists(a) == as_lists(b)
    assert [list(batch) for batch in b[:-1]] == [["id", "x", EXAMPLE_MASK_KEY]] * 10
    for batch in a[:-1] + b[:-1]:
        assert not batch[EXAMPLE_MASK_KEY].flags.writeable  # Shared by all full batches.


def test_padded_batch_sizes_and_final_bucket(fd):
    batches = list(fdm.padded_batch_federated_data(fd, batch_size=16, num_batch_size_buckets=3))
    assert [len(b["id"]) for b in batches] == [16, 16, 16]  # 41 = 16 + 16 + 9 -> 16
    batches = list(fdm.padded_batch_federated_data(fd, batch_size=32, num_batch_size_buckets=3))
    assert [len(b["id"]) for b in batches] == [32, 16]  # remainder 9: 32, 16, 8 -> 16
    np.testing.assert_array_equal(batches[-1][EXAMPLE_MASK_KEY], np.arange(16) < 9)
    np.testing.assert_array_equal(batches[-1]["x"][9:], 0)


def test_padded_batch_with_preprocessors_uses_the_right_path(fd):
    pre = fd.preprocess_batch(lambda e: {**e, "id": e["id"] + 100})
    fast = as_lists(fdm.padded_batch_federated_data(pre, batch_size=6))
    assert as_lists(fdm.padded_batch_federated_data(generic(pre), batch_size=6)) == fast
    assert fast[0]["id"] == list(range(100, 106))
    capped = fd.preprocess_client(lambda cid, e: {k: v[:1] for k, v in e.items()})
    batches = list(fdm.padded_batch_federated_data(capped, batch_size=4))
    ids = np.concatenate([b["id"][b[EXAMPLE_MASK_KEY]] for b in batches])
    np.testing.assert_array_equal(ids, [0, 5, 8, 20, 27, 28, 37])  # First row of non-empty clients.


def test_padded_batch_bad_batch_size(fd):
    for target in (fd, generic(fd)):
        with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
            list(fdm.padded_batch_federated_data(target, batch_size=0))


# ---- the shuffled index stream ----


def take(it, n):
    return list(itertools.islice(it, n))


def test_epoch_order_is_a_permutation_with_client_windows():
    offsets = np.cumsum([0, *SIZES])
    client_of_row = np.repeat(np.arange(len(SIZES)), SIZES)
    order = shuffled_epoch_order(offsets, 0, 2, 5, seed=3)
    assert sorted(order.tolist()) == list(range(41))
    # Each window holds >= 2 clients and >= 5 examples, every client inside one window: so
    # the rows of each client are contiguous within a window-sized run.
    clients_in_order = client_of_row[order]
    first_seen = [c for i, c in enumerate(clients_in_order) if c not in clients_in_order[:i]]
    assert sorted(first_seen) == [0, 2, 3, 4, 5, 6, 7]  # The empty client contributes nothing.
    np.testing.assert_array_equal(order, shuffled_epoch_order(offsets, 0, 2, 5, seed=3))
    assert not np.array_equal(order, shuffled_epoch_order(offsets, 1, 2, 5, seed=3))
    assert not np.array_equal(order, shuffled_epoch_order(offsets, 0, 2, 5, seed=4))


def test_windows_mix_clients_when_buffers_are_large():
    offsets = np.cumsum([0, *SIZES])
    client_of_row = np.repeat(np.arange(len(SIZES)), SIZES)
    # One window covering everything: a full shuffle, clients interleave in the first rows.
    order = shuffled_epoch_order(offsets, 0, 100, 1000, seed=0)
    assert len(set(client_of_row[order[:10]])) >= 3
    # Windows of one client and one example: clients come out whole, one after another.
    order = shuffled_epoch_order(offsets, 0, 1, 1, seed=0)
    runs = [k for k, _ in itertools.groupby(client_of_row[order])]
    assert sorted(runs) == [0, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("batch_size", [1, 4, 7, 41, 100])
def test_index_stream_covers_every_example_once_per_epoch(batch_size):
    offsets = np.cumsum([0, *SIZES])
    num_batches = -(-41 * 3 // batch_size)
    batches = take(shuffle_repeat_batch_indices(offsets, batch_size, 2, 8, seed=1), num_batches)
    assert all(b.shape == (batch_size,) and b.dtype == np.int64 for b in batches)
    stream = np.concatenate(batches)
    for epoch in range(3):
        rows = stream[epoch * 41 : (epoch + 1) * 41]
        np.testing.assert_array_equal(rows, shuffled_epoch_order(offsets, epoch, 2, 8, seed=1))


@pytest.mark.parametrize("batch_size,start", [(4, 0), (4, 9), (4, 10), (7, 6), (7, 23), (100, 3)])
def test_index_stream_resumes_at_any_batch(batch_size, start):
    offsets = np.cumsum([0, *SIZES])
    full = take(shuffle_repeat_batch_indices(offsets, batch_size, 3, 4, seed=5), start + 12)
    resumed = take(
        shuffle_repeat_batch_indices(offsets, batch_size, 3, 4, seed=5, start_batch=start), 12
    )
    for a, b in zip(full[start:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_index_stream_bad_input():
    offsets = np.cumsum([0, *SIZES])
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        shuffle_repeat_batch_indices(offsets, 0, 2, 8, seed=0)
    with pytest.raises(ValueError, match="client_buffer_size"):
        shuffle_repeat_batch_indices(offsets, 4, 0, 8, seed=0)
    with pytest.raises(ValueError, match="example_buffer_size"):
        shuffle_repeat_batch_indices(offsets, 4, 2, -1, seed=0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        shuffle_repeat_batch_indices(offsets, 4, 2, 8, seed=-1)
    with pytest.raises(ValueError, match="start_batch"):
        shuffle_repeat_batch_indices(offsets, 4, 2, 8, seed=0, start_batch=-2)
    with pytest.raises(ValueError, match="no examples"):
        shuffle_repeat_batch_indices(np.array([0, 0, 0]), 4, 2, 8, seed=0)


# ---- shuffle_repeat_batch_federated_data ----


def test_fast_shuffle_batches_are_gathers_of_the_index_stream(fd):
    fd = fd.preprocess_batch(lambda e: {**e, "neg": -e["id"]})
    batches = take(fdm.shuffle_repeat_batch_federated_data(fd, 4, 2, 8, seed=0), 25)
    indices = take(fd.shuffle_repeat_batch_indices(4, 2, 8, seed=0), 25)
    for batch, idx in zip(batches, indices, strict=True):
        np.testing.assert_array_equal(batch["id"], idx)  # id == global row here.
        np.testing.assert_array_equal(batch["x"][:, 1], -idx)
        np.testing.assert_array_equal(batch["neg"], -idx)
        assert EXAMPLE_MASK_KEY not in batch
    resumed = take(fd.shuffle_repeat_batches(4, 2, 8, seed=0, start_batch=20), 5)
    for a, b in zip(batches[20:], resumed, strict=True):
        np.testing.assert_array_equal(a["x"], b["x"])


@pytest.mark.parametrize("num_columns", [1, 2, 3, 5])
@pytest.mark.parametrize("chunk_bytes", [1, 1 << 20])  # One batch per chunk, or many.
def test_fast_shuffle_any_column_count_and_chunking(monkeypatch, num_columns, chunk_bytes):
    monkeypatch.setattr(imfd, "_CHUNK_BYTES", chunk_bytes)
    rows = np.arange(41, dtype=np.int64)
    # Column 0: the row id; "wide" (32 float32 per row, gathered with np.take); then narrow.
    columns = {"id": rows, "wide": np.repeat(rows[:, None], 32, 1).astype(np.float32) * 0.5}
    for j in range(2, num_columns):
        columns[f"c{j}"] = (rows * (j + 1)).astype(np.int32)
    columns = dict(itertools.islice(columns.items(), num_columns))
    store = InMemoryFederatedData.from_columns(
        [f"c{i}".encode() for i in range(len(SIZES))], np.cumsum([0, *SIZES]), columns
    )
    batches = take(store.shuffle_repeat_batches(3, 2, 8, seed=4), 40)  # ~3 epochs.
    indices = take(store.shuffle_repeat_batch_indices(3, 2, 8, seed=4), 40)
    for batch, idx in zip(batches, indices, strict=True):
        assert list(batch) == list(columns)
        for key, column in columns.items():
            np.testing.assert_array_equal(batch[key], column[idx])
    # Batches never share rows: writing into one leaves every other batch as it was.
    batches[0]["id"][:] = -1
    for batch, idx in zip(batches[1:], indices[1:], strict=True):
        np.testing.assert_array_equal(batch["id"], idx)


def test_shuffle_is_deterministic_full_and_mixes_clients(fd):
    def ids(seed, n=30):
        it = fdm.shuffle_repeat_batch_federated_data(fd, 5, 3, 6, seed=seed)
        return [b["id"].tolist() for b in take(it, n)]

    assert ids(1) == ids(1)
    assert ids(1) != ids(2)
    assert all(len(b) == 5 for b in ids(1))
    client_of_row = np.repeat(np.arange(len(SIZES)), SIZES)
    assert max(len(set(client_of_row[b])) for b in ids(1)) >= 2
    seedless = fdm.shuffle_repeat_batch_federated_data(fd, 5, 3, 6)
    assert len(next(seedless)["id"]) == 5


def test_generic_shuffle_path_is_deterministic_and_full(fd):
    sub = generic(fd)

    def ids(seed):
        it = fdm.shuffle_repeat_batch_federated_data(sub, 3, 2, 4, seed=seed)
        return [b["id"].tolist() for b in take(it, 40)]

    assert ids(0) == ids(0)
    assert all(len(b) == 3 for b in ids(0))
    assert set(itertools.chain(*ids(0))) == set(range(41))


def test_shuffle_bad_input_and_empty_data(fd):
    for target in (fd, generic(fd)):
        with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
            fdm.shuffle_repeat_batch_federated_data(target, 0, 2, 8, seed=0)
        with pytest.raises(ValueError, match="example_buffer_size"):
            fdm.shuffle_repeat_batch_federated_data(target, 2, 2, 0, seed=0)
    empty = InMemoryFederatedData({b"a": {"x": np.zeros((0, 2))}})
    for target in (empty, generic(empty)):
        with pytest.raises(ValueError, match="no examples|every client .* is empty"):
            fdm.shuffle_repeat_batch_federated_data(target, 2, 2, 8, seed=0)
    capped = fd.preprocess_client(lambda cid, e: e)
    with pytest.raises(ValueError, match="client preprocessor"):
        capped.shuffle_repeat_batches(2, 2, 8, seed=0)


# ---- other FederatedData helpers ----


def test_subset_federated_data(fd):
    sub = fdm.SubsetFederatedData(fd, [b"c3", b"c0", b"c5"])
    assert list(sub.client_ids()) == [b"c0", b"c3", b"c5"]
    assert list(sub.client_sizes()) == [(b"c0", 5), (b"c3", 12), (b"c5", 1)]
    assert [cid for cid, _ in sub.clients()] == [b"c0", b"c3", b"c5"]
    assert list(sub.slice(b"c1", b"c4").client_ids()) == [b"c3"]
    with pytest.raises(KeyError, match="not in this SubsetFederatedData"):
        sub.get_client(b"c1")
    with pytest.raises(ValueError, match="not in the base FederatedData"):
        fdm.SubsetFederatedData(fd, [b"zz"])
    shuffled = [cid for cid, _ in take(sub.shuffled_clients(2, seed=0), 9)]
    assert sorted(shuffled[:3]) == sorted(shuffled[3:6]) == [b"c0", b"c3", b"c5"]


def test_shuffled_clients_is_endless_and_covers_each_pass(fd):
    got = [cid for cid, _ in take(fd.shuffled_clients(3, seed=1), 16)]
    assert sorted(got[:8]) == sorted(got[8:]) == list(fd.client_ids())
    assert got == [cid for cid, _ in take(fd.shuffled_clients(3, seed=1), 16)]


def test_repeatable_iterator():
    it = fdm.RepeatableIterator(x for x in range(3))
    assert list(it) == [0, 1, 2]
    assert list(it) == [0, 1, 2]
    it = fdm.RepeatableIterator([4, 5])
    assert list(it) == [4, 5] and list(it) == [4, 5]


def test_intersect_slice_ranges():
    assert fdm.intersect_slice_ranges(b"b", b"x", b"a", b"y") == (b"b", b"x")
    assert fdm.intersect_slice_ranges(None, None, b"c", None) == (b"c", None)
    assert fdm.intersect_slice_ranges(b"c", b"e", b"d", None) == (b"d", b"e")
