"""Parity with FedJAX 0.0.17: identical inputs through both libraries give equal outputs.

Covers the EMNIST zoo (init, apply, per-example loss, gradients), evaluate_model and
evaluate_average_loss on padded batches, optimizer updates and tree utilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

fedjax = pytest.importorskip("fedjax")

from fedjax_exp.core import models, optimizers, regularizers, tree_util  # noqa: E402
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY  # noqa: E402
from fedjax_exp.models import emnist  # noqa: E402

ZOO = [
    "create_logistic_model",
    "create_dense_model",
    # Compiling the CNN's gradients in both libraries takes 5-7 s; its forward pass (params,
    # dropout) stays in the default suite via test_conv_forward_parity.
    pytest.param("create_conv_model", marks=pytest.mark.slow),
    "create_stax_dense_model",
]


pytestmark = pytest.mark.usefixtures("fedjax_on_current_jax")


def assert_trees_equal(ours, theirs):
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(
        jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True
    ):
        assert np.shape(a) == np.shape(b)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _examples(n: int, seed: int, num_classes: int = 62) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.uniform(size=(n, 28, 28, 1)).astype(np.float32),
        "y": rng.integers(0, num_classes, size=n).astype(np.int32),
    }


def _padded_batches(n: int, batch_size: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Batches of ``batch_size``; the last is padded with garbage rows and a False mask."""
    data = _examples(n, seed)
    batches = []
    for start in range(0, n, batch_size):
        piece = {k: v[start : start + batch_size] for k, v in data.items()}
        real = len(piece["y"])
        pad = batch_size - real
        piece = {
            "x": np.concatenate([piece["x"], np.full((pad, 28, 28, 1), 5.0, np.float32)]),
            "y": np.concatenate([piece["y"], np.full(pad, 7, np.int32)]),
            EXAMPLE_MASK_KEY: np.arange(batch_size) < real,
        }
        batches.append(piece)
    return batches


@functools.cache
def _pair(name: str):
    """(fedjax_exp model, FedJAX model), built once per module."""
    ours = getattr(emnist, name)()
    theirs = getattr(fedjax.models.emnist, name)()
    return ours, theirs


@pytest.mark.parametrize("name", ZOO)
def test_init_apply_loss_and_grad_parity(name):
    ours, theirs = _pair(name)
    key = jax.random.PRNGKey(42)
    params = ours.init(key)
    assert_trees_equal(params, theirs.init(key))

    batch = _padded_batches(5, 6, seed=1)[0]  # 5 real examples, 1 padding row.
    rng = jax.random.PRNGKey(7)
    assert_trees_equal(ours.apply_for_eval(params, batch), theirs.apply_for_eval(params, batch))
    train_out = ours.apply_for_train(params, batch, rng)
    assert_trees_equal(train_out, theirs.apply_for_train(params, batch, rng))
    assert_trees_equal(ours.train_loss(batch, train_out), theirs.train_loss(batch, train_out))
    assert_trees_equal(
        models.model_per_example_loss(ours)(params, batch, rng),
        fedjax.model_per_example_loss(theirs)(params, batch, rng),
    )
    assert_trees_equal(
        models.model_grad(ours)(params, batch, rng), fedjax.model_grad(theirs)(params, batch, rng)
    )
    if name == "create_conv_model":
        return  # Compiling more CNN gradients adds little but time.
    reg = regularizers.l2_regularizer(1e-3)
    assert_trees_equal(
        models.model_grad(ours, reg)(params, batch, rng),
        fedjax.model_grad(theirs, reg)(params, batch, rng),
    )
    unmasked = {k: v for k, v in batch.items() if k != EXAMPLE_MASK_KEY}
    assert_trees_equal(
        models.model_grad(ours)(params, unmasked, rng),
        fedjax.model_grad(theirs)(params, unmasked, rng),
    )


def test_conv_forward_parity():
    """The default suite's CNN check: same params for a key, same outputs with dropout."""
    ours, theirs = _pair("create_conv_model")
    key = jax.random.PRNGKey(42)
    params = ours.init(key)
    assert_trees_equal(params, theirs.init(key))
    batch = _padded_batches(5, 6, seed=1)[0]
    rng = jax.random.PRNGKey(7)
    assert_trees_equal(ours.apply_for_eval(params, batch), theirs.apply_for_eval(params, batch))
    train_out = ours.apply_for_train(params, batch, rng)
    assert_trees_equal(train_out, theirs.apply_for_train(params, batch, rng))
    assert_trees_equal(ours.train_loss(batch, train_out), theirs.train_loss(batch, train_out))


@pytest.mark.parametrize("name", ["create_logistic_model", "create_conv_model"])
def test_evaluate_model_parity_on_padded_batches(name):
    ours, theirs = _pair(name)
    params = theirs.init(jax.random.PRNGKey(3))
    batches = _padded_batches(11, 4, seed=2)
    got = models.evaluate_model(ours, params, batches)
    want = fedjax.evaluate_model(theirs, params, batches)
    # Same names; ours keep the model's metric order, FedJAX's come back sorted by jit.
    assert list(got) == ["loss", "accuracy"] and sorted(want) == ["accuracy", "loss"]
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))
    # And both equal the unpadded evaluation of the 11 real examples.
    real = _examples(11, seed=2)
    np.testing.assert_allclose(
        got["loss"], models.evaluate_model(ours, params, [real])["loss"], rtol=1e-6
    )


def test_evaluate_model_blocks_match_fedjax_bit_for_bit(monkeypatch):
    # 11 batches of 16: ours dispatches a block of 8 batches and 3 of 1, FedJAX one batch per
    # step; the numbers must still be the same bits.
    ours, theirs = _pair("create_logistic_model")
    params = theirs.init(jax.random.PRNGKey(5))
    batches = _padded_batches(171, 16, seed=6)
    assert len(batches) == 11
    dispatched = []
    evaluate_block = models._evaluate_block

    def counting(model, params, block, stats):
        dispatched.append(len(block))
        return evaluate_block(model, params, block, stats)

    monkeypatch.setattr(models, "_evaluate_block", counting)
    got = models.evaluate_model(ours, params, batches)
    assert dispatched == [8, 1, 1, 1]
    want = fedjax.evaluate_model(theirs, params, batches)
    for key in want:
        assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes()


def test_evaluate_average_loss_parity():
    ours, theirs = _pair("create_conv_model")  # Dropout: the rng sequence matters.
    params = theirs.init(jax.random.PRNGKey(5))
    batches = _padded_batches(7, 4, seed=4)
    reg = regularizers.l2_regularizer(0.01)
    got = models.evaluate_average_loss(
        params, batches, jax.random.PRNGKey(9), models.model_per_example_loss(ours), reg
    )
    want = fedjax.evaluate_average_loss(
        params, batches, jax.random.PRNGKey(9), fedjax.model_per_example_loss(theirs), reg
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def _optimizer_cases():
    return [
        ("sgd", {}),
        ("sgd", {"momentum": 0.9}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),
        ("adam", {}),
        ("adagrad", {}),
        ("rmsprop", {}),
        ("rmsprop", {"centered": True, "momentum": 0.5}),
        ("yogi", {}),
        ("adafactor", {"min_dim_size_to_factor": 4}),
    ]


@pytest.mark.parametrize(("name", "kwargs"), _optimizer_cases())
def test_optimizer_update_parity(name, kwargs):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "b": jnp.zeros(6)}
    ours = getattr(optimizers, name)(learning_rate=0.05, **kwargs)
    theirs = getattr(fedjax.optimizers, name)(learning_rate=0.05, **kwargs)
    state_a, state_b = ours.init(params), theirs.init(params)
    params_a = params_b = params
    for step in range(3):
        grads = {
            "w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
            "b": jnp.full(6, 0.1 * step, jnp.float32),
        }
        state_a, params_a = ours.apply(grads, state_a, params_a)
        state_b, params_b = theirs.apply(grads, state_b, params_b)
        assert_trees_equal(params_a, params_b)
    assert_trees_equal(state_a, state_b)


def test_tree_util_parity():
    a = {"x": jnp.array([1.0, -2.0, 3.0]), "y": jnp.ones((2, 2))}
    b = {"x": jnp.array([0.5, 0.25, -1.0]), "y": jnp.full((2, 2), 3.0)}
    ft = fedjax.tree_util
    assert_trees_equal(tree_util.tree_add(a, b), ft.tree_add(a, b))
    assert_trees_equal(tree_util.tree_weight(a, 0.3), ft.tree_weight(a, 0.3))
    assert_trees_equal(tree_util.tree_inverse_weight(a, 4.0), ft.tree_inverse_weight(a, 4.0))
    assert_trees_equal(tree_util.tree_zeros_like(a), ft.tree_zeros_like(a))
    assert_trees_equal(tree_util.tree_sum([a, b, a]), ft.tree_sum([a, b, a]))
    assert_trees_equal(
        tree_util.tree_mean([(a, 1.0), (b, 2.0)]), ft.tree_mean([(a, 1.0), (b, 2.0)])
    )
    assert tree_util.tree_size(a) == int(ft.tree_size(a))
    np.testing.assert_array_equal(tree_util.tree_l2_norm(a), ft.tree_l2_norm(a))
    assert_trees_equal(
        tree_util.tree_clip_by_global_norm(a, 1.0), ft.tree_clip_by_global_norm(a, 1.0)
    )
