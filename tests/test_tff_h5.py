"""TFF h5 reader/writer: fidelity, layout errors, atomic writes, the shared FEMNIST files."""

from __future__ import annotations

import pathlib

import h5py
import numpy as np
import pytest

from fedjax_exp.datasets import tff_h5


def _emnist_like(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"f{1000 + i:04d}_{i % 100:02d}": {
            "pixels": (rng.integers(0, 256, size=(n, 28, 28)) / 255).astype(np.float32),
            "label": rng.integers(0, 62, size=n).astype(np.int32),
        }
        for i, n in enumerate(sizes)
    }


def _write_raw(path, clients):
    """Writes the TFF layout with plain h5py (independent of the code under test)."""
    with h5py.File(path, "w") as f:
        for cid, feats in clients.items():
            for name, value in feats.items():
                f.create_dataset(f"examples/{cid}/{name}", data=value)


def _no_temp_files(directory: pathlib.Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".partial")]


def test_read_matches_h5py(tmp_path):
    clients = _emnist_like([3, 1, 5])
    _write_raw(tmp_path / "d.h5", clients)
    cols = tff_h5.read_h5_columns(tmp_path / "d.h5")
    assert cols.client_ids == [k.encode() for k in sorted(clients)]
    np.testing.assert_array_equal(cols.offsets, [0, 3, 4, 9])
    assert cols.offsets.dtype == np.int64
    assert cols.columns["pixels"].dtype == np.float32
    assert cols.columns["pixels"].shape == (9, 28, 28)
    assert cols.columns["label"].dtype == np.int32
    for i, cid in enumerate(sorted(clients)):
        for name in ("pixels", "label"):
            np.testing.assert_array_equal(cols.client(i)[name], clients[cid][name])


def test_read_selected_features(tmp_path):
    _write_raw(tmp_path / "d.h5", _emnist_like([2, 2]))
    cols = tff_h5.read_h5_columns(tmp_path / "d.h5", features=["label"])
    assert list(cols.columns) == ["label"]


def test_write_read_round_trip_with_compression(tmp_path):
    clients = _emnist_like([4, 2])
    ids = sorted(clients)
    offsets = np.array([0, 4, 6])
    columns = {k: np.concatenate([clients[c][k] for c in ids]) for k in ("pixels", "label")}
    path = tmp_path / "out.h5"
    tff_h5.write_h5_columns(
        path, [c.encode() for c in ids], offsets, columns, compression="gzip", attrs={"note": "x"}
    )
    assert _no_temp_files(tmp_path)
    with h5py.File(path, "r") as f:
        assert f.attrs["note"] == "x"
        np.testing.assert_array_equal(f[f"examples/{ids[1]}/label"][()], clients[ids[1]]["label"])
    back = tff_h5.read_h5_columns(path)
    assert back.client_ids == [c.encode() for c in ids]
    np.testing.assert_array_equal(back.offsets, offsets)
    for k in columns:
        np.testing.assert_array_equal(back.columns[k], columns[k])


def test_write_refuses_existing_file_and_bad_offsets(tmp_path):
    path = tmp_path / "out.h5"
    path.write_bytes(b"keep")
    cols = {"label": np.arange(3, dtype=np.int32)}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tff_h5.write_h5_columns(path, [b"a"], np.array([0, 3]), cols)
    assert path.read_bytes() == b"keep"
    with pytest.raises(ValueError, match="offsets"):
        tff_h5.write_h5_columns(tmp_path / "o2.h5", [b"a", b"b"], np.array([0, 3]), cols)
    with pytest.raises(ValueError, match="rows"):
        tff_h5.write_h5_columns(tmp_path / "o3.h5", [b"a"], np.array([0, 2]), cols)


def test_failed_write_leaves_no_file(tmp_path):
    # Object arrays cannot be stored by h5py: the write fails after the temp file exists.
    cols = {"label": np.array([object(), object()], dtype=object)}
    with pytest.raises(TypeError):
        tff_h5.write_h5_columns(tmp_path / "out.h5", [b"a"], np.array([0, 2]), cols)
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        tff_h5.read_h5_columns(tmp_path / "nope.h5")


def test_not_hdf5(tmp_path):
    (tmp_path / "bad.h5").write_bytes(b"this is not hdf5" * 10)
    with pytest.raises(ValueError, match="not a readable HDF5 file"):
        tff_h5.read_h5_columns(tmp_path / "bad.h5")


def test_truncated_file(tmp_path):
    _write_raw(tmp_path / "d.h5", _emnist_like([50, 50]))
    data = (tmp_path / "d.h5").read_bytes()
    (tmp_path / "t.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        tff_h5.read_h5_columns(tmp_path / "t.h5")


def test_no_examples_group(tmp_path):
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f.create_dataset("data/pixels", data=np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="no 'examples' group.*'data'"):
        tff_h5.read_h5_columns(tmp_path / "d.h5")


def test_mismatched_lengths_within_client(tmp_path):
    clients = _emnist_like([3, 3])
    first = sorted(clients)[1]
    clients[first]["label"] = clients[first]["label"][:2]
    _write_raw(tmp_path / "d.h5", clients)
    with pytest.raises(ValueError, match=f"client '{first}' has features of different lengths"):
        tff_h5.read_h5_columns(tmp_path / "d.h5")


def test_inconsistent_features_across_clients(tmp_path):
    clients = _emnist_like([3, 3])
    second = sorted(clients)[1]
    del clients[second]["label"]
    _write_raw(tmp_path / "d.h5", clients)
    with pytest.raises(ValueError, match="lacks feature 'label'"):
        tff_h5.read_h5_columns(tmp_path / "d.h5")
    clients = _emnist_like([3, 3])
    clients[second]["label"] = clients[second]["label"].astype(np.int64)
    _write_raw(tmp_path / "e.h5", clients)
    with pytest.raises(ValueError, match="dtype int64"):
        tff_h5.read_h5_columns(tmp_path / "e.h5")


def test_zero_example_client_is_an_error_or_dropped(tmp_path):
    clients = _emnist_like([3, 0, 2])
    empty = sorted(clients)[1]
    _write_raw(tmp_path / "d.h5", clients)
    with pytest.raises(ValueError, match=f"client '{empty}' has zero examples"):
        tff_h5.read_h5_columns(tmp_path / "d.h5")
    cols = tff_h5.read_h5_columns(tmp_path / "d.h5", empty_clients="drop")
    assert empty.encode() not in cols.client_ids
    np.testing.assert_array_equal(cols.offsets, [0, 3, 5])
    with pytest.raises(ValueError, match="empty_clients"):
        tff_h5.read_h5_columns(tmp_path / "d.h5", empty_clients="keep")


def test_is_hdf5_file(tmp_path):
    _write_raw(tmp_path / "d.h5", _emnist_like([1]))
    (tmp_path / "x").write_bytes(b"SQLite format 3\x00")
    assert tff_h5.is_hdf5_file(tmp_path / "d.h5")
    assert not tff_h5.is_hdf5_file(tmp_path / "x")


@pytest.mark.shared_data
def test_shared_femnist_files(shared_femnist_dir):
    train = tff_h5.read_h5_columns(shared_femnist_dir / "femnist_leaf_train.h5")
    test = tff_h5.read_h5_columns(shared_femnist_dir / "femnist_leaf_test.h5")
    assert (len(train.client_ids), train.num_examples) == (300, 41224)
    assert (len(test.client_ids), test.num_examples) == (540, 11785)
    assert set(train.client_ids) <= set(test.client_ids)
    assert train.columns["pixels"].shape == (41224, 28, 28)
    assert train.columns["pixels"].dtype == np.float32
    assert train.columns["label"].dtype == np.int32
    assert np.unique(train.columns["label"]).size == 62
    # Spot-check one client against h5py.
    with h5py.File(shared_femnist_dir / "femnist_leaf_train.h5", "r") as f:
        cid = train.client_ids[123].decode()
        np.testing.assert_array_equal(train.client(123)["pixels"], f[f"examples/{cid}/pixels"][()])
        np.testing.assert_array_equal(train.client(123)["label"], f[f"examples/{cid}/label"][()])
