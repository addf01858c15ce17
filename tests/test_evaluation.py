"""Evaluation schedule: periodic evaluation on the first N padded batches, the final pass over
the whole test set, and the per-client distribution, each checked against an independent
computation (NumPy on the model's logits, or evaluate_model on batches built here)."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest

from fedjax_exp.core import metrics
from fedjax_exp.core.federated_data import padded_batch_federated_data
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.core.models import evaluate_model
from fedjax_exp.datasets import synthetic
from fedjax_exp.experiment.evaluation import (
    PERCENTILES,
    Evaluator,
    flatten_results,
    summarize_distribution,
)
from fedjax_exp.models.emnist import create_logistic_model

BATCH = 8


@pytest.fixture(scope="module")
def setup():
    model = create_logistic_model(only_digits=True).replace(
        eval_metrics={
            "accuracy": metrics.Accuracy(),
            "loss": metrics.CrossEntropyLoss(),
            "per_domain_accuracy": metrics.PerDomainMetric(metrics.Accuracy(), num_domains=2),
        }
    )
    train, test = synthetic.load_data(
        num_clients=9, mean_client_size=16, num_classes=10, test_fraction=0.4, seed=1
    )
    params = model.init(jax.random.PRNGKey(0))
    return model, params, train, test


def numpy_accuracy(model, params, examples) -> float:
    logits = np.asarray(model.apply_for_eval(params, examples))
    return float(np.mean(np.argmax(logits, axis=-1) == examples["y"]))


def all_examples(fd) -> dict[str, np.ndarray]:
    parts = [ds.all_examples() for _, ds in fd.clients()]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_periodic_uses_the_first_n_padded_batches(setup):
    model, params, train, test = setup
    evaluator = Evaluator(model, {"train": train, "test": test}, BATCH, {"train": 0, "test": 2})
    scalars = evaluator.periodic(params)
    first_two = list(itertools.islice(padded_batch_federated_data(test, batch_size=BATCH), 2))
    expected = evaluate_model(model, params, first_two)
    assert set(scalars) == {
        "eval/test/accuracy",
        "eval/test/loss",
        "eval/test/per_domain_accuracy/0",
        "eval/test/per_domain_accuracy/1",
    }  # train=0: not evaluated periodically.
    assert scalars["eval/test/accuracy"] == float(expected["accuracy"])
    assert scalars["eval/test/loss"] == float(expected["loss"])
    # The same 16 examples, scored with NumPy on the model's logits.
    rows = {k: v[: 2 * BATCH] for k, v in all_examples(test).items()}
    assert scalars["eval/test/accuracy"] == pytest.approx(numpy_accuracy(model, params, rows))
    for d in (0, 1):
        in_d = {k: v[rows["domain_id"] == d] for k, v in rows.items()}
        assert scalars[f"eval/test/per_domain_accuracy/{d}"] == pytest.approx(
            numpy_accuracy(model, params, in_d)
        )
    # Every periodic evaluation sees the same examples.
    assert evaluator.periodic(params) == scalars


def test_periodic_with_none_uses_every_batch(setup):
    model, params, _, test = setup
    evaluator = Evaluator(model, {"test": test}, BATCH, {"test": None})
    whole = evaluate_model(model, params, padded_batch_federated_data(test, batch_size=BATCH))
    assert evaluator.periodic(params)["eval/test/accuracy"] == float(whole["accuracy"])


def test_final_covers_the_whole_test_set(setup):
    model, params, train, test = setup
    evaluator = Evaluator(model, {"train": train, "test": test}, BATCH, {"test": 1})
    final = evaluator.final(params)
    examples = all_examples(test)
    assert sum(n for _, n in test.client_sizes()) > BATCH  # More than the periodic batch.
    assert final["final/test/accuracy"] == pytest.approx(numpy_accuracy(model, params, examples))
    whole = evaluate_model(model, params, padded_batch_federated_data(test, batch_size=BATCH))
    assert final["final/test/loss"] == float(whole["loss"])
    assert evaluator.final(params, "train")["final/train/accuracy"] == pytest.approx(
        numpy_accuracy(model, params, all_examples(train))
    )


def test_per_client_distribution_matches_numpy(setup):
    model, params, _, test = setup
    evaluator = Evaluator(model, {"test": test}, BATCH, {})
    summary, values = evaluator.per_client(params)
    expected = [numpy_accuracy(model, params, ds.all_examples()) for _, ds in test.clients()]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-6)
    assert len(set(np.round(expected, 6))) > 1  # A real distribution, not one repeated value.
    prefix = "final/per_client/test/accuracy"
    assert summary[f"{prefix}/mean"] == pytest.approx(np.mean(expected))
    assert summary[f"{prefix}/min"] == pytest.approx(min(expected))
    assert summary[f"{prefix}/max"] == pytest.approx(max(expected))
    for q, v in zip(PERCENTILES, np.percentile(expected, PERCENTILES), strict=True):
        assert summary[f"{prefix}/p{q}"] == pytest.approx(v)
    assert summary["final/per_client/test/num_clients"] == 9.0

    limited, first = evaluator.per_client(params, max_clients=4)
    np.testing.assert_allclose(first, expected[:4], atol=1e-6)
    assert limited["final/per_client/test/num_clients"] == 4.0

    losses = evaluator.per_client(params, metric="loss")[1]
    expected_losses = []
    for _, ds in test.clients():
        examples = ds.all_examples()
        logits = np.asarray(model.apply_for_eval(params, examples), np.float64)
        log_probs = logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))
        expected_losses.append(-np.mean(log_probs[np.arange(len(logits)), examples["y"]]))
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)


def test_per_client_skips_empty_clients_and_rejects_vector_metrics(setup):
    model, params, _, _ = setup
    rng = np.random.default_rng(0)
    columns = {
        "x": rng.uniform(size=(5, 28, 28, 1)).astype(np.float32),
        "y": np.array([1, 2, 3, 4, 5], np.int32),
        "domain_id": np.zeros(5, np.int32),
    }
    fd = InMemoryFederatedData.from_columns([b"a", b"b", b"c"], np.array([0, 2, 2, 5]), columns)
    evaluator = Evaluator(model, {"test": fd}, BATCH, {})
    summary, values = evaluator.per_client(params)
    assert values.shape == (2,)  # Client b has no examples.
    assert summary["final/per_client/test/num_clients"] == 2.0
    with pytest.raises(ValueError, match="not one number per client"):
        evaluator.per_client(params, metric="per_domain_accuracy")
    with pytest.raises(ValueError, match="'nope' is not one of"):
        evaluator.per_client(params, metric="nope")


def test_flatten_results_and_summaries():
    flat = flatten_results("eval/test", {"accuracy": np.float32(0.5), "per": np.array([0.25, 1])})
    assert flat == {"eval/test/accuracy": 0.5, "eval/test/per/0": 0.25, "eval/test/per/1": 1.0}
    values = np.array([0.0, 0.1, 0.4, 0.5, 1.0])
    summary = summarize_distribution(values)
    assert summary["mean"] == pytest.approx(0.4) and summary["min"] == 0 and summary["max"] == 1
    # Linear interpolation between order statistics: p25 is the 2nd value, p10 lies between
    # the 1st and 2nd (0.4 of the way).
    assert summary["p25"] == pytest.approx(0.1) and summary["p10"] == pytest.approx(0.04)
    assert summary["p50"] == pytest.approx(0.4) and summary["p90"] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="no per-client values"):
        summarize_distribution(np.array([]))


def _count_evaluations(monkeypatch) -> list[int]:
    """Counts evaluate_model calls made by the Evaluator (each call: its number of batches)."""
    import fedjax_exp.core.models as core_models

    calls: list[int] = []
    real = core_models.evaluate_model

    def counting(model, params, batches):
        batches = list(batches)
        calls.append(len(batches))
        return real(model, params, batches)

    monkeypatch.setattr(core_models, "evaluate_model", counting)
    return calls


def test_final_is_one_pass_over_every_batch_and_equals_a_covering_periodic(setup, monkeypatch):
    model, params, train, test = setup
    num_test_batches = len(list(padded_batch_federated_data(test, batch_size=BATCH)))
    calls = _count_evaluations(monkeypatch)
    # Asking for exactly as many batches as the split has covers it.
    evaluator = Evaluator(model, {"test": test}, BATCH, {"test": num_test_batches})
    periodic = evaluator.periodic(params)
    final = evaluator.final(params)
    assert calls == [num_test_batches, num_test_batches]
    assert set(final) == {key.replace("eval/", "final/") for key in periodic}
    for key, value in periodic.items():
        assert final[key.replace("eval/", "final/")] == value
    assert evaluator.final(params) == final  # Deterministic.


def test_per_client_evaluates_each_non_empty_client_once(setup, monkeypatch):
    model, params, _, test = setup
    calls = _count_evaluations(monkeypatch)
    _, values = Evaluator(model, {"test": test}, BATCH, {}).per_client(params)
    sizes = [len(ds) for _, ds in test.clients() if len(ds)]
    assert calls == [-(-n // BATCH) for n in sizes] and len(values) == len(sizes)
