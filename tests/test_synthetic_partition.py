"""Synthetic federated data and partitioners: shapes, coverage, determinism, skew, errors."""

from __future__ import annotations

import numpy as np
import pytest

from fedjax_exp.datasets import partition, synthetic


def _all_rows(fd, key):
    return np.concatenate([ds.all_examples()[key] for _, ds in fd.clients()])


# ---- synthetic ------------------------------------------------------------------------------


def test_synthetic_shapes_and_ids():
    fd = synthetic.make_federated_data(num_clients=7, mean_client_size=20, num_classes=5, seed=3)
    assert fd.num_clients() == 7
    assert list(fd.client_ids()) == [f"client_{i:05d}".encode() for i in range(7)]
    ex = fd.get_client(b"client_00002").all_examples()
    assert ex["x"].shape == (fd.client_size(b"client_00002"), 28, 28, 1)
    assert ex["x"].dtype == np.float32 and ex["y"].dtype == np.int32
    y = _all_rows(fd, "y")
    assert y.min() >= 0 and y.max() < 5
    assert all(n >= 1 for _, n in fd.client_sizes())


def test_synthetic_is_deterministic():
    a = synthetic.make_federated_data(num_clients=4, x_shape=(3,), seed=11)
    b = synthetic.make_federated_data(num_clients=4, x_shape=(3,), seed=11)
    c = synthetic.make_federated_data(num_clients=4, x_shape=(3,), seed=12)
    assert list(a.client_sizes()) == list(b.client_sizes())
    np.testing.assert_array_equal(_all_rows(a, "x"), _all_rows(b, "x"))
    np.testing.assert_array_equal(_all_rows(a, "y"), _all_rows(b, "y"))
    assert not np.array_equal(_all_rows(a, "x")[:3], _all_rows(c, "x")[:3])


def test_synthetic_client_sizes_lognormal_mean():
    sizes = synthetic.client_sizes(20000, 50.0, 0.5, np.random.default_rng(0))
    assert abs(sizes.mean() - 50.0) < 1.0
    assert synthetic.client_sizes(5, 10.0, 0.0, np.random.default_rng(0)).tolist() == [10] * 5


def test_synthetic_label_skew():
    def mean_classes_per_client(alpha):
        fd = synthetic.make_federated_data(
            num_clients=30,
            mean_client_size=100,
            size_sigma=0.0,
            num_classes=10,
            label_alpha=alpha,
            x_shape=(1,),
            seed=0,
        )
        return np.mean([np.unique(ds.all_examples()["y"]).size for _, ds in fd.clients()])

    assert mean_classes_per_client(0.05) < 4 < 9 < mean_classes_per_client(None)


def test_synthetic_classes_are_separable():
    fd = synthetic.make_federated_data(num_clients=5, noise=0.1, x_shape=(8,), seed=0)
    x, y = _all_rows(fd, "x"), _all_rows(fd, "y")
    means = np.stack([x[y == c].mean(0) for c in np.unique(y)])
    nearest = np.unique(y)[np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)]
    assert np.mean(nearest == y) > 0.95


def test_synthetic_domain_ids_follow_the_client_index():
    fd = synthetic.make_federated_data(num_clients=7, x_shape=(2,), num_domains=3, seed=2)
    for i, (_, ds) in enumerate(fd.clients()):
        ids = ds.all_examples()["domain_id"]
        assert ids.dtype == np.int32 and ids.tolist() == [i % 3] * len(ds)
    default = synthetic.make_federated_data(num_clients=5, x_shape=(2,), seed=2)
    assert np.unique(_all_rows(default, "domain_id")).tolist() == [0, 1]  # As EMNIST.


def test_synthetic_domain_shift_offsets_each_domain():
    kwargs = dict(num_clients=6, x_shape=(4,), seed=5)
    plain = synthetic.make_federated_data(**kwargs, num_domains=3)
    # Without a shift the domains are labels only: x does not depend on num_domains.
    np.testing.assert_array_equal(
        _all_rows(plain, "x"), _all_rows(synthetic.make_federated_data(**kwargs), "x")
    )
    shifted = synthetic.make_federated_data(**kwargs, num_domains=3, domain_shift=2.0)
    np.testing.assert_array_equal(_all_rows(shifted, "y"), _all_rows(plain, "y"))
    offset = _all_rows(shifted, "x") - _all_rows(plain, "x")
    domains = _all_rows(shifted, "domain_id")
    styles = [offset[domains == d] for d in range(3)]
    for style in styles:  # One fixed offset per domain, shared by all its examples.
        np.testing.assert_allclose(style, np.broadcast_to(style[0], style.shape), atol=1e-5)
    assert not np.allclose(styles[0][0], styles[1][0])


def test_synthetic_bad_arguments():
    with pytest.raises(ValueError, match="num_clients must be a positive integer"):
        synthetic.make_federated_data(num_clients=0)
    with pytest.raises(ValueError, match="label_alpha must be positive"):
        synthetic.make_federated_data(label_alpha=0.0)
    with pytest.raises(ValueError, match="mean_client_size"):
        synthetic.make_federated_data(mean_client_size=0)
    with pytest.raises(ValueError, match="num_domains must be a positive integer, got 0"):
        synthetic.make_federated_data(num_domains=0)
    with pytest.raises(ValueError, match="domain_shift must be >= 0, got -1"):
        synthetic.make_federated_data(domain_shift=-1)


# ---- partition ------------------------------------------------------------------------------


@pytest.fixture()
def centralized():
    rng = np.random.default_rng(0)
    n = 600
    return {"x": np.arange(n, dtype=np.float32)[:, None], "y": rng.integers(0, 10, n)}


def test_iid_partition_covers_every_example_once(centralized):
    fd = partition.partition_iid(centralized, num_clients=7, seed=1)
    sizes = [n for _, n in fd.client_sizes()]
    assert sum(sizes) == 600 and max(sizes) - min(sizes) <= 1
    np.testing.assert_array_equal(np.sort(_all_rows(fd, "x")[:, 0]), np.arange(600))
    # Rows stay paired: x is the example index, so y must be that example's label.
    x = _all_rows(fd, "x")[:, 0].astype(int)
    np.testing.assert_array_equal(_all_rows(fd, "y"), centralized["y"][x])


def test_iid_partition_deterministic(centralized):
    a = partition.partition_iid(centralized, 5, seed=3)
    b = partition.partition_iid(centralized, 5, seed=3)
    c = partition.partition_iid(centralized, 5, seed=4)
    np.testing.assert_array_equal(_all_rows(a, "x"), _all_rows(b, "x"))
    assert not np.array_equal(_all_rows(a, "x"), _all_rows(c, "x"))


def test_dirichlet_partition_coverage_and_skew(centralized):
    skewed = partition.partition_dirichlet(centralized, 10, alpha=0.05, seed=0)
    flat = partition.partition_dirichlet(centralized, 10, alpha=1000.0, seed=0)
    for fd in (skewed, flat):
        x = _all_rows(fd, "x")[:, 0].astype(int)
        np.testing.assert_array_equal(np.sort(x), np.arange(600))
        np.testing.assert_array_equal(_all_rows(fd, "y"), centralized["y"][x])
        assert all(n >= 1 for _, n in fd.client_sizes())

    def mean_classes(fd):
        return np.mean([np.unique(ds.all_examples()["y"]).size for _, ds in fd.clients()])

    assert mean_classes(skewed) < 4 and mean_classes(flat) == 10


def test_dirichlet_deterministic_and_no_empty_clients(centralized):
    a = partition.partition_dirichlet(centralized, 50, alpha=0.01, seed=5)
    b = partition.partition_dirichlet(centralized, 50, alpha=0.01, seed=5)
    c = partition.partition_dirichlet(centralized, 50, alpha=0.01, seed=6)
    assert list(a.client_sizes()) == list(b.client_sizes())
    for key in ("x", "y"):  # The same rows for the same clients, not only the same sizes.
        np.testing.assert_array_equal(_all_rows(a, key), _all_rows(b, key))
    assert list(a.client_sizes()) != list(c.client_sizes())  # The seed matters.
    assert a.num_clients() == 50 and min(n for _, n in a.client_sizes()) >= 1


def test_partition_by_assignment_keeps_order():
    arrays = {"v": np.arange(6)}
    fd = partition.partition_by_assignment(arrays, np.array([1, 0, 1, 0, 2, 1]), 3)
    assert [ds.all_examples()["v"].tolist() for _, ds in fd.clients()] == [[1, 3], [0, 2, 5], [4]]


def test_partition_bad_arguments(centralized):
    with pytest.raises(ValueError, match="num_clients must be a positive integer"):
        partition.partition_iid(centralized, 0)
    with pytest.raises(ValueError, match="exceeds the number of examples"):
        partition.partition_iid(centralized, 601)
    with pytest.raises(ValueError, match="alpha must be a positive"):
        partition.partition_dirichlet(centralized, 5, alpha=0)
    with pytest.raises(ValueError, match="label_key 'label' is not a feature"):
        partition.partition_dirichlet(centralized, 5, alpha=1.0, label_key="label")
    with pytest.raises(ValueError, match="same number of examples"):
        partition.partition_iid({"x": np.zeros(3), "y": np.zeros(4)}, 2)
    with pytest.raises(ValueError, match="received no examples"):
        partition.partition_by_assignment({"v": np.arange(3)}, np.array([0, 0, 2]), 3)


def test_synthetic_load_data_splits_each_client():
    full = synthetic.make_federated_data(
        num_clients=6,
        mean_client_size=10,
        num_classes=62,
        x_shape=(2,),
        seed=4,
        min_client_size=2,
    )
    train, test = synthetic.load_data(
        num_clients=6, mean_client_size=10, test_fraction=0.25, x_shape=(2,), seed=4
    )
    assert list(train.client_ids()) == list(test.client_ids()) == list(full.client_ids())
    for (cid, n), (_, n_train), (_, n_test) in zip(
        full.client_sizes(), train.client_sizes(), test.client_sizes(), strict=True
    ):
        assert n_test == min(max(1, round(n * 0.25)), n - 1) and n_train == n - n_test
        whole = full.get_client(cid).all_examples()
        for k in ("x", "y", "domain_id"):
            joined = np.concatenate(
                [train.get_client(cid).all_examples()[k], test.get_client(cid).all_examples()[k]]
            )
            np.testing.assert_array_equal(joined, whole[k])
    with pytest.raises(ValueError, match="test_fraction"):
        synthetic.load_data(test_fraction=1.0)
