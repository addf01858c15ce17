"""End to end: the centralized flow of FedJAX's model tutorial, with fedjax_exp as ``fedjax``.

The tutorial (https://fedjax.readthedocs.io/en/latest/notebooks/model_tutorial.html) trains and
evaluates EMNIST models with ``fedjax.Model``. Here the same steps run on small fixed in-memory
batches (random pixels, batch 8) instead of the EMNIST download:

1. ``create_logistic_model``, ``init``, ``evaluate_model``;
2. a jitted train step with ``optimizers.adam(1e-3)``;
3. ``model.replace(train_loss=hinge)``, and ``replace(eval_metrics={'accuracy': Accuracy()})``;
4. a custom ``Model`` from plain functions (the tutorial's MLP);
5. the tutorial's stax CNN via ``create_model_from_stax``.

The flow is written once against a module argument, so the identical code runs with FedJAX
0.0.17 too and the numbers are compared.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax

import fedjax_exp as fedjax

BATCH_SIZE = 8


def _batches(num_batches: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.uniform(size=(BATCH_SIZE, 28, 28, 1)).astype(np.float32),
            "y": rng.integers(0, 62, size=BATCH_SIZE).astype(np.int32),
        }
        for _ in range(num_batches)
    ]


TRAIN = _batches(4, seed=0)


def hinge_loss(batch, preds):
    """The tutorial's multi-class hinge loss, per example."""
    mask = jax.nn.one_hot(batch["y"], preds.shape[-1])
    label_score = jnp.sum(preds * mask, axis=-1)
    best_score = jnp.max(preds + 1.0 - mask, axis=-1)
    return best_score - label_score


def _mlp_model(lib: types.ModuleType, hidden: int = 16):
    """The tutorial's custom Model built from plain functions."""

    def init(rng):
        k0, k1 = jax.random.split(rng)
        return (
            jax.random.uniform(k0, [28 * 28, hidden]),
            jnp.zeros([hidden]),
            jax.random.uniform(k1, [hidden, 62]),
            jnp.zeros([62]),
        )

    def apply_for_eval(params, batch):
        w0, b0, w1, b1 = params
        x = batch["x"].reshape((batch["x"].shape[0], -1))
        return jax.nn.relu(x @ w0 + b0) @ w1 + b1

    def apply_for_train(params, batch, rng=None):
        del rng
        return apply_for_eval(params, batch)

    def train_loss(batch, preds):
        return lib.metrics.unreduced_cross_entropy_loss(batch["y"], preds)

    eval_metrics = {"loss": lib.metrics.CrossEntropyLoss(), "accuracy": lib.metrics.Accuracy()}
    return lib.Model(init, apply_for_train, apply_for_eval, train_loss, eval_metrics)


def _stax_cnn_model(lib: types.ModuleType):
    stax_init, stax_apply = stax.serial(
        stax.Conv(64, (3, 3), strides=(1, 1), padding="SAME"),
        stax.Relu,
        stax.Flatten,
        stax.Dense(256),
        stax.Relu,
        stax.Dense(62),
    )
    return lib.create_model_from_stax(
        stax_init=stax_init,
        stax_apply=stax_apply,
        sample_shape=(-1, 28, 28, 1),
        train_loss=lambda batch, preds: lib.metrics.unreduced_cross_entropy_loss(batch["y"], preds),
        eval_metrics={"loss": lib.metrics.CrossEntropyLoss(), "accuracy": lib.metrics.Accuracy()},
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def train_step(model, optimizer, params, opt_state, batch, rng):
    """One step of the tutorial's loop: the gradient of the mean loss, then the optimizer."""

    def loss(params):
        preds = model.apply_for_train(params, batch, rng)
        return jnp.mean(model.train_loss(batch, preds))

    grads = jax.grad(loss)(params)
    return optimizer.apply(grads, opt_state, params)


def _train(lib, model, params, steps: int, learning_rate: float = 1e-3, seed: int = 1):
    optimizer = lib.optimizers.adam(learning_rate)
    opt_state = optimizer.init(params)
    rng = jax.random.PRNGKey(seed)
    for step in range(steps):
        rng, use_rng = jax.random.split(rng)
        opt_state, params = train_step(
            model, optimizer, params, opt_state, TRAIN[step % len(TRAIN)], use_rng
        )
    return params


def _floats(results) -> dict[str, float]:
    return {k: float(v) for k, v in results.items()}


def _mean_loss(lib, model, params) -> float:
    per_example = lib.model_per_example_loss(model)
    return float(lib.evaluate_average_loss(params, TRAIN, jax.random.PRNGKey(0), per_example))


def run_flow(lib: types.ModuleType, cnn_steps: int = 2) -> dict[str, object]:
    """Runs the tutorial's steps with ``lib`` (fedjax_exp or FedJAX); returns every number."""
    out: dict[str, object] = {}

    # 1-2. Logistic regression: init, evaluate, train with a jitted step, evaluate again.
    model = lib.models.emnist.create_logistic_model()
    params = model.init(jax.random.PRNGKey(0))
    out["logistic_before"] = _floats(lib.evaluate_model(model, params, TRAIN))
    params = _train(lib, model, params, steps=12)
    out["logistic_after"] = _floats(lib.evaluate_model(model, params, TRAIN))

    # 3. Same architecture, hinge loss; then evaluation with accuracy only.
    hinge_model = model.replace(train_loss=hinge_loss)
    start = hinge_model.init(jax.random.PRNGKey(0))
    out["hinge_before"] = _mean_loss(lib, hinge_model, start)
    hinge_params = _train(lib, hinge_model, start, steps=12)
    out["hinge_after"] = _mean_loss(lib, hinge_model, hinge_params)
    accuracy_model = hinge_model.replace(eval_metrics={"accuracy": lib.metrics.Accuracy()})
    out["accuracy_only"] = _floats(lib.evaluate_model(accuracy_model, hinge_params, TRAIN))

    # 4. The custom MLP Model.
    mlp = _mlp_model(lib)
    mlp_params = mlp.init(jax.random.PRNGKey(0))
    out["mlp_before"] = _floats(lib.evaluate_model(mlp, mlp_params, TRAIN))
    mlp_params = _train(lib, mlp, mlp_params, steps=8, learning_rate=1e-2)
    out["mlp_after"] = _floats(lib.evaluate_model(mlp, mlp_params, TRAIN))

    # 5. The stax CNN (12.9M params): a couple of steps on one batch.
    cnn = _stax_cnn_model(lib)
    cnn_params = cnn.init(jax.random.PRNGKey(0))
    out["cnn_before"] = _floats(lib.evaluate_model(cnn, cnn_params, TRAIN[:1]))
    optimizer = lib.optimizers.adam(1e-3)
    opt_state = optimizer.init(cnn_params)
    for _ in range(cnn_steps):
        opt_state, cnn_params = train_step(
            cnn, optimizer, cnn_params, opt_state, TRAIN[0], jax.random.PRNGKey(0)
        )
    out["cnn_after"] = _floats(lib.evaluate_model(cnn, cnn_params, TRAIN[:1]))
    return out


@pytest.fixture(scope="module")
def ours() -> dict[str, object]:
    return run_flow(fedjax)


def test_training_reduces_the_loss(ours):
    assert ours["logistic_after"]["loss"] < ours["logistic_before"]["loss"]
    assert ours["hinge_after"] < ours["hinge_before"]
    assert ours["mlp_after"]["loss"] < ours["mlp_before"]["loss"]
    assert ours["cnn_after"]["loss"] < ours["cnn_before"]["loss"]
    assert list(ours["logistic_after"]) == ["loss", "accuracy"]
    assert list(ours["accuracy_only"]) == ["accuracy"]
    for name in ("logistic_after", "mlp_after", "cnn_after", "accuracy_only"):
        assert 0.0 <= ours[name]["accuracy"] <= 1.0


def test_custom_mlp_equals_the_zoo_constructor():
    custom = _mlp_model(fedjax)
    zoo = fedjax.models.emnist.create_mlp_model(hidden_units=16)
    key = jax.random.PRNGKey(4)
    params = custom.init(key)
    for a, b in zip(params, zoo.init(key), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(
        custom.apply_for_eval(params, TRAIN[0]), zoo.apply_for_eval(params, TRAIN[0]), rtol=1e-6
    )
    got = fedjax.evaluate_model(zoo, params, TRAIN)
    want = fedjax.evaluate_model(custom, params, TRAIN)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)


def test_hinge_in_the_flow_is_the_library_hinge():
    preds = jax.random.normal(jax.random.PRNGKey(0), (BATCH_SIZE, 62))
    np.testing.assert_array_equal(
        hinge_loss(TRAIN[0], preds), fedjax.losses.hinge_loss(TRAIN[0], preds)
    )


def test_same_numbers_as_fedjax(ours, fedjax_on_current_jax):
    reference = pytest.importorskip("fedjax")
    theirs = run_flow(reference)
    # Same computations in the same order: the numbers agree bit for bit.
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        if isinstance(value, dict):
            assert value.keys() == theirs[name].keys(), name
            for metric, number in value.items():
                assert number == theirs[name][metric], (name, metric)
        else:
            assert value == theirs[name], name
