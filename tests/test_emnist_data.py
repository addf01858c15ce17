"""EMNIST loader: FedJAX parity on cached files, both formats, downloads via file:// URLs,
the offline error, and the generic file loader."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_exp.core import sqlite_federated_data as sq
from fedjax_exp.datasets import emnist, files, tff_h5

IDS = [
    b"0123456789abcdef:f2100_03",
    b"00000000000000aa:f2599_11",
    b"fedcba9876543210:f0042_00",
    b"1111111111111111:f2600_07",
]


def _split(sizes, seed):
    rng = np.random.default_rng(seed)
    return {
        cid: {
            "pixels": (rng.integers(0, 256, size=(n, 28, 28)) / 255).astype(np.float32),
            "label": rng.integers(0, 62, size=n).astype(np.int32),
        }
        for cid, n in zip(IDS, sizes, strict=True)
    }


def _columns(clients):
    ids = sorted(clients)
    sizes = [len(clients[c]["label"]) for c in ids]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    cols = {k: np.concatenate([clients[c][k] for c in ids]) for k in ("pixels", "label")}
    return ids, offsets, cols


@pytest.fixture()
def splits():
    return {"train": _split([5, 3, 7, 2], seed=1), "test": _split([2, 1, 3, 1], seed=2)}


def _write_cache(cache, splits, write, file_name):
    for split, clients in splits.items():
        write(cache / file_name.format(split=split), *_columns(clients))
    return cache


@pytest.fixture()
def sqlite_cache(tmp_path, splits):
    return _write_cache(
        tmp_path / "sqlite_cache", splits, sq.write_sqlite, "federated_emnist_{split}.sqlite"
    )


@pytest.fixture()
def h5_cache(tmp_path, splits):
    return _write_cache(
        tmp_path / "h5_cache", splits, tff_h5.write_h5_columns, "fed_emnist_{split}.h5"
    )


def _assert_same_fd(a, b, batch_size=3):
    assert list(a.client_ids()) == list(b.client_ids())
    assert list(a.client_sizes()) == list(b.client_sizes())
    for (ida, da), (idb, db) in zip(a.clients(), b.clients(), strict=True):
        assert ida == idb
        ea, eb = da.all_examples(), db.all_examples()
        assert sorted(ea) == sorted(eb) == ["domain_id", "x", "y"]
        for k in ea:
            assert ea[k].dtype == eb[k].dtype
            np.testing.assert_array_equal(ea[k], eb[k])
        for ba, bb in zip(
            da.padded_batch(batch_size=batch_size),
            db.padded_batch(batch_size=batch_size),
            strict=True,
        ):
            assert sorted(ba) == sorted(bb)
            for k in ba:
                np.testing.assert_array_equal(ba[k], bb[k])


# ---- preprocessing -----------------------------------------------------------------------


def test_domain_id_matches_fedjax():
    fedjax = pytest.importorskip("fedjax")
    ids = [*IDS, b"f2099_00", b"f2100_00", b"f2599_99", b"f2600_00", b"f0001_01"]
    for cid in ids:
        assert emnist.domain_id(cid) == fedjax.datasets.emnist.domain_id(cid)
    assert [emnist.domain_id(c) for c in ids] == [0, 0, 1, 1, 1, 0, 0, 1, 1]


def test_domain_id_rejects_bad_ids():
    for bad in (b"abc", b"f21x0_00", b"0123456789abcdef:f2100_0"):
        with pytest.raises(ValueError, match="invalid EMNIST client id"):
            emnist.domain_id(bad)


def test_preprocess_functions_match_fedjax(splits):
    fedjax = pytest.importorskip("fedjax")
    cid = IDS[0]
    raw = splits["train"][cid]
    ours = emnist.preprocess_batch(emnist.preprocess_client(cid, raw))
    theirs = fedjax.datasets.emnist.preprocess_batch(
        fedjax.datasets.emnist.preprocess_client(cid, raw)
    )
    for k in ("x", "y", "domain_id"):
        assert ours[k].dtype == theirs[k].dtype
        np.testing.assert_array_equal(ours[k], theirs[k])
    assert ours["x"].shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(ours["x"][..., 0], 1 - raw["pixels"])


def test_emnist_columns_decodes_uint8_exactly():
    k = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    out = emnist.emnist_columns(
        [b"f2100_00"], np.array([0, 1]), {"pixels": k, "label": np.array([3], np.int32)}
    )
    assert out["pixels"].dtype == np.float32
    np.testing.assert_array_equal(
        out["pixels"], (np.arange(256) / 255).astype(np.float32)[None].reshape(1, 16, 16)
    )
    np.testing.assert_array_equal(out["domain_id"], [0])
    with pytest.raises(ValueError, match="missing \\['label'\\]"):
        emnist.emnist_columns([b"f2100_00"], np.array([0, 1]), {"pixels": k})


# ---- loading from the cache ---------------------------------------------------------------


def test_load_data_matches_fedjax_on_cached_sqlite(sqlite_cache):
    fedjax = pytest.importorskip("fedjax")
    their_train, their_test = fedjax.datasets.emnist.load_data(cache_dir=str(sqlite_cache))
    for in_memory in (False, True):
        train, test = emnist.load_data(cache_dir=sqlite_cache, in_memory=in_memory, download=False)
        _assert_same_fd(train, their_train)
        _assert_same_fd(test, their_test)
    train, _ = emnist.load_data(mode="sqlite", cache_dir=sqlite_cache, download=False)
    assert isinstance(train, sq.SQLiteFederatedData)


def test_h5_cache_gives_the_same_data(sqlite_cache, h5_cache):
    from_sqlite = emnist.load_data(cache_dir=sqlite_cache, download=False)
    from_h5 = emnist.load_data(cache_dir=h5_cache, download=False)
    from_h5_mode = emnist.load_data(mode="h5", cache_dir=h5_cache)
    for a, b, c in zip(from_sqlite, from_h5, from_h5_mode, strict=True):
        _assert_same_fd(a, b)
        _assert_same_fd(a, c)
    raw = emnist.load_split("test", cache_dir=h5_cache, download=False)
    assert sorted(raw.get_client(IDS[0]).all_examples()) == ["label", "pixels"]


def test_download_from_file_url(sqlite_cache, tmp_path):
    cache = tmp_path / "fresh"
    train, test = emnist.load_data(cache_dir=cache, base_url=sqlite_cache.as_uri())
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [
        "federated_emnist_test.sqlite",
        "federated_emnist_test.sqlite.sha256",
        "federated_emnist_train.sqlite",
        "federated_emnist_train.sqlite.sha256",
    ]
    _assert_same_fd(train, emnist.load_data(cache_dir=sqlite_cache, download=False)[0])
    assert test.num_clients() == 4


def test_download_checksum_mismatch(sqlite_cache, tmp_path):
    from fedjax_exp.datasets import downloads

    cache = tmp_path / "fresh"
    with pytest.raises(downloads.ChecksumError):
        emnist.load_data(
            cache_dir=cache,
            base_url=sqlite_cache.as_uri(),
            sha256={"federated_emnist_train.sqlite": "0" * 64},
        )
    assert not (cache / "federated_emnist_train.sqlite").exists()


def test_digits_only_file_names(tmp_path, splits):
    for split, clients in splits.items():
        sq.write_sqlite(
            tmp_path / f"federated_emnist_digitsonly_{split}.sqlite", *_columns(clients)
        )
    train, _ = emnist.load_data(only_digits=True, cache_dir=tmp_path, download=False)
    assert train.num_clients() == 4
    with pytest.raises(emnist.DatasetNotAvailableError):
        emnist.load_data(only_digits=False, cache_dir=tmp_path, download=False)


def test_offline_error_names_files_url_and_option(tmp_path):
    empty = tmp_path / "nowhere"
    empty.mkdir()
    cache = tmp_path / "cache"
    for base_url in (empty.as_uri(), "http://127.0.0.1:9/emnist"):
        with pytest.raises(emnist.DatasetNotAvailableError) as info:
            emnist.load_data(cache_dir=cache, base_url=base_url)
        message = str(info.value)
        for needle in (
            "federated_emnist_train.sqlite",
            "federated_emnist_test.sqlite",
            f"{base_url}/federated_emnist_train.sqlite",
            str(cache),
            "cache_dir=",
            "download failed",
        ):
            assert needle in message
    assert [p for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_missing_with_download_disabled_or_h5_mode(tmp_path):
    with pytest.raises(emnist.DatasetNotAvailableError, match="download=False"):
        emnist.load_data(cache_dir=tmp_path, download=False)
    with pytest.raises(emnist.DatasetNotAvailableError, match="not downloaded automatically"):
        emnist.load_data(mode="h5", cache_dir=tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        emnist.load_split("validation", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="mode must be one of"):
        emnist.load_data(mode="tfds", cache_dir=tmp_path)


# ---- generic file loader ------------------------------------------------------------------


def test_load_federated_file_detects_format(sqlite_cache, h5_cache):
    a = files.load_federated_file(sqlite_cache / "federated_emnist_train.sqlite")
    b = files.load_federated_file(h5_cache / "fed_emnist_train.h5")
    c = files.load_federated_file(sqlite_cache / "federated_emnist_train.sqlite", in_memory=False)
    _assert_same_fd(a, b)
    _assert_same_fd(a, c)
    assert files.detect_format(h5_cache / "fed_emnist_train.h5") == "h5"
    raw = files.load_federated_file(h5_cache / "fed_emnist_test.h5", preprocess="none")
    assert sorted(raw.get_client(IDS[1]).all_examples()) == ["label", "pixels"]
    train, test = files.load_federated_files(
        sqlite_cache / "federated_emnist_train.sqlite", h5_cache / "fed_emnist_test.h5"
    )
    assert (train.num_clients(), test.num_clients()) == (4, 4)


def test_load_federated_file_non_emnist_features(tmp_path):
    cols = {"x": np.arange(6, dtype=np.float32).reshape(3, 2), "y": np.array([0, 1, 0])}
    tff_h5.write_h5_columns(tmp_path / "g.h5", [b"a", b"b"], np.array([0, 1, 3]), cols)
    fd = files.load_federated_file(tmp_path / "g.h5")  # auto: left raw
    np.testing.assert_array_equal(fd.get_client(b"b").all_examples()["x"], cols["x"][1:])
    with pytest.raises(ValueError, match="needs features 'pixels' and 'label'"):
        files.load_federated_file(tmp_path / "g.h5", preprocess="emnist")


def test_load_federated_file_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        files.load_federated_file(tmp_path / "nope.h5")
    (tmp_path / "junk.bin").write_bytes(b"PK\x03\x04 zip, not data")
    with pytest.raises(ValueError, match="neither an HDF5"):
        files.load_federated_file(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="preprocess must be one of"):
        files.load_federated_file(tmp_path / "junk.bin", preprocess="mnist")


@pytest.mark.shared_data
def test_shared_femnist_via_generic_loader(shared_femnist_dir):
    train, test = files.load_federated_files(
        shared_femnist_dir / "femnist_leaf_train.h5", shared_femnist_dir / "femnist_leaf_test.h5"
    )
    assert (train.num_clients(), train.num_examples) == (300, 41224)
    assert (test.num_clients(), test.num_examples) == (540, 11785)
    cid, ds = next(train.clients())
    batch = next(iter(ds.padded_batch(batch_size=8)))
    assert batch["x"].shape == (8, 28, 28, 1) and batch["x"].dtype == np.float32
    assert batch["y"].dtype == np.int32
    np.testing.assert_array_equal(batch["domain_id"], np.full(8, emnist.domain_id(cid)))
