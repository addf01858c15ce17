"""The validation split: disjoint, complete, seeded, the same on every store, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import compose_config

from fedjax_exp.core.federated_data import SubsetFederatedData, padded_batch_federated_data
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.core.sqlite_federated_data import SQLiteFederatedData, write_sqlite
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY
from fedjax_exp.datasets import synthetic
from fedjax_exp.datasets.validation_split import (
    apply_validation_split,
    held_out_clients,
    held_out_examples,
    split_train_validation,
)

# Client sizes chosen to exercise the rounding rule at fraction 0.25: empty, one example (kept
# for training), halves that round up (2 -> 0.5 -> 1, 10 -> 2.5 -> 3) and plain cases.
SIZES = {b"e": 0, b"f": 1, b"g": 2, b"h": 3, b"i": 4, b"j": 5, b"k": 10, b"l": 37}
HELD_AT_QUARTER = {b"e": 0, b"f": 0, b"g": 1, b"h": 1, b"i": 1, b"j": 1, b"k": 3, b"l": 9}


def make_columns(with_empty: bool = True):
    """Ids (deliberately unsorted), offsets and columns with a unique ``row`` number."""
    ids = [b"l", b"e", b"g", b"k", b"f", b"j", b"h", b"i"]
    if not with_empty:  # The SQLite format holds no empty clients.
        ids.remove(b"e")
    sizes = [SIZES[i] for i in ids]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    rng = np.random.default_rng(7)
    columns = {
        "row": np.arange(n, dtype=np.int64),
        "x": rng.random((n, 2, 3), dtype=np.float32),
        "y": rng.integers(0, 10, n).astype(np.int32),
    }
    return ids, offsets, columns


@pytest.fixture
def store() -> InMemoryFederatedData:
    return InMemoryFederatedData.from_columns(*make_columns())


@pytest.fixture
def sqlite_store(tmp_path):
    path = tmp_path / "train.sqlite"
    write_sqlite(path, *make_columns(with_empty=False))
    fd = SQLiteFederatedData.new(path)
    yield fd
    fd.close()


def client_examples(fd) -> dict[bytes, dict[str, np.ndarray]]:
    """Each client's examples as the store yields them (after any client preprocessor)."""
    return {cid: {k: np.asarray(v) for k, v in ds.raw_examples.items()} for cid, ds in fd.clients()}


def check_partition(full, train, validation) -> None:
    """Train and validation are disjoint and, client by client and row for row in every
    feature, together equal the input (each part keeps the input's row order)."""
    full_ex, train_ex, val_ex = (client_examples(fd) for fd in (full, train, validation))
    assert set(train_ex) | set(val_ex) == set(full_ex)
    for cid, examples in full_ex.items():
        parts = [p[cid] for p in (train_ex, val_ex) if cid in p]
        rows = np.concatenate([p["row"] for p in parts])
        assert len(rows) == len(examples["row"]) and len(set(rows.tolist())) == len(rows)
        for part in parts:
            assert np.all(np.diff(part["row"]) > 0)  # Input order within each part.
        order = np.argsort(rows)
        for name, column in examples.items():
            merged = np.concatenate([p[name] for p in parts])[order]
            np.testing.assert_array_equal(merged, column)
            assert merged.dtype == column.dtype


def held_rows(validation) -> dict[bytes, list[int]]:
    return {cid: ex["row"].tolist() for cid, ex in client_examples(validation).items()}


# ---- examples mode ------------------------------------------------------------------------


def test_examples_mode_rounding_and_partition(store):
    train, validation = split_train_validation(store, "examples", fraction=0.25, seed=3)
    check_partition(store, train, validation)
    # Train keeps every client, even empty ones; validation only those holding out examples.
    assert list(train.client_ids()) == sorted(SIZES)
    assert list(validation.client_ids()) == sorted(c for c, k in HELD_AT_QUARTER.items() if k)
    assert dict(validation.client_sizes()) == {c: k for c, k in HELD_AT_QUARTER.items() if k}
    assert dict(train.client_sizes()) == {c: SIZES[c] - k for c, k in HELD_AT_QUARTER.items()}
    assert (train.num_examples, validation.num_examples) == (46, 16)


def test_examples_mode_large_fraction_keeps_one_training_example(store):
    train, validation = split_train_validation(store, "examples", fraction=0.99, seed=0)
    check_partition(store, train, validation)
    assert dict(train.client_sizes()) == {c: min(n, 1) for c, n in SIZES.items()}


def test_pinned_split_values():
    # The split is part of an experiment's definition: pin it so it cannot drift silently.
    offsets = np.array([0, 5, 12])
    assert np.flatnonzero(held_out_examples([b"a", b"b"], offsets, 0.3, 0)).tolist() == [
        0,
        1,
        5,
        6,
    ]
    assert np.flatnonzero(held_out_examples([b"a", b"b"], offsets, 0.3, 1)).tolist() == [
        0,
        1,
        7,
        9,
    ]
    ids = [b"%d" % i for i in range(10)]
    assert np.flatnonzero(held_out_clients(ids, 0.3, 0)).tolist() == [0, 1, 4]
    assert np.flatnonzero(held_out_clients(ids, 0.3, 1)).tolist() == [2, 6, 8]


def test_held_out_examples_are_uniform_over_positions():
    # Over 1,000 seeds every position of a 10-example client is held out ~30% of the time
    # (3 of 10), not e.g. always the first or last rows; binomial sd is 0.0145.
    counts = np.zeros(10)
    for seed in range(1000):
        counts += held_out_examples([b"c"], np.array([0, 10]), 0.3, seed)
    assert counts.sum() == 3000
    assert np.all(np.abs(counts / 1000 - 0.3) < 0.06)


def test_examples_split_of_a_client_ignores_other_clients(store):
    # A client's held-out rows depend on (seed, its id, its size) only: splitting a slice of
    # the clients gives each of them the same rows as splitting the whole store.
    _, whole = split_train_validation(store, "examples", fraction=0.25, seed=5)
    _, part = split_train_validation(store.slice(b"h", b"l"), "examples", fraction=0.25, seed=5)
    expected = {c: r for c, r in held_rows(whole).items() if b"h" <= c < b"l"}
    assert held_rows(part) == expected


# ---- clients mode -------------------------------------------------------------------------


def test_clients_mode_holds_out_whole_clients(store):
    train, validation = split_train_validation(store, "clients", fraction=0.25, seed=1)
    check_partition(store, train, validation)
    train_ids, val_ids = set(train.client_ids()), set(validation.client_ids())
    assert not train_ids & val_ids
    assert len(val_ids) == 2  # round(0.25 * 8)
    for cid in val_ids:  # Whole clients: every example of a held-out client is validation.
        assert validation.client_size(cid) == SIZES[cid]
    mask = held_out_clients(sorted(SIZES), 0.25, 1)
    assert val_ids == {c for c, held in zip(sorted(SIZES), mask, strict=True) if held}


def test_held_out_clients_do_not_depend_on_id_order():
    ids = [b"%03d" % i for i in range(50)]
    mask = held_out_clients(ids, 0.2, 4)
    reversed_mask = held_out_clients(ids[::-1], 0.2, 4)[::-1]
    np.testing.assert_array_equal(mask, reversed_mask)
    assert mask.sum() == 10


# ---- seeds --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clients", "examples"])
def test_same_seed_same_split_other_seed_other_split(mode):
    train_data, _ = synthetic.load_data(num_clients=30, mean_client_size=20, seed=0)

    def held(seed):
        return held_rows_by_x(split_train_validation(train_data, mode, 0.2, seed)[1])

    first = held(0)
    assert held(0) == first
    assert held(1) != first


def held_rows_by_x(validation) -> dict[bytes, set[bytes]]:
    return {
        cid: {row.tobytes() for row in ex["x"]} for cid, ex in client_examples(validation).items()
    }


# ---- disjoint from test (real train/test pair) ---------------------------------------------


@pytest.mark.parametrize("mode", ["clients", "examples"])
def test_validation_is_disjoint_from_train_and_test(mode):
    train_data, test_data = synthetic.load_data(num_clients=40, mean_client_size=30, seed=2)
    train, validation = split_train_validation(train_data, mode, 0.1, 0)

    def rows(fd):
        return [
            row.tobytes() + bytes(int(y).to_bytes(4, "little"))
            for _, ds in fd.clients()
            for row, y in zip(ds.raw_examples["x"], ds.raw_examples["y"], strict=True)
        ]

    full, tr, val, test = rows(train_data), rows(train), rows(validation), rows(test_data)
    assert len(set(full)) == len(full)  # Synthetic rows are unique, so sets compare exactly.
    assert val and not set(val) & set(tr) and not set(val) & set(test)
    assert sorted(tr + val) == sorted(full)
    # The test split is untouched.
    assert rows(test_data) == test


# ---- other stores ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clients", "examples"])
def test_sqlite_store_gives_the_same_split(sqlite_store, mode):
    train, validation = split_train_validation(sqlite_store, mode, 0.25, seed=9)
    check_partition(sqlite_store, train, validation)
    same = InMemoryFederatedData.from_columns(*make_columns(with_empty=False))
    fast_train, fast_validation = split_train_validation(same, mode, 0.25, seed=9)
    assert held_rows(validation) == held_rows(fast_validation)
    assert held_rows(train) == held_rows(fast_train)
    kind = SubsetFederatedData if mode == "clients" else InMemoryFederatedData
    assert isinstance(train, kind) and isinstance(validation, kind)


@pytest.mark.parametrize("mode", ["clients", "examples"])
def test_subset_federated_data_input(store, mode):
    subset = SubsetFederatedData(store, [b"g", b"h", b"j", b"k", b"l"])
    train, validation = split_train_validation(subset, mode, 0.4, seed=2)
    check_partition(subset, train, validation)
    # The generic path agrees with the column store over the same clients.
    same = InMemoryFederatedData(client_examples(subset))
    _, fast_validation = split_train_validation(same, mode, 0.4, seed=2)
    assert held_rows(validation) == held_rows(fast_validation)


# ---- preprocessors ----------------------------------------------------------------------------


def add_parity(client_id, examples):
    return {**examples, "parity": examples["row"] % 2 + len(client_id)}


def double_x(batch):
    return {**batch, "x": batch["x"] * 2}


@pytest.mark.parametrize("mode", ["clients", "examples"])
@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_preprocessors_carry_over(store, sqlite_store, mode, backend):
    base = store if backend == "memory" else sqlite_store
    fd = base.preprocess_client(add_parity).preprocess_batch(double_x)
    train, validation = split_train_validation(fd, mode, 0.25, seed=0)
    # Client examples (after the client preprocessor) partition the input's.
    check_partition(fd, train, validation)
    # Batches run the batch preprocessor: x doubled, `parity` present.
    by_row = {}
    for _, ds in fd.clients():
        ex = ds.all_examples()
        by_row.update(
            {int(r): (x, p) for r, x, p in zip(ex["row"], ex["x"], ex["parity"], strict=True)}
        )
    for part in (train, validation):
        for _, ds in part.clients():
            ex = ds.all_examples()
            for r, x, p in zip(ex["row"], ex["x"], ex["parity"], strict=True):
                np.testing.assert_array_equal(x, by_row[int(r)][0])
                assert p == by_row[int(r)][1]
    if backend == "memory":
        assert train.client_preprocessor.fns == (add_parity,)
        assert validation.batch_preprocessor.fns == (double_x,)


def test_column_store_outputs_keep_column_batching(store):
    train, validation = split_train_validation(store, "examples", 0.25, seed=0)
    assert train.supports_column_batching and validation.supports_column_batching
    batches = list(padded_batch_federated_data(validation, batch_size=4))
    rows = np.concatenate([b["row"][b[EXAMPLE_MASK_KEY]] for b in batches])
    assert sorted(rows.tolist()) == sorted(r for rs in held_rows(validation).values() for r in rs)


# ---- settings and errors --------------------------------------------------------------------


def test_apply_validation_split_settings(store):
    assert apply_validation_split(store, None) == (store, None)
    assert apply_validation_split(store, {"mode": "none", "fraction": 0.3}) == (store, None)
    assert apply_validation_split(store, {"mode": None}) == (store, None)  # YAML null
    train, validation = apply_validation_split(store, {"mode": "examples", "fraction": 0.25})
    expected = split_train_validation(store, "examples", 0.25, 0)
    assert held_rows(validation) == held_rows(expected[1])
    assert held_rows(train) == held_rows(expected[0])


def test_apply_validation_split_from_composed_config():
    cfg = compose_config(["dataset.validation.mode=clients", "dataset.validation.fraction=0.2"])
    train_data, _ = synthetic.load_data(num_clients=20, mean_client_size=10, seed=0)
    train, validation = apply_validation_split(train_data, cfg.dataset.validation)
    assert (train.num_clients(), validation.num_clients()) == (16, 4)


@pytest.mark.parametrize("dataset", ["sample", "synthetic", "emnist", "emnist_digits", "files"])
def test_validation_is_off_by_default(dataset):
    cfg = compose_config([f"dataset={dataset}"])
    assert dict(cfg.dataset.validation) == {"mode": "none", "fraction": 0.1, "seed": 0}
    assert cfg.optimized_metric == "final/test/accuracy"


def test_optuna_preset_selects_on_validation():
    cfg = compose_config(["hparams_search=lr_optuna", "dataset=synthetic"])
    assert cfg.optimized_metric == "final/validation/accuracy"
    assert cfg.dataset.validation.mode == "examples"
    assert cfg.dataset.name == "synthetic"


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"mode": "holdout"}, r"dataset\.validation\.mode='holdout' is not a validation mode"),
        ({"mode": "clients", "fraction": 0}, r"dataset\.validation\.fraction=0 must be"),
        ({"mode": "clients", "fraction": 1.0}, r"dataset\.validation\.fraction=1\.0 must be"),
        ({"mode": "examples", "fraction": -0.1}, r"dataset\.validation\.fraction=-0\.1"),
        ({"mode": "examples", "fraction": "0.1"}, r"dataset\.validation\.fraction='0\.1'"),
        ({"mode": "examples", "fraction": True}, r"dataset\.validation\.fraction=True"),
        ({"mode": "examples", "seed": -1}, r"dataset\.validation\.seed=-1 must be an integer"),
        ({"mode": "examples", "fractoin": 0.2}, r"unknown key\(s\) dataset\.validation\.fractoin"),
        # 0.05 of 8 clients rounds to 0 held out, 0.95 to all 8.
        ({"mode": "clients", "fraction": 0.05}, r"holds out 0 clients, leaving no validation"),
        ({"mode": "clients", "fraction": 0.95}, r"holds out 8 clients, leaving no training"),
    ],
)
def test_bad_settings_raise_one_clear_error(store, settings, match):
    with pytest.raises(ValueError, match=match):
        apply_validation_split(store, settings)


def test_bad_arguments_of_the_library_function(store):
    with pytest.raises(ValueError, match="mode='none' holds nothing out"):
        split_train_validation(store, "none")
    with pytest.raises(ValueError, match=r"fraction=1\.5 must be a number strictly between"):
        split_train_validation(store, "examples", fraction=1.5)


def test_examples_mode_with_only_tiny_clients_is_an_error():
    tiny = InMemoryFederatedData({b"a": {"x": np.zeros(1)}, b"b": {"x": np.ones(1)}})
    with pytest.raises(ValueError, match=r"holds out no example: every client is too small"):
        split_train_validation(tiny, "examples", fraction=0.5)
    # With two examples a client holds one out (0.5 * 2 = 1).
    fd = InMemoryFederatedData({b"a": {"x": np.arange(2.0)}})
    train, validation = split_train_validation(fd, "examples", fraction=0.5)
    assert (train.num_examples, validation.num_examples) == (1, 1)


def test_clients_mode_with_an_empty_side_is_an_error():
    # Two clients, one of them empty, half held out: one side ends up without examples.
    fd = InMemoryFederatedData({b"a": {"x": np.zeros(0)}, b"b": {"x": np.ones(3)}})
    with pytest.raises(ValueError, match=r"mode=clients: the (validation|training) clients"):
        split_train_validation(fd, "clients", fraction=0.5)
