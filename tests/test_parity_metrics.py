"""Parity with FedJAX 0.0.17: identical inputs through fedjax.metrics and fedjax_exp.metrics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp import metrics as ours

fedjax = pytest.importorskip("fedjax")
theirs = fedjax.metrics

NUM_CLASSES = 4

# (name, kwargs): each is built from both libraries with the same arguments.
CLASSIFICATION = [
    ("Accuracy", {}),
    ("CrossEntropyLoss", {}),
    ("TopKAccuracy", {"k": 0}),
    ("TopKAccuracy", {"k": 2}),
    ("TopKAccuracy", {"k": 5}),
    ("ConfusionMatrix", {"num_classes": NUM_CLASSES}),
    ("Accuracy", {"target_key": "label", "pred_key": "logits"}),
    ("CrossEntropyLoss", {"target_key": "label", "pred_key": "logits"}),
]
SEQUENCE = [
    ("SequenceTokenCrossEntropyLoss", {}),
    ("SequenceTokenCrossEntropyLoss", {"per_position": True}),
    ("SequenceCrossEntropyLoss", {"masked_target_values": (0, 3)}),
    ("SequenceTokenAccuracy", {}),
    ("SequenceTokenAccuracy", {"logits_mask": (0.0, 0.0, 0.0, -np.inf), "per_position": True}),
    ("SequenceTokenTopKAccuracy", {"k": 2}),
    ("SequenceTokenTopKAccuracy", {"k": 2, "logits_mask": (0.0, -np.inf, 0.0, 0.0)}),
    ("SequenceTokenCount", {"masked_target_values": (0, 2)}),
    ("SequenceCount", {}),
    ("SequenceTruncationRate", {"eos_target_value": 3}),
    ("SequenceTokenOOVRate", {"oov_target_values": (2,)}),
    ("SequenceTokenOOVRate", {"oov_target_values": (1,), "per_position": True}),
    ("SequenceLength", {}),
]


def _classification_batch(n: int, keyed: bool, seed: int) -> tuple[dict, object]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, n).astype(np.int32)
    logits = rng.normal(size=(n, NUM_CLASSES)).astype(np.float32)
    logits[0] = logits[0, 0]  # A full tie: arg-max and top-k tie-breaking must agree.
    batch = {"domain_id": rng.integers(0, 3, n).astype(np.int32)}
    if keyed:
        return {**batch, "label": y}, {"logits": logits}
    return {**batch, "y": y}, logits


def _sequence_batch(n: int, seed: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, (n, 6)).astype(np.int32)
    y[1] = 0  # A fully padded sequence.
    return {"y": y}, rng.normal(size=(n, 6, NUM_CLASSES)).astype(np.float32)


def _pair(name: str, kwargs: dict):
    return getattr(ours, name)(**kwargs), getattr(theirs, name)(**kwargs)


def _assert_same_stat(mine, reference) -> None:
    assert type(mine).__name__ == type(reference).__name__
    mine_leaves = jax.tree_util.tree_leaves(mine)
    reference_leaves = jax.tree_util.tree_leaves(reference)
    assert len(mine_leaves) == len(reference_leaves)
    for a, b in zip(mine_leaves, reference_leaves, strict=True):
        assert jnp.asarray(a).dtype == jnp.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(mine.result()), np.asarray(reference.result()))


MASKS = [None, np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1], bool), np.zeros(10, bool)]


def _cases():
    for name, kwargs in CLASSIFICATION:
        keyed = "pred_key" in kwargs
        yield pytest.param(
            name,
            kwargs,
            lambda keyed=keyed: _classification_batch(10, keyed, 0),
            id=f"{name}{kwargs}",
        )
    for name, kwargs in SEQUENCE:
        yield pytest.param(name, kwargs, lambda: _sequence_batch(10, 1), id=f"{name}{kwargs}")


@pytest.mark.parametrize("mask_index", range(len(MASKS)))
@pytest.mark.parametrize(("name", "kwargs", "make"), list(_cases()))
def test_evaluate_batch_parity(name, kwargs, make, mask_index):
    mine, reference = _pair(name, kwargs)
    batch, preds = make()
    mask = MASKS[mask_index]
    _assert_same_stat(
        ours.evaluate_batch(mine, batch, preds, mask),
        theirs.evaluate_batch(reference, batch, preds, mask),
    )


@pytest.mark.parametrize(("name", "kwargs", "make"), list(_cases()))
def test_evaluate_example_and_zero_parity(name, kwargs, make):
    mine, reference = _pair(name, kwargs)
    batch, preds = make()
    example = jax.tree_util.tree_map(lambda x: x[2], batch)
    prediction = jax.tree_util.tree_map(lambda x: x[2], preds)
    _assert_same_stat(
        mine.evaluate_example(example, prediction),
        reference.evaluate_example(example, prediction),
    )
    _assert_same_stat(mine.zero(), reference.zero())


@pytest.mark.parametrize("base_name", ["Accuracy", "CrossEntropyLoss", "ConfusionMatrix"])
@pytest.mark.parametrize("mask_index", range(len(MASKS)))
def test_per_domain_metric_parity(base_name, mask_index):
    kwargs = {"num_classes": NUM_CLASSES} if base_name == "ConfusionMatrix" else {}
    mine_base, reference_base = _pair(base_name, kwargs)
    mine = ours.PerDomainMetric(mine_base, num_domains=3)
    reference = theirs.PerDomainMetric(reference_base, num_domains=3)
    batch, preds = _classification_batch(10, keyed=False, seed=2)
    mask = MASKS[mask_index]
    _assert_same_stat(
        ours.evaluate_batch(mine, batch, preds, mask),
        theirs.evaluate_batch(reference, batch, preds, mask),
    )
    _assert_same_stat(mine.zero(), reference.zero())


@pytest.mark.parametrize(
    ("accum", "weight"),
    [(1, 2), (1.5, 0.0), (3.0, -1.0), (np.nan, 0.0), ([1.0, 2.0, 4.0], [1.0, 1.0, 0.0])],
)
def test_mean_stat_parity(accum, weight):
    mine = ours.MeanStat.new(accum, weight)
    reference = theirs.MeanStat.new(accum, weight)
    _assert_same_stat(mine, reference)
    _assert_same_stat(mine.merge(mine), reference.merge(reference))
    if jnp.ndim(mine.accum):
        _assert_same_stat(mine.reduce(), reference.reduce())
    assert str(mine).split("=>")[1] == str(reference).split("=>")[1]


def test_sum_stat_parity():
    _assert_same_stat(ours.SumStat.new([1, 2, 3]).reduce(), theirs.SumStat.new([1, 2, 3]).reduce())
    _assert_same_stat(
        ours.SumStat.new(2.5).merge(ours.SumStat.new(1)),
        theirs.SumStat.new(2.5).merge(theirs.SumStat.new(1)),
    )


def test_array_helpers_parity():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(6, 5)).astype(np.float32)
    labels = np.array([0, 4, 2, 5, -1, 3], np.int32)  # Includes out-of-range ids.
    np.testing.assert_array_equal(
        ours.unreduced_cross_entropy_loss(labels, logits),
        theirs.unreduced_cross_entropy_loss(labels, logits),
    )
    soft = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
    np.testing.assert_array_equal(
        ours.unreduced_cross_entropy_loss(soft, logits, is_sparse_targets=False),
        theirs.unreduced_cross_entropy_loss(soft, logits, is_sparse_targets=False),
    )
    target = np.array([0, 1, 2, 3, 0, 2], np.int32)
    np.testing.assert_array_equal(
        ours.get_target_weight(target, (0, 2)), theirs.get_target_weight(target, (0, 2))
    )
    mask = np.array([True, False, True])
    a, b = np.arange(6.0).reshape(3, 2), np.zeros(2)
    np.testing.assert_array_equal(ours.apply_mask(mask, a, b), theirs.apply_mask(mask, a, b))


def test_public_names_cover_fedjax():
    missing = [
        name
        for name in dir(theirs)
        if not name.startswith("_")
        and isinstance(getattr(theirs, name), type)
        and getattr(theirs, name).__module__ == theirs.__name__
        and not hasattr(ours, name)
    ]
    assert missing == []
    for name in (
        "evaluate_batch",
        "unreduced_cross_entropy_loss",
        "get_target_weight",
        "apply_mask",
    ):
        assert hasattr(ours, name)
