"""The centralized train step (fedjax_exp.training.steps) against an independent reference:
the public model_grad and model_per_example_loss, by hand, on fixed batches (padded and
all-padding ones included)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import dropout_logistic_model

from fedjax_exp.core import models, optimizers
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY
from fedjax_exp.training import steps

LEARNING_RATE = 0.1


@pytest.fixture(scope="module")
def model():
    return dropout_logistic_model()  # Consumes the rng: checks it reaches the model.


def _batch(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.random((n, 28, 28, 1), dtype=np.float32),
        "y": rng.integers(0, 10, n).astype(np.int32),
    }


def _step(model, batch, rng):
    optimizer = optimizers.sgd(LEARNING_RATE)
    params = model.init(jax.random.PRNGKey(0))
    state = steps.TrainState(params=params, opt_state=optimizer.init(params))
    update = jax.jit(steps.centralized_update(model, optimizer))
    new_state, scalars = update(state, batch, rng)
    return params, new_state.params, float(scalars["loss"])


def test_sgd_step_is_params_minus_lr_times_model_grad(model):
    batch, rng = _batch(), jax.random.PRNGKey(3)
    params, new_params, loss = _step(model, batch, rng)
    grads = models.model_grad(model)(params, batch, rng)
    per_example = models.model_per_example_loss(model)(params, batch, rng)
    assert loss == pytest.approx(float(jnp.mean(per_example)), rel=1e-6)
    for p, g, q in zip(
        jax.tree_util.tree_leaves(params),
        jax.tree_util.tree_leaves(grads),
        jax.tree_util.tree_leaves(new_params),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(q), np.asarray(p - LEARNING_RATE * g), atol=1e-7)
        assert float(jnp.max(jnp.abs(g))) > 0  # A real step, not a no-op.


def test_padding_rows_change_neither_loss_nor_gradient():
    # Deterministic model: the padded batch's real rows see the same forward pass.
    from fedjax_exp.models import emnist

    model = emnist.create_logistic_model(only_digits=True)
    real, rng = _batch(n=5), jax.random.PRNGKey(0)
    padded = {k: np.concatenate([v, np.ones_like(v[:3])]) for k, v in real.items()}
    padded[EXAMPLE_MASK_KEY] = np.array([True] * 5 + [False] * 3)
    _, from_real, loss_real = _step(model, real, rng)
    _, from_padded, loss_padded = _step(model, padded, rng)
    assert loss_padded == pytest.approx(loss_real, rel=1e-6)
    for a, b in zip(
        jax.tree_util.tree_leaves(from_real), jax.tree_util.tree_leaves(from_padded), strict=True
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)


def test_an_all_padding_batch_is_a_zero_step(model):
    batch = _batch(n=4)
    batch[EXAMPLE_MASK_KEY] = np.zeros(4, dtype=bool)
    params, new_params, loss = _step(model, batch, jax.random.PRNGKey(0))
    assert loss == 0.0
    for p, q in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new_params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(q), np.asarray(p))
