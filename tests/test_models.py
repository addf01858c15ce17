"""Model, create_model_from_*, gradients and evaluation, without FedJAX."""

from __future__ import annotations

import functools
import warnings

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.example_libraries import stax

from fedjax_exp.core import losses, metrics, models, regularizers
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY

NUM_FEATURES, NUM_CLASSES = 4, 3


def _linear_model(trace_log: list | None = None, train_loss=losses.cross_entropy_loss):
    """A tiny softmax regression from plain functions; logs each trace of apply_for_eval."""

    def init(rng):
        return {
            "w": jax.random.normal(rng, (NUM_FEATURES, NUM_CLASSES)),
            "b": jnp.zeros(NUM_CLASSES),
        }

    def apply_for_eval(params, batch):
        if trace_log is not None:
            trace_log.append(jnp.shape(batch["x"]))  # Runs only while JAX traces.
        return batch["x"] @ params["w"] + params["b"]

    def apply_for_train(params, batch, rng=None):
        del rng
        return apply_for_eval(params, batch)

    return models.Model(
        init,
        apply_for_train,
        apply_for_eval,
        train_loss,
        {"accuracy": metrics.Accuracy(), "loss": metrics.CrossEntropyLoss()},
    )


def _batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, NUM_FEATURES)).astype(np.float32),
        "y": rng.integers(0, NUM_CLASSES, size=n).astype(np.int32),
    }


def _pad(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pads with garbage examples (large values) that must not affect any result."""
    n = len(batch["y"])
    padded = {
        "x": np.concatenate([batch["x"], np.full((size - n, NUM_FEATURES), 1e3, np.float32)]),
        "y": np.concatenate([batch["y"], np.full(size - n, 2, np.int32)]),
    }
    padded[EXAMPLE_MASK_KEY] = np.arange(size) < n
    return padded


def _np_metrics(params, batch) -> dict[str, float]:
    logits = batch["x"].astype(np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(
        params["b"]
    )
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y = batch["y"]
    return {
        "accuracy": float(np.mean(np.argmax(logits, -1) == y)),
        "loss": float(-np.mean(log_probs[np.arange(len(y)), y])),
    }


@pytest.fixture(scope="module")
def params():
    return _linear_model().init(jax.random.PRNGKey(0))


# -- Model container ---------------------------------------------------------------------------


def test_replace_returns_new_model_and_keeps_the_rest():
    model = _linear_model()
    hinge = model.replace(train_loss=losses.hinge_loss)
    assert hinge is not model
    assert hinge.train_loss is losses.hinge_loss
    assert model.train_loss is losses.cross_entropy_loss
    assert hinge.init is model.init and hinge.apply_for_eval is model.apply_for_eval
    assert hinge.eval_metrics == model.eval_metrics
    with pytest.raises(TypeError):
        model.replace(not_a_field=1)
    with pytest.raises(AttributeError):
        model.train_loss = losses.hinge_loss  # type: ignore[misc]


def test_model_equality_and_hash_with_dict_metrics():
    model = _linear_model()
    same = model.replace()
    assert same == model and hash(same) == hash(model)
    assert model.replace(train_loss=losses.hinge_loss) != model
    reordered = model.replace(eval_metrics=dict(reversed(list(model.eval_metrics.items()))))
    assert reordered != model  # Result order is part of a Model's behaviour.
    fewer = model.replace(eval_metrics={"accuracy": metrics.Accuracy()})
    assert fewer != model
    assert model != "not a model"


def test_model_is_a_static_jit_argument(params):
    @functools.partial(jax.jit, static_argnums=0)
    def mean_loss(model, params, batch):
        return jnp.mean(model.train_loss(batch, model.apply_for_train(params, batch, None)))

    model = _linear_model()
    batch = _batch(8)
    ce = mean_loss(model, params, batch)
    hinge = mean_loss(model.replace(train_loss=losses.hinge_loss), params, batch)
    np.testing.assert_allclose(ce, _np_metrics(params, batch)["loss"], rtol=1e-5)
    logits = batch["x"] @ np.asarray(params["w"]) + np.asarray(params["b"])
    np.testing.assert_allclose(
        hinge, np.mean(losses.multiclass_hinge(batch["y"], logits)), rtol=1e-6
    )


def test_create_model_from_haiku_passes_kwargs_and_metrics():
    def forward(batch, scale=1.0):
        return hk.Linear(NUM_CLASSES)(batch["x"]) * scale

    model = models.create_model_from_haiku(
        hk.transform(forward),
        sample_batch=_batch(1),
        train_loss=losses.cross_entropy_loss,
        train_kwargs={"scale": 2.0},
        eval_kwargs={"scale": 3.0},
    )
    assert model.eval_metrics == {}
    params = model.init(jax.random.PRNGKey(1))
    assert params["linear"]["w"].shape == (NUM_FEATURES, NUM_CLASSES)
    batch = _batch(5)
    base = batch["x"] @ params["linear"]["w"] + params["linear"]["b"]
    np.testing.assert_allclose(model.apply_for_train(params, batch, None), 2 * base, rtol=1e-5)
    np.testing.assert_allclose(model.apply_for_eval(params, batch), 3 * base, rtol=1e-5)


def test_create_model_from_stax_uses_input_key_and_sample_shape():
    init, apply = stax.serial(stax.Dense(NUM_CLASSES))
    model = models.create_model_from_stax(
        init, apply, (-1, NUM_FEATURES), losses.cross_entropy_loss, input_key="features"
    )
    params = model.init(jax.random.PRNGKey(0))
    assert params[0][0].shape == (NUM_FEATURES, NUM_CLASSES)
    batch = {"features": _batch(6)["x"]}
    out = model.apply_for_eval(params, batch)
    np.testing.assert_allclose(out, batch["features"] @ params[0][0] + params[0][1], rtol=1e-5)
    np.testing.assert_array_equal(model.apply_for_train(params, batch, None), out)


# -- Losses and gradients ----------------------------------------------------------------------


def test_model_per_example_loss(params):
    model = _linear_model()
    batch = _batch(6)
    loss = models.model_per_example_loss(model)(params, batch, None)
    logits = model.apply_for_eval(params, batch)
    np.testing.assert_array_equal(loss, losses.cross_entropy_loss(batch, logits))


def _leaves_close(a, b, **kwargs):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, **kwargs)


def test_model_grad_masked_equals_unmasked(params):
    model = _linear_model()
    grad_fn = models.model_grad(model)
    batch = _batch(5)
    _leaves_close(grad_fn(params, _pad(batch, 8), None), grad_fn(params, batch, None), rtol=1e-5)


def test_model_grad_is_the_mean_gradient(params):
    model = _linear_model()
    batch = _batch(6)
    grads = models.model_grad(model)(params, batch, None)
    # The mean of per-example gradients (computed one example at a time).
    per_example = [
        jax.grad(lambda p, b=b: jnp.sum(models.model_per_example_loss(model)(p, b, None)))(params)
        for b in ({k: v[i : i + 1] for k, v in batch.items()} for i in range(6))
    ]
    _leaves_close(grads, jax.tree_util.tree_map(lambda *g: sum(g) / 6, *per_example), rtol=1e-5)


def test_model_grad_with_regularizer_and_all_padding(params):
    model = _linear_model()
    reg = regularizers.l2_regularizer(0.5)
    batch = _pad(_batch(1), 4)
    batch[EXAMPLE_MASK_KEY] = np.zeros(4, bool)  # Only padding: the data term is 0 / 0 -> 0.
    grads = models.model_grad(model, reg)(params, batch, None)
    _leaves_close(grads, jax.tree_util.tree_map(lambda p: 2 * 0.5 * p, params), rtol=1e-6)


def test_scalar_train_loss_is_rejected(params):
    model = _linear_model(train_loss=lambda b, out: jnp.mean(losses.cross_entropy_loss(b, out)))
    with pytest.raises(ValueError, match=r"one loss per example, shape \[6\].*shape \(\)"):
        models.model_grad(model)(params, _batch(6), None)
    with pytest.raises(ValueError, match="one loss per example"):
        models.model_per_example_loss(model)(params, _batch(6), None)
    with pytest.raises(ValueError, match="one loss per example"):
        models.evaluate_average_loss(
            params, [_batch(6)], jax.random.PRNGKey(0), models.model_per_example_loss(model)
        )


# -- Evaluation --------------------------------------------------------------------------------


def test_evaluate_model_exact_values(params):
    batch = _batch(8)
    got = models.evaluate_model(_linear_model(), params, [batch])
    want = _np_metrics(params, batch)
    assert list(got) == ["accuracy", "loss"]
    assert float(got["accuracy"]) == want["accuracy"]
    assert float(got["loss"]) == pytest.approx(want["loss"], rel=1e-5)
    assert isinstance(got["loss"], np.ndarray)  # Already on the host.
    # Results come back in the model's metric order (jit alone would sort the keys).
    reordered = _linear_model().replace(
        eval_metrics={"loss": metrics.CrossEntropyLoss(), "accuracy": metrics.Accuracy()}
    )
    assert list(models.evaluate_model(reordered, params, [batch])) == ["loss", "accuracy"]


def test_evaluate_model_is_batching_and_padding_invariant(params):
    model = _linear_model()
    data = _batch(11, seed=3)
    whole = models.evaluate_model(model, params, [data])
    pieces = [{k: v[i : i + 4] for k, v in data.items()} for i in range(0, 11, 4)]
    padded = [_pad(p, 4) for p in pieces]
    for batches in (pieces, padded):
        got = models.evaluate_model(model, params, batches)
        assert float(got["accuracy"]) == float(whole["accuracy"])
        np.testing.assert_allclose(got["loss"], whole["loss"], rtol=1e-6)


def test_evaluate_model_compiles_once_per_model_and_shape(params):
    log: list = []
    model = _linear_model(trace_log=log)
    batches = [_pad(_batch(3, seed=s), 4) for s in range(9)]  # Blocks of 8 and 1.
    first = models.evaluate_model(model, params, batches)
    traces_after_first_call = len(log)
    second = models.evaluate_model(model, params, batches)
    again = models.evaluate_model(model.replace(), params, batches)  # An equal Model.
    # Per block length: the scan's body and the carry's dtypes (one batch each); later calls
    # trace nothing.
    assert all(shape == (4, NUM_FEATURES) for shape in log)
    assert len(log) == traces_after_first_call <= 4
    assert float(first["loss"]) == float(second["loss"]) == float(again["loss"])


def _count_dispatches(monkeypatch) -> list[int]:
    """Records the number of batches of each evaluation dispatch."""
    dispatched: list[int] = []
    evaluate_block = models._evaluate_block

    def counting(model, params, block, stats):
        dispatched.append(len(block))
        return evaluate_block(model, params, block, stats)

    monkeypatch.setattr(models, "_evaluate_block", counting)
    return dispatched


def _one_batch_per_dispatch(model, params, batches, monkeypatch) -> dict[str, np.ndarray]:
    """The reference: each batch evaluated by its own dispatch, merged in order."""
    with monkeypatch.context() as patch:
        patch.setattr(models, "_BLOCK_BATCHES", 1)
        return models.evaluate_model(model, params, batches)


def _assert_same_bits(got, want) -> None:
    assert list(got) == list(want)
    for key in want:
        assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes(), key


def _stream(on_device: bool) -> list[dict]:
    # 11 padded batches of 4 (a block of 8, then 3 of 1), then a short unpadded batch (its own
    # block), as NumPy batches or device arrays.
    batches = [_pad(_batch(1 + s % 4, seed=s), 4) for s in range(11)] + [_batch(3, seed=99)]
    return [jax.device_put(b) for b in batches] if on_device else batches


def _float64_reference(params, batches) -> dict[str, float]:
    real = [
        {k: v[b[EXAMPLE_MASK_KEY]] for k, v in b.items()} if EXAMPLE_MASK_KEY in b else b
        for b in map(jax.device_get, batches)
    ]
    return _np_metrics(params, {k: np.concatenate([b[k] for b in real]) for k in ("x", "y")})


@pytest.mark.parametrize("on_device", [False, True])
def test_evaluate_model_blocks_equal_batch_by_batch_bit_for_bit(params, monkeypatch, on_device):
    batches = _stream(on_device)
    dispatched = _count_dispatches(monkeypatch)
    blocked = models.evaluate_model(_linear_model(), params, iter(batches))
    assert dispatched == [8, 1, 1, 1, 1]
    dispatched.clear()
    single = _one_batch_per_dispatch(_linear_model(), params, batches, monkeypatch)
    assert dispatched == [1] * 12
    _assert_same_bits(blocked, single)
    want = _float64_reference(params, batches)
    np.testing.assert_allclose(float(blocked["loss"]), want["loss"], rtol=1e-5)
    assert float(blocked["accuracy"]) == pytest.approx(want["accuracy"], abs=1e-6)


def test_evaluate_model_mixed_shapes_in_stream_order(params, monkeypatch):
    # Runs of one shape: 3 of 4 examples, 1 of 6, 9 of 4 (a block of 8 mixing a device batch
    # with host batches, then 1), 2 of 6. A run's batches never join another run's block.
    sizes = [4] * 3 + [6] + [4] * 9 + [6] * 2
    batches = [_pad(_batch(n - s % 2, seed=s), n) for s, n in enumerate(sizes)]
    batches[5] = jax.device_put(batches[5])
    dispatched = _count_dispatches(monkeypatch)
    got = models.evaluate_model(_linear_model(), params, batches)
    assert dispatched == [1, 1, 1, 1, 8, 1, 1, 1]
    _assert_same_bits(got, _one_batch_per_dispatch(_linear_model(), params, batches, monkeypatch))
    want = _float64_reference(params, batches)
    np.testing.assert_allclose(float(got["loss"]), want["loss"], rtol=1e-5)
    assert float(got["accuracy"]) == pytest.approx(want["accuracy"], abs=1e-6)


def test_evaluate_model_all_padding_batches_add_nothing(params):
    batches = [_pad(_batch(2 + s % 3, seed=s), 4) for s in range(5)]
    empty = _pad(_batch(4, seed=7), 4)
    empty[EXAMPLE_MASK_KEY] = np.zeros(4, bool)  # Real-looking values, all masked out.
    model = _linear_model()
    want = models.evaluate_model(model, params, batches)
    with_empty = [empty, *batches[:2], empty, empty, *batches[2:], empty]
    _assert_same_bits(models.evaluate_model(model, params, with_empty), want)
    # Only padding: no example, each metric's zero result.
    only_padding = models.evaluate_model(model, params, [empty] * 3)
    assert {k: float(v) for k, v in only_padding.items()} == {"accuracy": 0.0, "loss": 0.0}


def test_evaluate_model_is_deterministic(params):
    batches = _stream(on_device=False)
    first = models.evaluate_model(_linear_model(), params, batches)
    for _ in range(2):
        _assert_same_bits(models.evaluate_model(_linear_model(), params, iter(batches)), first)


class _LargeLogitCount(metrics.Metric):
    """Counts examples whose first logit exceeds 0; its zero is an int, its stats floats."""

    def zero(self) -> metrics.SumStat:
        return metrics.SumStat.new(0)

    def evaluate_example(self, example, prediction) -> metrics.SumStat:
        return metrics.SumStat.new((prediction[0] > 0).astype(jnp.float32))


def test_evaluate_model_zero_stats_of_another_dtype(params):
    # The int zero is merged with float statistics: the carry takes the merged dtype.
    model = _linear_model().replace(eval_metrics={"count": _LargeLogitCount()})
    batches = [_pad(_batch(3, seed=s), 4) for s in range(3)]
    got = models.evaluate_model(model, params, batches)
    logits = [b["x"][b[EXAMPLE_MASK_KEY]] @ np.asarray(params["w"]) for b in batches]
    want = sum(int(np.sum(x[:, 0] + np.asarray(params["b"])[0] > 0)) for x in logits)
    assert got["count"].dtype == np.float32 and float(got["count"]) == want


def test_evaluate_model_on_slices_of_one_array_equals_copies(params):
    data = _batch(24, seed=5)
    slices = [{k: v[i : i + 4] for k, v in data.items()} for i in range(0, 24, 4)]
    copies = [{k: v.copy() for k, v in b.items()} for b in slices]
    model = _linear_model()
    got, want = (models.evaluate_model(model, params, b) for b in (slices, copies))
    for key in ("accuracy", "loss"):
        assert np.asarray(got[key]).tobytes() == np.asarray(want[key]).tobytes()


def test_evaluate_model_blocks_leave_the_callers_batches_unchanged(params):
    batches = [_pad(_batch(2 + s % 3, seed=s), 4) for s in range(6)]
    copies = [{k: v.copy() for k, v in b.items()} for b in batches]
    models.evaluate_model(_linear_model(), params, batches)
    for batch, copy in zip(batches, copies, strict=True):
        for key in copy:
            np.testing.assert_array_equal(batch[key], copy[key])


def test_evaluate_model_transfers_to_host_once_per_call(params, monkeypatch):
    transfers = []
    device_get = jax.device_get
    batches = [_pad(_batch(3, seed=s), 4) for s in range(5)]
    model = _linear_model()
    models.evaluate_model(model, params, batches)  # Compiles.
    monkeypatch.setattr(jax, "device_get", lambda x: transfers.append(1) or device_get(x))
    models.evaluate_model(model, params, batches)
    assert len(transfers) == 1


def test_evaluate_model_empty_stream_warns_and_returns_zeros(params):
    with pytest.warns(RuntimeWarning, match="no batches"):
        got = models.evaluate_model(_linear_model(), params, [])
    assert {k: float(v) for k, v in got.items()} == {"accuracy": 0.0, "loss": 0.0}


def test_evaluate_model_missing_metric_key_is_an_error(params):
    model = _linear_model().replace(eval_metrics={"acc": metrics.Accuracy(target_key="label")})
    with pytest.raises(KeyError, match="label"):
        models.evaluate_model(model, params, [_batch(4)])


def test_model_evaluator_global_and_per_client(params):
    model = _linear_model()
    clients = [(b"a", [_batch(4, 1)]), (b"b", [_batch(3, 2), _pad(_batch(2, 3), 3)])]
    evaluator = models.ModelEvaluator(model)
    global_results = dict(evaluator.evaluate_global_params(params, clients))
    for cid, batches in clients:
        want = models.evaluate_model(model, params, batches)
        assert float(global_results[cid]["loss"]) == float(want["loss"])
    other = jax.tree_util.tree_map(lambda p: p * 2, params)
    per_client = dict(
        evaluator.evaluate_per_client_params([(b"a", clients[0][1], other)]),
    )
    want = models.evaluate_model(model, other, clients[0][1])
    assert float(per_client[b"a"]["accuracy"]) == float(want["accuracy"])


def test_evaluate_average_loss(params):
    model = _linear_model()
    per_example = models.model_per_example_loss(model)
    data = _batch(7, seed=5)
    batches = [
        _pad({k: v[:4] for k, v in data.items()}, 4),
        _pad({k: v[4:] for k, v in data.items()}, 4),
    ]
    reg = regularizers.l2_regularizer(0.01)
    got = models.evaluate_average_loss(params, batches, jax.random.PRNGKey(0), per_example, reg)
    want = _np_metrics(params, data)["loss"] + float(reg(params))
    assert float(got) == pytest.approx(want, rel=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty = models.evaluate_average_loss(params, [], jax.random.PRNGKey(0), per_example)
    assert float(empty) == 0.0
    evaluator = models.AverageLossEvaluator(per_example, reg)
    ((cid, value),) = evaluator.evaluate_global_params(
        params, [(b"c", batches, jax.random.PRNGKey(0))]
    )
    assert cid == b"c" and float(value) == float(got)
    ((cid, value),) = evaluator.evaluate_per_client_params(
        [(b"d", batches, jax.random.PRNGKey(0), params)]
    )
    assert cid == b"d" and float(value) == float(got)
