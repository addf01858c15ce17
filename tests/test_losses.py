"""Per-example losses and regularizers against NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.core import losses, regularizers


def _np_cross_entropy(y: np.ndarray, logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -log_probs[np.arange(len(y)), y]


def _np_hinge(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    # Crammer-Singer: worst margin violation over the wrong classes, floored at 0.
    out = []
    for label, s in zip(y, scores.astype(np.float64), strict=True):
        others = np.delete(s, label)
        out.append(max(0.0, np.max(others) + 1.0 - s[label]))
    return np.array(out)


@pytest.fixture
def batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
    y = rng.integers(0, 5, size=7)
    return y, logits


def test_softmax_cross_entropy_matches_numpy(batch):
    y, logits = batch
    got = losses.softmax_cross_entropy(jnp.asarray(y), jnp.asarray(logits))
    assert got.shape == (7,)
    np.testing.assert_allclose(got, _np_cross_entropy(y, logits), rtol=1e-5)


def test_multiclass_hinge_matches_numpy(batch):
    y, logits = batch
    got = losses.multiclass_hinge(jnp.asarray(y), jnp.asarray(logits))
    assert got.shape == (7,)
    np.testing.assert_allclose(got, _np_hinge(y, logits), rtol=1e-6, atol=1e-6)


def test_hinge_hand_values():
    scores = jnp.array([[3.0, 1.0, 0.0], [0.5, 1.0, 0.8], [0.0, 0.0, 0.0]])
    y = jnp.array([0, 1, 2])
    # Margin >= 1 -> 0; true class ahead by 0.2 -> 0.8; tie -> 1.
    np.testing.assert_allclose(losses.multiclass_hinge(y, scores), [0.0, 0.8, 1.0], atol=1e-6)


def test_train_loss_signature_and_target_key(batch):
    y, logits = batch
    b = {"x": np.zeros((7, 2)), "y": y, "label": y[::-1].copy()}
    np.testing.assert_allclose(
        losses.cross_entropy_loss(b, logits), _np_cross_entropy(y, logits), rtol=1e-5
    )
    np.testing.assert_allclose(losses.hinge_loss(b, logits), _np_hinge(y, logits), atol=1e-6)
    by_label = losses.get_train_loss("hinge", target_key="label")
    np.testing.assert_allclose(by_label(b, logits), _np_hinge(y[::-1], logits), atol=1e-6)


def test_get_train_loss_is_cached_and_validates():
    assert losses.get_train_loss("cross_entropy") is losses.cross_entropy_loss
    assert losses.get_train_loss("hinge", "label") is losses.get_train_loss("hinge", "label")
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        losses.get_train_loss("mse")


def test_missing_target_key_is_a_clear_error(batch):
    _, logits = batch
    with pytest.raises(KeyError, match="batch\\['label'\\].*target_key"):
        losses.cross_entropy_loss({"y": np.zeros(7, int)}, logits, target_key="label")


def test_cross_entropy_matches_fedjax_metrics_helper(batch):
    fedjax = pytest.importorskip("fedjax")
    y, logits = batch
    np.testing.assert_array_equal(
        losses.softmax_cross_entropy(jnp.asarray(y), jnp.asarray(logits)),
        fedjax.metrics.unreduced_cross_entropy_loss(jnp.asarray(y), jnp.asarray(logits)),
    )


def test_losses_are_differentiable(batch):
    y, logits = batch
    g = jax.grad(lambda s: jnp.sum(losses.multiclass_hinge(jnp.asarray(y), s)))(logits)
    # Each example's gradient is +1 on the violating class and -1 on its label (or all 0).
    np.testing.assert_allclose(g.sum(axis=-1), np.zeros(7), atol=1e-6)


def test_l2_regularizer_matches_numpy():
    params = {"a": jnp.array([1.0, -2.0]), "b": jnp.array([[3.0]])}
    center = {"a": jnp.array([0.5, 0.0]), "b": jnp.array([[1.0]])}
    weights = {"a": jnp.array([2.0, 1.0]), "b": jnp.array([[0.5]])}
    assert float(regularizers.l2_regularizer(0.1)(params)) == pytest.approx(0.1 * 14.0)
    assert float(regularizers.l2_regularizer(1.0, center)(params)) == pytest.approx(
        0.25 + 4.0 + 4.0
    )
    assert float(regularizers.l2_regularizer(1.0, center, weights)(params)) == pytest.approx(
        2 * 0.25 + 4.0 + 0.5 * 4.0
    )


def test_l2_regularizer_matches_fedjax(fedjax_on_current_jax):
    fedjax = pytest.importorskip("fedjax")
    params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    center = jax.tree_util.tree_map(lambda p: p * 0.5, params)
    ours = regularizers.l2_regularizer(0.3, center)(params)
    theirs = fedjax.regularizers.l2_regularizer(0.3, center)(params)
    np.testing.assert_array_equal(ours, theirs)


def test_per_example_loss_metric_is_the_masked_mean_hinge(batch):
    from fedjax_exp.core import metrics
    from fedjax_exp.core.losses import PerExampleLossMetric

    y, logits = batch
    mask = np.array([True, True, False, True, True, False, True])
    metric = PerExampleLossMetric(losses.get_train_loss("hinge"))
    stat = metrics.evaluate_batch(metric, {"y": jnp.asarray(y)}, jnp.asarray(logits), mask)
    expected = _np_hinge(y, logits)[mask].mean()
    assert float(stat.result()) == pytest.approx(expected, rel=1e-6)


def test_loss_hinge_config_trains_and_evaluates_the_hinge_loss(batch):
    from helpers import compose_config

    from fedjax_exp.core import models
    from fedjax_exp.experiment import builders

    y, logits = batch
    model = builders.build_model(compose_config(["loss=hinge"]))
    np.testing.assert_allclose(
        model.train_loss({"y": jnp.asarray(y)}, jnp.asarray(logits)),
        _np_hinge(y, logits),
        rtol=1e-6,
        atol=1e-6,
    )
    # evaluate_model's "loss" is the mean hinge loss of the model's own outputs.
    rng = np.random.default_rng(1)
    eval_batch = {
        "x": rng.random((6, 28, 28, 1), dtype=np.float32),
        "y": rng.integers(0, 62, 6).astype(np.int32),
    }
    params = model.init(jax.random.PRNGKey(0))
    outputs = np.asarray(model.apply_for_eval(params, eval_batch))
    got = models.evaluate_model(model, params, [eval_batch])
    assert float(got["loss"]) == pytest.approx(_np_hinge(eval_batch["y"], outputs).mean(), rel=1e-5)
