"""FedJAX SQLite format: wire-format parity, both-way compatibility, lazy reader, bulk load,
atomic builder and clear errors for bad files."""

from __future__ import annotations

import sqlite3
import zlib

import msgpack
import numpy as np
import pytest

from fedjax_exp.core import sqlite_federated_data as sq
from fedjax_exp.datasets import tff_h5


def _clients(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"c{i:03d}".encode(): {
            "pixels": (rng.integers(0, 256, size=(n, 28, 28)) / 255).astype(np.float32),
            "label": rng.integers(0, 62, size=n).astype(np.int32),
        }
        for i, n in enumerate(sizes)
    }


def _write(path, clients):
    with sq.SQLiteFederatedDataBuilder(path) as builder:
        builder.add_many(clients.items())


def _assert_same_examples(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
        np.testing.assert_array_equal(a[k], b[k])


# ---- wire format ------------------------------------------------------------------------


def test_serialization_round_trip_all_kinds():
    examples = {
        "f32": np.arange(12, dtype=np.float32).reshape(3, 2, 2),
        "i64": np.array([-1, 2**40], dtype=np.int64),
        "bool": np.array([True, False]),
        "tokens": np.array([b"ab", b"", b"c"], dtype=object),
        "empty": np.zeros((0, 3), np.float16),
    }
    back = sq.deserialize_examples(sq.serialize_examples(examples))
    _assert_same_examples(back, examples)
    assert back["tokens"].dtype == object


def test_ndarray_encoding_is_ext_type_1_of_shape_dtype_bytes():
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    outer = msgpack.unpackb(zlib.decompress(sq.serialize_examples({"a": arr})), raw=False)
    ext = outer["a"]
    assert isinstance(ext, msgpack.ExtType) and ext.code == 1
    shape, dtype, data = msgpack.unpackb(ext.data, raw=True)
    assert (shape, dtype, data) == ([2, 3], b"int16", arr.tobytes("C"))


def test_serialized_bytes_equal_fedjax():
    fedjax = pytest.importorskip("fedjax")
    from fedjax.core import serialization

    del fedjax
    examples = _clients([4])[b"c000"]
    examples["tokens"] = np.array([b"x", b"yz", b"", b"w"], dtype=object)
    assert sq.serialize_examples(examples) == zlib.compress(
        serialization.msgpack_serialize(examples)
    )


# ---- both-way compatibility with FedJAX ---------------------------------------------------


def test_fedjax_reads_our_file(tmp_path):
    fedjax = pytest.importorskip("fedjax")
    clients = _clients([3, 1, 4])
    _write(tmp_path / "ours.sqlite", clients)
    theirs = fedjax.SQLiteFederatedData.new(str(tmp_path / "ours.sqlite"))
    assert list(theirs.client_ids()) == list(clients)
    assert list(theirs.client_sizes()) == [(k, len(v["label"])) for k, v in clients.items()]
    for cid, ds in theirs.clients():
        _assert_same_examples(ds.all_examples(), clients[cid])


def test_we_read_fedjax_file(tmp_path):
    fedjax = pytest.importorskip("fedjax")
    clients = _clients([2, 5, 1])
    with fedjax.SQLiteFederatedDataBuilder(str(tmp_path / "theirs.sqlite")) as builder:
        builder.add_many(clients.items())
    ours = sq.SQLiteFederatedData.new(tmp_path / "theirs.sqlite")
    theirs = fedjax.SQLiteFederatedData.new(str(tmp_path / "theirs.sqlite"))
    assert list(ours.client_ids()) == list(theirs.client_ids())
    assert list(ours.client_sizes()) == list(theirs.client_sizes())
    for (a, da), (b, db) in zip(ours.clients(), theirs.clients(), strict=True):
        assert a == b
        _assert_same_examples(da.all_examples(), db.all_examples())
    ids, offsets, columns = sq.load_sqlite_columns(tmp_path / "theirs.sqlite")
    assert ids == list(clients)
    np.testing.assert_array_equal(offsets, [0, 2, 7, 8])
    for k in ("pixels", "label"):
        np.testing.assert_array_equal(columns[k], np.concatenate([c[k] for c in clients.values()]))


def test_h5_to_store_to_sqlite_to_fedjax(tmp_path):
    fedjax = pytest.importorskip("fedjax")
    import h5py

    from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData

    clients = _clients([3, 2, 4], seed=5)
    with h5py.File(tmp_path / "d.h5", "w") as f:
        for cid, feats in clients.items():
            for name, value in feats.items():
                f.create_dataset(f"examples/{cid.decode()}/{name}", data=value)
    cols = tff_h5.read_h5_columns(tmp_path / "d.h5")
    store = InMemoryFederatedData.from_columns(cols.client_ids, cols.offsets, cols.columns)
    sq.write_sqlite(tmp_path / "d.sqlite", list(store.client_ids()), store.offsets, store.columns)
    theirs = fedjax.SQLiteFederatedData.new(str(tmp_path / "d.sqlite"))
    assert list(theirs.client_ids()) == sorted(clients)
    for cid, ds in theirs.clients():
        _assert_same_examples(ds.all_examples(), clients[cid])
        _assert_same_examples(store.get_client(cid).all_examples(), clients[cid])


def test_shuffled_clients_order_matches_fedjax(tmp_path):
    fedjax = pytest.importorskip("fedjax")
    _write(tmp_path / "d.sqlite", _clients([1] * 9))
    ours = sq.SQLiteFederatedData.new(tmp_path / "d.sqlite").shuffled_clients(3, seed=7)
    theirs = fedjax.SQLiteFederatedData.new(str(tmp_path / "d.sqlite")).shuffled_clients(3, seed=7)
    assert [next(ours)[0] for _ in range(20)] == [next(theirs)[0] for _ in range(20)]


# ---- lazy reader ----------------------------------------------------------------------------


def test_lazy_reader_interface(tmp_path):
    clients = _clients([3, 1, 4, 2])
    _write(tmp_path / "d.sqlite", clients)
    fd = sq.SQLiteFederatedData.new(tmp_path / "d.sqlite")
    assert fd.num_clients() == 4
    assert fd.client_size(b"c002") == 4
    _assert_same_examples(fd.get_client(b"c001").all_examples(), clients[b"c001"])
    assert [cid for cid, _ in fd.get_clients([b"c003", b"c000"])] == [b"c003", b"c000"]
    with pytest.raises(KeyError):
        fd.get_client(b"nope")
    with pytest.raises(KeyError):
        fd.client_size(b"nope")

    part = fd.slice(b"c001", b"c003")
    assert list(part.client_ids()) == [b"c001", b"c002"]
    assert part.num_clients() == 2
    assert list(part.slice(start=b"c002").client_ids()) == [b"c002"]
    with pytest.raises(KeyError):
        part.get_client(b"c000")  # exists in the file, but outside the slice

    pre = fd.preprocess_client(lambda cid, ex: {**ex, "n": np.full_like(ex["label"], len(cid))})
    pre = pre.preprocess_batch(lambda ex: {"y": ex["label"] + 1, "n": ex["n"]})
    out = pre.get_client(b"c000").all_examples()
    np.testing.assert_array_equal(out["y"], clients[b"c000"]["label"] + 1)
    np.testing.assert_array_equal(out["n"], [4, 4, 4])


def test_load_in_memory_equals_lazy(tmp_path):
    clients = _clients([3, 1, 4])
    _write(tmp_path / "d.sqlite", clients)
    mem = sq.load_sqlite_in_memory(tmp_path / "d.sqlite")
    lazy = sq.SQLiteFederatedData.new(tmp_path / "d.sqlite")
    assert list(mem.client_sizes()) == list(lazy.client_sizes())
    for (a, da), (b, db) in zip(mem.clients(), lazy.clients(), strict=True):
        assert a == b
        _assert_same_examples(da.all_examples(), db.all_examples())


# ---- builder ------------------------------------------------------------------------------


def test_builder_is_atomic_on_error(tmp_path):
    path = tmp_path / "d.sqlite"
    with pytest.raises(RuntimeError, match="boom"), sq.SQLiteFederatedDataBuilder(path) as b:
        b.add_many(_clients([2]).items())
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_builder_rejects_bad_clients(tmp_path):
    good = _clients([2])[b"c000"]
    cases = [
        ([(b"a", good), (b"a", good)], "duplicate client id"),
        ([(b"a", {"x": np.zeros((0, 2))})], "zero examples"),
        ([(b"a", {"x": np.zeros(2), "y": np.zeros(3)})], "client b'a'"),
    ]
    for rows, message in cases:
        with (
            pytest.raises(ValueError, match=message),
            sq.SQLiteFederatedDataBuilder(tmp_path / "d.sqlite") as b,
        ):
            b.add_many(rows)
        assert list(tmp_path.iterdir()) == []
    (tmp_path / "d.sqlite").write_bytes(b"")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sq.SQLiteFederatedDataBuilder(tmp_path / "d.sqlite")


# ---- bad files ----------------------------------------------------------------------------


def test_missing_file_is_not_created(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.sqlite"):
        sq.SQLiteFederatedData.new(tmp_path / "missing.sqlite")
    with pytest.raises(FileNotFoundError):
        sq.load_sqlite_columns(tmp_path / "missing.sqlite")
    assert list(tmp_path.iterdir()) == []


def test_not_sqlite(tmp_path):
    (tmp_path / "x.sqlite").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(ValueError, match="not an SQLite database"):
        sq.SQLiteFederatedData.new(tmp_path / "x.sqlite")


def test_truncated_sqlite(tmp_path):
    _write(tmp_path / "d.sqlite", _clients([40, 40, 40]))
    data = (tmp_path / "d.sqlite").read_bytes()
    (tmp_path / "t.sqlite").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        sq.load_sqlite_columns(tmp_path / "t.sqlite")


def test_wrong_table(tmp_path):
    con = sqlite3.connect(tmp_path / "d.sqlite")
    con.execute("CREATE TABLE other (a INTEGER);")
    con.commit()
    con.close()
    with pytest.raises(ValueError, match="no 'federated_data' table"):
        sq.SQLiteFederatedData.new(tmp_path / "d.sqlite")


def _raw_table(path, rows):
    con = sqlite3.connect(path)
    con.execute(sq._CREATE_TABLE)
    con.executemany("INSERT INTO federated_data VALUES (?, ?, ?);", rows)
    con.commit()
    con.close()


def test_corrupt_blob(tmp_path):
    good = sq.serialize_examples(_clients([2])[b"c000"])
    _raw_table(tmp_path / "d.sqlite", [(b"a", good, 2), (b"b", b"garbage", 2)])
    fd = sq.SQLiteFederatedData.new(tmp_path / "d.sqlite")
    assert len(fd.get_client(b"a")) == 2
    # The message names the file too: a run may read several (train and test splits).
    where = "'/.*/d\\.sqlite'"
    with pytest.raises(ValueError, match=f"corrupt data for client b'b' in {where}"):
        fd.get_client(b"b")
    with pytest.raises(ValueError, match=f"corrupt data for client b'b' in {where}"):
        sq.load_sqlite_columns(tmp_path / "d.sqlite")


def test_num_examples_mismatch_and_empty_clients(tmp_path):
    ex = _clients([2])[b"c000"]
    _raw_table(tmp_path / "m.sqlite", [(b"a", sq.serialize_examples(ex), 3)])
    with pytest.raises(ValueError, match=r"client b'a': feature '\w+' has shape"):
        sq.load_sqlite_columns(tmp_path / "m.sqlite")

    empty = {k: v[:0] for k, v in ex.items()}
    _raw_table(
        tmp_path / "e.sqlite",
        [(b"a", sq.serialize_examples(ex), 2), (b"b", sq.serialize_examples(empty), 0)],
    )
    with pytest.raises(ValueError, match="zero examples.*b'b'.*empty_clients='drop'"):
        sq.load_sqlite_columns(tmp_path / "e.sqlite")
    ids, offsets, _ = sq.load_sqlite_columns(tmp_path / "e.sqlite", empty_clients="drop")
    assert ids == [b"a"]
    np.testing.assert_array_equal(offsets, [0, 2])


@pytest.mark.shared_data
def test_shared_femnist_through_sqlite(shared_femnist_dir, tmp_path):
    fedjax = pytest.importorskip("fedjax")
    cols = tff_h5.read_h5_columns(shared_femnist_dir / "femnist_leaf_test.h5")
    sq.write_sqlite(tmp_path / "t.sqlite", cols.client_ids, cols.offsets, cols.columns)
    theirs = fedjax.SQLiteFederatedData.new(str(tmp_path / "t.sqlite"))
    assert theirs.num_clients() == 540
    assert sum(n for _, n in theirs.client_sizes()) == 11785
    ids, offsets, columns = sq.load_sqlite_columns(tmp_path / "t.sqlite")
    assert ids == cols.client_ids
    np.testing.assert_array_equal(offsets, cols.offsets)
    np.testing.assert_array_equal(columns["pixels"], cols.columns["pixels"])
    cid, ds = next(theirs.clients())
    _assert_same_examples(ds.all_examples(), cols.client(0))
