"""The EMNIST model zoo: parameter names, shapes and counts, outputs, dropout, without FedJAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.core import losses, metrics
from fedjax_exp.models import emnist

# Counts from the architectures: e.g. logistic = 784 * 62 + 62.
COUNTS_62 = {
    "create_logistic_model": 784 * 62 + 62,
    "create_dense_model": 784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62,
    "create_conv_model": (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9216 * 128 + 128) + 128 * 62 + 62,
    "create_stax_dense_model": 784 * 200 + 200 + 200 * 200 + 200 + 200 * 62 + 62,
    "create_stax_cnn_model": (9 * 64 + 64) + (28 * 28 * 64 * 256 + 256) + 256 * 62 + 62,
    "create_mlp_model": 784 * 128 + 128 + 128 * 62 + 62,
}


def _shapes(model) -> dict:
    # eval_shape: shapes without allocating (the stax CNN has 12.9M params).
    return jax.eval_shape(model.init, jax.random.PRNGKey(0))


def _count(shapes) -> int:
    return sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))


def _batch(n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.uniform(size=(n, 28, 28, 1)).astype(np.float32),
        "y": rng.integers(0, 10, size=n).astype(np.int32),
    }


def test_fedjax_published_counts():
    # The counts FedJAX documents for its EMNIST models at 62 classes.
    assert [COUNTS_62[k] for k in list(COUNTS_62)[:4]] == [48_670, 209_662, 1_206_590, 209_662]


@pytest.mark.parametrize("name", sorted(COUNTS_62))
@pytest.mark.parametrize("only_digits", [False, True])
def test_parameter_counts(name, only_digits):
    count = _count(_shapes(getattr(emnist, name)(only_digits=only_digits)))
    if only_digits:
        # The output layer shrinks from 62 to 10 classes: (fan_in + 1) * 52 fewer.
        fan_in = {"create_logistic_model": 784, "create_stax_cnn_model": 256}.get(name, 200)
        fan_in = {"create_conv_model": 128, "create_mlp_model": 128}.get(name, fan_in)
        assert count == COUNTS_62[name] - (fan_in + 1) * 52
    else:
        assert count == COUNTS_62[name]


def test_haiku_parameter_names_match_fedjax_layout():
    conv = _shapes(emnist.create_conv_model())
    assert sorted(conv) == [
        "conv_dropout_module/conv2_d",
        "conv_dropout_module/conv2_d_1",
        "conv_dropout_module/linear",
        "conv_dropout_module/linear_1",
    ]
    assert conv["conv_dropout_module/conv2_d_1"]["w"].shape == (3, 3, 32, 64)
    assert conv["conv_dropout_module/linear"]["w"].shape == (9216, 128)
    dense = _shapes(emnist.create_dense_model(hidden_units=16))
    assert {k: v["w"].shape for k, v in dense.items()} == {
        "linear": (784, 16),
        "linear_1": (16, 16),
        "linear_2": (16, 62),
    }
    assert {k: v["w"].shape for k, v in _shapes(emnist.create_logistic_model()).items()} == {
        "linear": (784, 62)
    }


def test_stax_parameter_layout():
    shapes = _shapes(emnist.create_stax_cnn_model(only_digits=True))
    assert [tuple(s.shape for s in layer) for layer in shapes] == [
        ((3, 3, 1, 64), (1, 1, 1, 64)),  # stax keeps the bias broadcastable.
        (),
        (),
        ((50176, 256), (256,)),
        (),
        ((256, 10), (10,)),
    ]


@pytest.mark.parametrize(
    "name", ["create_logistic_model", "create_dense_model", "create_stax_dense_model"]
)
def test_outputs_and_default_metrics(name):
    model = getattr(emnist, name)(only_digits=True)
    params = model.init(jax.random.PRNGKey(1))
    batch = _batch()
    out = model.apply_for_eval(params, batch)
    assert out.shape == (3, 10)
    np.testing.assert_array_equal(model.apply_for_train(params, batch, jax.random.PRNGKey(2)), out)
    assert model.eval_metrics == {
        "loss": metrics.CrossEntropyLoss(),
        "accuracy": metrics.Accuracy(),
    }
    np.testing.assert_array_equal(
        model.train_loss(batch, out), losses.cross_entropy_loss(batch, out)
    )


def test_conv_dropout_only_in_training():
    model = emnist.create_conv_model(only_digits=True)
    params = model.init(jax.random.PRNGKey(0))
    batch = _batch(2)
    eval_out = model.apply_for_eval(params, batch)
    assert eval_out.shape == (2, 10)
    np.testing.assert_array_equal(model.apply_for_eval(params, batch), eval_out)
    train_a = model.apply_for_train(params, batch, jax.random.PRNGKey(1))
    train_b = model.apply_for_train(params, batch, jax.random.PRNGKey(2))
    np.testing.assert_array_equal(
        model.apply_for_train(params, batch, jax.random.PRNGKey(1)), train_a
    )
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_out)


def test_mlp_is_the_tutorial_definition():
    model = emnist.create_mlp_model(only_digits=True, hidden_units=8)
    key = jax.random.PRNGKey(3)
    w0, b0, w1, b1 = model.init(key)
    k0, k1 = jax.random.split(key)
    np.testing.assert_array_equal(w0, jax.random.uniform(k0, [784, 8]))
    np.testing.assert_array_equal(w1, jax.random.uniform(k1, [8, 10]))
    np.testing.assert_array_equal(b0, np.zeros(8))
    np.testing.assert_array_equal(b1, np.zeros(10))
    batch = _batch()
    params = (w0, b0 + 0.1, w1, b1 - 0.2)
    x = batch["x"].reshape(3, -1).astype(np.float64)
    want = np.maximum(x @ np.asarray(w0) + 0.1, 0) @ np.asarray(w1) - 0.2
    np.testing.assert_allclose(model.apply_for_eval(params, batch), want, rtol=1e-5)
    np.testing.assert_array_equal(
        model.apply_for_train(params, batch, None), model.apply_for_eval(params, batch)
    )


def test_stax_cnn_forward_on_small_batch():
    model = emnist.create_stax_cnn_model(only_digits=True)
    params = model.init(jax.random.PRNGKey(0))
    out = model.apply_for_eval(params, _batch(2))
    assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out)))


def test_same_key_same_params():
    a = emnist.create_logistic_model().init(jax.random.PRNGKey(7))
    b = emnist.create_logistic_model().init(jax.random.PRNGKey(7))
    c = emnist.create_logistic_model().init(jax.random.PRNGKey(8))
    np.testing.assert_array_equal(a["linear"]["w"], b["linear"]["w"])
    assert not np.array_equal(a["linear"]["w"], c["linear"]["w"])
