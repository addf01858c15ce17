"""Tests for fedjax_exp.metrics that do not need FedJAX: exact values, masks, merging, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp import metrics

# A hand-made classification batch: 5 examples, 3 classes.
# Arg-max per row: 1, 0, 2, 2, 0 (the last row ties classes 0 and 1: arg-max takes 0).
LOGITS = np.array(
    [
        [0.0, 2.0, 1.0],
        [3.0, 1.0, 2.0],
        [0.5, 1.0, 4.0],
        [1.0, 2.0, 3.0],
        [2.0, 2.0, 1.0],
    ],
    dtype=np.float32,
)
LABELS = np.array([1, 2, 2, 0, 1], dtype=np.int32)
BATCH = {"x": np.zeros((5, 2), np.float32), "y": LABELS}


def _np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return log_z - logits[np.arange(len(labels)), labels]


def _leaves_equal(a: metrics.Stat, b: metrics.Stat) -> None:
    assert type(a) is type(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------------------------
# Stats.
# ----------------------------------------------------------------------------------------------


def test_mean_stat_result_merge_reduce():
    a = metrics.MeanStat.new(1.0, 2.0)
    b = metrics.MeanStat.new(2.0, 3.0)
    merged = a.merge(b)
    assert float(merged.accum) == 3.0 and float(merged.weight) == 5.0
    assert float(merged.result()) == pytest.approx(0.6)
    stacked = metrics.MeanStat.new(jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 1.0, 0.0]))
    # The zero-weight entry is sanitised to accum 0, so it adds nothing.
    np.testing.assert_array_equal(stacked.accum, [1.0, 2.0, 0.0])
    reduced = stacked.reduce()
    assert float(reduced.accum) == 3.0 and float(reduced.weight) == 2.0
    assert float(reduced.result()) == 1.5
    assert str(reduced).endswith("=> 1.5")


def test_mean_stat_zero_and_negative_weight_is_identity():
    empty = metrics.MeanStat.new(7.0, 0.0)
    assert float(empty.accum) == 0.0 and float(empty.result()) == 0.0
    negative = metrics.MeanStat.new(5.0, -2.0)
    assert float(negative.accum) == 0.0 and float(negative.weight) == 0.0
    # NaN in an empty stat does not leak into merges or results.
    nan_empty = metrics.MeanStat.new(jnp.nan, 0.0)
    assert float(nan_empty.accum) == 0.0
    other = metrics.MeanStat.new(3.0, 4.0)
    assert float(nan_empty.merge(other).result()) == 0.75
    # result() has a finite zero gradient where the weight is 0.
    grad = jax.grad(lambda a: metrics.MeanStat(a, jnp.float32(0.0)).result())(jnp.float32(1.0))
    assert float(grad) == 0.0


def test_mean_stat_reduce_axis_none_and_per_row():
    stat = metrics.MeanStat.new(jnp.array([[1.0, 2.0], [3.0, 4.0]]), jnp.array([[1.0, 1.0]] * 2))
    np.testing.assert_array_equal(stat.reduce(axis=1).result(), [1.5, 3.5])
    assert float(stat.reduce(axis=None).result()) == 2.5


def test_sum_stat():
    merged = metrics.SumStat.new(1).merge(metrics.SumStat.new(2))
    assert int(merged.result()) == 3
    assert int(metrics.SumStat.new(jnp.array([1, 2, 1])).reduce().result()) == 4
    assert str(merged).endswith("=> 3")


def test_stats_are_pytrees_and_cross_jit():
    stat = metrics.MeanStat.new(jnp.array(3.0), jnp.array(4.0))
    assert len(jax.tree_util.tree_leaves(stat)) == 2
    out = jax.jit(lambda s: s.merge(s))(stat)
    assert isinstance(out, metrics.MeanStat) and float(out.result()) == 0.75
    assert stat.replace(weight=jnp.array(2.0)).result() == 1.5


# ----------------------------------------------------------------------------------------------
# Exact values on the hand-made batch.
# ----------------------------------------------------------------------------------------------


def test_accuracy_exact():
    stat = metrics.evaluate_batch(metrics.Accuracy(), BATCH, LOGITS)
    # Correct rows: 0 (1==1) and 2 (2==2); row 4's tie resolves to class 0 != 1.
    assert float(stat.accum) == 2.0 and float(stat.weight) == 5.0
    assert float(stat.result()) == pytest.approx(0.4)


def test_cross_entropy_matches_numpy():
    stat = metrics.evaluate_batch(metrics.CrossEntropyLoss(), BATCH, LOGITS)
    expected = _np_cross_entropy(LOGITS, LABELS)
    assert float(stat.weight) == 5.0
    assert float(stat.accum) == pytest.approx(expected.sum(), rel=1e-6)
    assert float(stat.result()) == pytest.approx(expected.mean(), rel=1e-6)


def test_unreduced_cross_entropy_sparse_dense_and_out_of_range():
    sparse = metrics.unreduced_cross_entropy_loss(jnp.asarray(LABELS), jnp.asarray(LOGITS))
    np.testing.assert_allclose(sparse, _np_cross_entropy(LOGITS, LABELS), rtol=1e-6)
    dense_targets = np.eye(3, dtype=np.float32)[LABELS]
    dense = metrics.unreduced_cross_entropy_loss(dense_targets, LOGITS, is_sparse_targets=False)
    np.testing.assert_array_equal(dense, sparse)
    # Soft targets: the expectation of the per-class losses.
    soft = metrics.unreduced_cross_entropy_loss(
        np.array([[0.5, 0.5, 0.0]], np.float32), LOGITS[:1], is_sparse_targets=False
    )
    per_class = [_np_cross_entropy(LOGITS[:1], np.array([c]))[0] for c in (0, 1)]
    assert float(soft[0]) == pytest.approx(0.5 * sum(per_class), rel=1e-6)
    # An id outside [0, num_classes) selects no class: loss 0.
    assert float(metrics.unreduced_cross_entropy_loss(jnp.array(3), LOGITS[0])) == 0.0


@pytest.mark.parametrize(
    ("k", "expected_hits"),
    [
        (-1, 0.0),  # Documented: k < 1 gives 0 (FedJAX's slice would drop the last class).
        (0, 0.0),
        (1, 2.0),  # Same as Accuracy.
        # Top-2 per row: {1,2}, {0,2}, {2,1}, {2,1}, {0,1} (tie: lower id first) -> rows 0,1,2,4.
        (2, 4.0),
        (3, 5.0),
        (10, 5.0),
    ],
)
def test_top_k_accuracy_exact(k, expected_hits):
    stat = metrics.evaluate_batch(metrics.TopKAccuracy(k=k), BATCH, LOGITS)
    assert float(stat.accum) == expected_hits and float(stat.weight) == 5.0


def test_top_k_ties_rank_lower_class_first():
    example = {"y": jnp.array([2, 1])}
    tied = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    stat = metrics.evaluate_batch(metrics.TopKAccuracy(k=2), example, tied)
    # Top-2 of a full tie is {0, 1}: class 2 misses, class 1 hits.
    assert float(stat.accum) == 1.0


def test_confusion_matrix_exact():
    stat = metrics.evaluate_batch(metrics.ConfusionMatrix(num_classes=3), BATCH, LOGITS)
    expected = np.zeros((3, 3), np.float32)
    for label, predicted in zip(LABELS, [1, 0, 2, 2, 0], strict=True):
        expected[label, predicted] += 1
    np.testing.assert_array_equal(stat.result(), expected)
    assert metrics.ConfusionMatrix(num_classes=3).zero().accum.shape == (3, 3)


def test_confusion_matrix_wrong_num_classes():
    with pytest.raises(ValueError, match="num_classes=4.*3 classes"):
        metrics.evaluate_batch(metrics.ConfusionMatrix(num_classes=4), BATCH, LOGITS)


def test_per_domain_metric_exact():
    metric = metrics.PerDomainMetric(metrics.Accuracy(), num_domains=3)
    batch = {"domain_id": np.array([0, 0, 1, 2]), "y": np.array([0, 1, 0, 1])}
    logits = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0]], np.float32)
    stat = metrics.evaluate_batch(metric, batch, logits)
    np.testing.assert_array_equal(stat.accum, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(stat.weight, [2.0, 1.0, 1.0])
    np.testing.assert_array_equal(stat.result(), [0.5, 0.0, 1.0])
    zero = metric.zero()
    assert zero.accum.shape == (3,) and float(jnp.sum(zero.weight)) == 0.0


def test_per_domain_confusion_matrix_shape():
    metric = metrics.PerDomainMetric(metrics.ConfusionMatrix(num_classes=3), num_domains=2)
    batch = {"domain_id": np.array([1, 0, 1, 1, 0]), "y": LABELS}
    stat = metrics.evaluate_batch(metric, batch, LOGITS)
    assert stat.result().shape == (2, 3, 3)
    np.testing.assert_array_equal(
        stat.result().sum(0),
        metrics.evaluate_batch(metrics.ConfusionMatrix(num_classes=3), BATCH, LOGITS).result(),
    )
    assert float(stat.result()[0].sum()) == 2.0 and float(stat.result()[1].sum()) == 3.0


# ----------------------------------------------------------------------------------------------
# Sequence metrics: 2 sequences of length 4, vocabulary 3, padding 0.
# ----------------------------------------------------------------------------------------------

SEQ_Y = np.array([[1, 2, 2, 0], [2, 1, 0, 0]], np.int32)
# Arg-max per position: seq 0 -> 1, 0, 2, 1; seq 1 -> 2, 2, 0, 0.
SEQ_LOGITS = np.array(
    [
        [[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 1.0, 2.0], [0.0, 1.0, 0.0]],
        [[0.0, 1.0, 3.0], [0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],
    ],
    np.float32,
)
SEQ_BATCH = {"y": SEQ_Y}


def test_sequence_token_accuracy_exact():
    stat = metrics.evaluate_batch(metrics.SequenceTokenAccuracy(), SEQ_BATCH, SEQ_LOGITS)
    # Non-padding tokens: 3 + 2 = 5; correct: seq0 pos0, pos2; seq1 pos0 -> 3.
    assert float(stat.accum) == 3.0 and float(stat.weight) == 5.0
    per_position = metrics.evaluate_batch(
        metrics.SequenceTokenAccuracy(per_position=True), SEQ_BATCH, SEQ_LOGITS
    )
    np.testing.assert_array_equal(per_position.accum, [2.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(per_position.weight, [2.0, 2.0, 1.0, 0.0])
    # A logits mask of -inf on class 2 forces arg-max among classes 0 and 1.
    masked = metrics.SequenceTokenAccuracy(logits_mask=(0.0, 0.0, -np.inf))
    stat = metrics.evaluate_batch(masked, SEQ_BATCH, SEQ_LOGITS)
    # Arg-max now: seq0 -> 1, 0, 1, ...; seq1 -> 1, 1 -> correct seq0 pos0, seq1 pos1.
    assert float(stat.accum) == 2.0 and float(stat.weight) == 5.0


def test_sequence_token_top_k_accuracy_exact():
    stat = metrics.evaluate_batch(metrics.SequenceTokenTopKAccuracy(k=2), SEQ_BATCH, SEQ_LOGITS)
    # Top-2: seq0 {1,2} {0,2} {2,1}; seq1 {2,1} {2,1}: every real token hits.
    assert float(stat.accum) == 5.0 and float(stat.weight) == 5.0
    # Masking class 2 out leaves top-2 = {0, 1} everywhere: only targets equal to 1 hit.
    masked = metrics.SequenceTokenTopKAccuracy(k=2, logits_mask=(0.0, 0.0, -np.inf))
    stat = metrics.evaluate_batch(masked, SEQ_BATCH, SEQ_LOGITS)
    assert float(stat.accum) == 2.0 and float(stat.weight) == 5.0
    top1 = metrics.evaluate_batch(metrics.SequenceTokenTopKAccuracy(k=1), SEQ_BATCH, SEQ_LOGITS)
    accuracy = metrics.evaluate_batch(metrics.SequenceTokenAccuracy(), SEQ_BATCH, SEQ_LOGITS)
    _leaves_equal(top1, accuracy)


def test_sequence_cross_entropy_metrics_match_numpy():
    flat_logits = SEQ_LOGITS.reshape(-1, 3)
    token_loss = _np_cross_entropy(flat_logits, SEQ_Y.reshape(-1)).reshape(2, 4)
    real = SEQ_Y != 0
    token = metrics.evaluate_batch(metrics.SequenceTokenCrossEntropyLoss(), SEQ_BATCH, SEQ_LOGITS)
    assert float(token.weight) == 5.0
    assert float(token.accum) == pytest.approx(token_loss[real].sum(), rel=1e-6)
    sequence = metrics.evaluate_batch(metrics.SequenceCrossEntropyLoss(), SEQ_BATCH, SEQ_LOGITS)
    assert float(sequence.weight) == 2.0
    assert float(sequence.result()) == pytest.approx(token_loss[real].sum() / 2, rel=1e-6)


def test_sequence_counting_metrics_exact():
    with_empty = {"y": np.concatenate([SEQ_Y, np.zeros((1, 4), np.int32)])}
    logits = np.zeros((3, 4, 3), np.float32)
    token_count = metrics.evaluate_batch(metrics.SequenceTokenCount(), with_empty, logits)
    assert float(token_count.result()) == 5.0
    count = metrics.evaluate_batch(
        metrics.SequenceTokenCount(masked_target_values=(0, 2)), with_empty, logits
    )
    assert float(count.result()) == 2.0
    assert float(metrics.evaluate_batch(metrics.SequenceCount(), with_empty, logits).result()) == 2
    length = metrics.evaluate_batch(metrics.SequenceLength(), with_empty, logits)
    assert float(length.accum) == 5.0 and float(length.weight) == 2.0
    oov = metrics.evaluate_batch(
        metrics.SequenceTokenOOVRate(oov_target_values=(2,)), with_empty, logits
    )
    assert float(oov.accum) == 3.0 and float(oov.weight) == 5.0
    # Sequence 0 has no 2 (eos) -> truncated; sequence 1 has one; the empty one does not count.
    truncation = metrics.evaluate_batch(
        metrics.SequenceTruncationRate(eos_target_value=2),
        {"y": np.array([[1, 1, 0], [1, 2, 0], [0, 0, 0]])},
        logits,
    )
    assert float(truncation.accum) == 1.0 and float(truncation.weight) == 2.0


# ----------------------------------------------------------------------------------------------
# Masks, merging and batching invariance, for every metric.
# ----------------------------------------------------------------------------------------------

CLASSIFICATION_METRICS = [
    metrics.Accuracy(),
    metrics.CrossEntropyLoss(),
    metrics.TopKAccuracy(k=2),
    metrics.ConfusionMatrix(num_classes=3),
    metrics.PerDomainMetric(metrics.Accuracy(), num_domains=2),
    metrics.PerDomainMetric(metrics.CrossEntropyLoss(), num_domains=2),
]
SEQUENCE_METRICS = [
    metrics.SequenceTokenCrossEntropyLoss(),
    metrics.SequenceTokenCrossEntropyLoss(per_position=True),
    metrics.SequenceCrossEntropyLoss(),
    metrics.SequenceTokenAccuracy(),
    metrics.SequenceTokenTopKAccuracy(k=2, per_position=True),
    metrics.SequenceTokenCount(),
    metrics.SequenceCount(),
    metrics.SequenceTruncationRate(eos_target_value=2),
    metrics.SequenceTokenOOVRate(oov_target_values=(2,)),
    metrics.SequenceLength(),
]


def _random_classification(n: int, seed: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {
        "y": rng.integers(0, 3, n).astype(np.int32),
        "domain_id": rng.integers(0, 2, n).astype(np.int32),
    }
    return batch, rng.normal(size=(n, 3)).astype(np.float32)


def _random_sequences(n: int, seed: int) -> tuple[dict, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, (n, 5)).astype(np.int32)
    y[0] = 0  # One fully padded sequence.
    return {"y": y}, rng.normal(size=(n, 5, 4)).astype(np.float32)


def _cases():
    for metric in CLASSIFICATION_METRICS:
        yield pytest.param(metric, _random_classification, id=repr(metric))
    for metric in SEQUENCE_METRICS:
        yield pytest.param(metric, _random_sequences, id=repr(metric))


def _take(tree, index):
    return jax.tree_util.tree_map(lambda x: x[index], tree)


def _assert_stats_close(a: metrics.Stat, b: metrics.Stat) -> None:
    assert type(a) is type(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("metric", "make"), list(_cases()))
def test_masked_batch_equals_unmasked_subset(metric, make):
    batch, preds = make(8, seed=0)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 1], bool)
    # Padded examples may hold garbage: NaN predictions must not leak through the mask.
    preds = preds.copy()
    preds[~mask] = np.nan
    masked = metrics.evaluate_batch(metric, batch, preds, mask)
    subset = metrics.evaluate_batch(metric, _take(batch, mask), preds[mask])
    _assert_stats_close(masked, subset)
    assert np.all(np.isfinite(np.asarray(masked.result())))
    # An all-true mask is the same as no mask.
    all_true = metrics.evaluate_batch(metric, batch, preds, np.ones(8, bool))
    _leaves_equal(all_true, metrics.evaluate_batch(metric, batch, preds))


@pytest.mark.parametrize(("metric", "make"), list(_cases()))
def test_batching_invariance_and_associativity(metric, make):
    batch, preds = make(9, seed=1)
    whole = metrics.evaluate_batch(metric, batch, preds)

    def evaluate_split(bounds):
        stats = [
            metrics.evaluate_batch(metric, _take(batch, slice(a, b)), preds[a:b])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        ]
        return stats

    a, b, c = evaluate_split([0, 2, 7, 9])
    left = a.merge(b).merge(c)
    right = a.merge(b.merge(c))
    _assert_stats_close(left, right)
    _assert_stats_close(left, whole)
    singles = evaluate_split(list(range(10)))
    merged = metric.zero()
    for stat in singles:
        merged = merged.merge(stat)
    _assert_stats_close(merged, whole)
    np.testing.assert_allclose(merged.result(), whole.result(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("metric", "make"), list(_cases()))
def test_zero_is_identity_of_evaluate_example(metric, make):
    batch, preds = make(1, seed=2)
    stat = metric.evaluate_example(_take(batch, 0), preds[0])
    zero = metric.zero()
    assert type(zero) is type(stat)
    for z, s in zip(jax.tree_util.tree_leaves(zero), jax.tree_util.tree_leaves(stat), strict=True):
        # As in FedJAX, per-position metrics return a scalar zero that broadcasts over positions.
        assert jnp.broadcast_shapes(jnp.shape(z), jnp.shape(s)) == jnp.shape(s)
    _leaves_equal(zero.merge(stat), stat)
    _leaves_equal(stat.merge(zero), stat)


def test_integer_valued_stats_merge_exactly():
    batch, preds = _random_classification(64, seed=3)
    whole = metrics.evaluate_batch(metrics.Accuracy(), batch, preds)
    halves = [
        metrics.evaluate_batch(metrics.Accuracy(), _take(batch, s), preds[s])
        for s in (slice(0, 23), slice(23, 64))
    ]
    _leaves_equal(halves[0].merge(halves[1]), whole)


def test_all_masked_batch_gives_zero_weight_and_result_zero():
    stat = metrics.evaluate_batch(metrics.Accuracy(), BATCH, LOGITS, np.zeros(5, bool))
    assert float(stat.weight) == 0.0 and float(stat.accum) == 0.0
    assert float(stat.result()) == 0.0
    cm = metrics.evaluate_batch(metrics.ConfusionMatrix(3), BATCH, LOGITS, np.zeros(5, bool))
    np.testing.assert_array_equal(cm.result(), np.zeros((3, 3)))


# ----------------------------------------------------------------------------------------------
# jit and hashing.
# ----------------------------------------------------------------------------------------------


def test_evaluate_batch_inside_jit_accumulates_like_eager():
    metric = metrics.CrossEntropyLoss()
    batch, preds = _random_classification(12, seed=4)
    mask = np.arange(12) < 10

    @jax.jit
    def accumulate(batch, preds, mask):
        stat = metric.zero()
        for start in (0, 4, 8):
            part = slice(start, start + 4)
            stat = stat.merge(
                metrics.evaluate_batch(metric, _take(batch, part), preds[part], mask[part])
            )
        return stat

    jitted = accumulate(batch, preds, mask)
    eager = metrics.evaluate_batch(metric, _take(batch, mask), preds[mask])
    _assert_stats_close(jitted, eager)
    assert float(jitted.weight) == 10.0


def test_metrics_are_hashable_static_arguments():
    assert metrics.Accuracy() == metrics.Accuracy()
    assert hash(metrics.TopKAccuracy(k=2)) == hash(metrics.TopKAccuracy(k=2))
    assert metrics.TopKAccuracy(k=2) != metrics.TopKAccuracy(k=3)
    assert jax.tree_util.tree_leaves(metrics.PerDomainMetric(metrics.Accuracy(), 2)) == []
    assert metrics.Accuracy().replace(target_key="label").target_key == "label"
    f = jax.jit(lambda m, b, p: metrics.evaluate_batch(m, b, p).result(), static_argnums=0)
    assert float(f(metrics.TopKAccuracy(k=2), BATCH, LOGITS)) == pytest.approx(0.8)
    # Metrics carry no leaves, so they also pass through jit as ordinary (traced) arguments.
    g = jax.jit(lambda m, b, p: metrics.evaluate_batch(m, b, p).result())
    assert float(g(metrics.Accuracy(), BATCH, LOGITS)) == pytest.approx(0.4)


def test_defaults_match_fedjax_signatures():
    assert (metrics.Accuracy().target_key, metrics.Accuracy().pred_key) == ("y", None)
    assert metrics.PerDomainMetric(metrics.Accuracy(), 2).domain_id_key == "domain_id"
    token = metrics.SequenceTokenAccuracy()
    assert (token.masked_target_values, token.logits_mask, token.per_position) == (
        (0,),
        None,
        False,
    )
    with pytest.raises(TypeError):
        metrics.TopKAccuracy()  # k is required.


# ----------------------------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------------------------


def test_missing_target_key_names_key_and_available_keys():
    with pytest.raises(KeyError, match=r"target_key='label'.*available keys: \['x', 'y'\]"):
        metrics.evaluate_batch(metrics.Accuracy(target_key="label"), BATCH, LOGITS)


def test_missing_pred_key_names_key_and_available_keys():
    prediction = {"logits": LOGITS}
    with pytest.raises(KeyError, match=r"pred_key='scores'.*available keys: \['logits'\]"):
        metrics.evaluate_batch(metrics.CrossEntropyLoss(pred_key="scores"), BATCH, prediction)
    with pytest.raises(KeyError, match=r"dict with keys \['logits'\] but pred_key is None"):
        metrics.evaluate_batch(metrics.Accuracy(), BATCH, prediction)
    with pytest.raises(KeyError, match="prediction is an array.*pred_key=None"):
        metrics.evaluate_batch(metrics.Accuracy(pred_key="logits"), BATCH, LOGITS)
    ok = metrics.evaluate_batch(metrics.Accuracy(pred_key="logits"), BATCH, prediction)
    assert float(ok.result()) == pytest.approx(0.4)


def test_missing_domain_id_key():
    metric = metrics.PerDomainMetric(metrics.Accuracy(), num_domains=2, domain_id_key="writer")
    with pytest.raises(KeyError, match="domain_id_key='writer'"):
        metrics.evaluate_batch(metric, BATCH, LOGITS)


def test_mask_of_wrong_shape():
    with pytest.raises(ValueError, match=r"batch_mask must have shape \[5\].*\(4,\)"):
        metrics.evaluate_batch(metrics.Accuracy(), BATCH, LOGITS, np.ones(4, bool))


def test_argmax_last_equals_jnp_argmax_with_ties_nans_and_infs():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 7)).astype(np.float32)
    logits[1] = 0.0  # All tied: index 0.
    logits[2, [2, 5]] = 9.0  # A tie for the maximum: the lower index.
    logits[3, [4, 1]] = np.nan  # NaNs: the first NaN.
    logits[4] = np.nan
    logits[5] = -np.inf
    logits[6, 3] = np.inf
    logits[7, [3, 6]] = np.inf
    for batch in (logits, logits[0], logits.reshape(8, 8, 7)):
        np.testing.assert_array_equal(
            np.asarray(metrics.argmax_last(batch)), np.asarray(jnp.argmax(batch, axis=-1))
        )
