"""The Model container and the functions that train and evaluate with it.

A :class:`Model` bundles the pure functions that centralized and federated training need:
``init``, ``apply_for_train``, ``apply_for_eval``, ``train_loss`` and ``eval_metrics``. It
works for Haiku (:func:`create_model_from_haiku`), stax (:func:`create_model_from_stax`) or
hand-written functions, with FedJAX 0.0.17's names, semantics and numbers.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core import metrics
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.typing import (
    EXAMPLE_MASK_KEY,
    BatchExample,
    BatchPrediction,
    ClientId,
    Params,
    PRNGKey,
)

__all__ = [
    "AverageLossEvaluator",
    "BatchEvalPrediction",
    "BatchTrainOutput",
    "Model",
    "ModelEvaluator",
    "create_model_from_haiku",
    "create_model_from_stax",
    "evaluate_average_loss",
    "evaluate_model",
    "grad",
    "model_grad",
    "model_per_example_loss",
]

# Usually the unnormalized logits of a batch.
BatchTrainOutput = jax.Array
BatchEvalPrediction = BatchPrediction
PerExampleLoss = Callable[[Params, BatchExample, PRNGKey], jax.Array]
Regularizer = Callable[[Params], jax.Array]


@dataclass
class Model:
    """The functions that define a model for training and evaluation.

    Attributes:
        init: ``rng -> params``, the initial parameters (a pytree).
        apply_for_train: ``(params, batch, rng) -> output``, the forward pass in training mode
            (dropout etc. drawn from ``rng``); its output feeds ``train_loss``.
        apply_for_eval: ``(params, batch) -> prediction``, the deterministic forward pass; its
            output feeds ``eval_metrics``.
        train_loss: ``(batch, output) -> loss``, a vector with one loss per example (not
            reduced; training takes the masked mean).
        eval_metrics: Ordered mapping of metric name to :class:`~fedjax_exp.metrics.Metric`,
            used by :func:`evaluate_model`.

    A Model is frozen: use ``model.replace(train_loss=...)`` to derive a variant. It is
    hashable and can be a static argument of ``jax.jit``. Unlike FedJAX (which compares
    Models by identity), two Models are equal when they hold the same functions and equal
    metrics in the same order, so a ``replace`` that changes nothing reuses compiled code.
    """

    init: Callable[[PRNGKey], Params]
    apply_for_train: Callable[[Params, BatchExample, PRNGKey | None], BatchTrainOutput]
    apply_for_eval: Callable[[Params, BatchExample], BatchEvalPrediction]
    train_loss: Callable[[BatchExample, BatchTrainOutput], jax.Array]
    eval_metrics: Mapping[str, metrics.Metric]

    def _functions(self) -> tuple[Callable[..., Any], ...]:
        return (self.init, self.apply_for_train, self.apply_for_eval, self.train_loss)

    # eval_metrics is usually a plain (unhashable) dict, so the generated dataclass hash would
    # fail; hash the functions and the metric items instead. Metrics are frozen dataclasses
    # and hashable; should one not be, the names alone keep hash consistent with __eq__.
    def __hash__(self) -> int:
        items = tuple(self.eval_metrics.items())
        try:
            return hash((self._functions(), items))
        except TypeError:
            return hash((self._functions(), tuple(name for name, _ in items)))

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Model) or self._functions() != other._functions():
            return False
        mine, theirs = tuple(self.eval_metrics.items()), tuple(other.eval_metrics.items())
        try:
            return bool(mine == theirs)
        except Exception:  # E.g. a metric holding arrays: be conservative, not equal.
            return False


def create_model_from_haiku(
    transformed_forward_pass: hk.Transformed,
    sample_batch: BatchExample,
    train_loss: Callable[[BatchExample, BatchTrainOutput], jax.Array],
    eval_metrics: Mapping[str, metrics.Metric] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
) -> Model:
    """Builds a Model from a Haiku ``hk.transform``-ed forward pass ``f(batch, **kwargs)``.

    Args:
        transformed_forward_pass: ``hk.transform(forward_pass)``.
        sample_batch: A batch with the model's input shapes; only used to create the params.
        train_loss: Per-example training loss ``(batch, output) -> [batch]``.
        eval_metrics: Metric name -> Metric for :func:`evaluate_model`; default none.
        train_kwargs: Extra keyword arguments of the forward pass in training
            (e.g. ``{'is_train': True}`` to enable dropout).
        eval_kwargs: Extra keyword arguments of the forward pass in evaluation.

    Returns:
        The Model; ``init``, ``apply_for_train`` and ``apply_for_eval`` are jitted.
    """
    eval_metrics = dict(eval_metrics or {})
    train_kwargs = dict(train_kwargs or {})
    eval_kwargs = dict(eval_kwargs or {})

    @jax.jit
    def init(rng: PRNGKey) -> Params:
        return transformed_forward_pass.init(rng, sample_batch)

    @jax.jit
    def apply_for_train(
        params: Params, batch: BatchExample, rng: PRNGKey | None = None
    ) -> BatchTrainOutput:
        return transformed_forward_pass.apply(params, rng, batch, **train_kwargs)

    @jax.jit
    def apply_for_eval(params: Params, batch: BatchExample) -> BatchEvalPrediction:
        return transformed_forward_pass.apply(params, None, batch, **eval_kwargs)

    return Model(init, apply_for_train, apply_for_eval, train_loss, eval_metrics)


def create_model_from_stax(
    stax_init: Callable[..., Any],
    stax_apply: Callable[..., jax.Array],
    sample_shape: tuple[int, ...],
    train_loss: Callable[[BatchExample, BatchTrainOutput], jax.Array],
    eval_metrics: Mapping[str, metrics.Metric] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    eval_kwargs: Mapping[str, Any] | None = None,
    input_key: str = "x",
) -> Model:
    """Builds a Model from the ``(init_fun, apply_fun)`` pair of ``stax.serial``.

    Args:
        stax_init: ``init_fun(rng, input_shape) -> (output_shape, params)``.
        stax_apply: ``apply_fun(params, inputs, rng=..., **kwargs) -> output``.
        sample_shape: Input shape for ``stax_init``; -1 for the batch dimension.
        train_loss: Per-example training loss ``(batch, output) -> [batch]``.
        eval_metrics: Metric name -> Metric for :func:`evaluate_model`; default none.
        train_kwargs: Extra keyword arguments of ``stax_apply`` in training.
        eval_kwargs: Extra keyword arguments of ``stax_apply`` in evaluation.
        input_key: The batch feature fed to the network.

    Returns:
        The Model; ``init``, ``apply_for_train`` and ``apply_for_eval`` are jitted.
    """
    eval_metrics = dict(eval_metrics or {})
    train_kwargs = dict(train_kwargs or {})
    eval_kwargs = dict(eval_kwargs or {})
    sample_shape = tuple(sample_shape)

    @jax.jit
    def init(rng: PRNGKey) -> Params:
        _, params = stax_init(rng, sample_shape)
        return params

    @jax.jit
    def apply_for_train(
        params: Params, batch: BatchExample, rng: PRNGKey | None = None
    ) -> BatchTrainOutput:
        return stax_apply(params, batch[input_key], rng=rng, **train_kwargs)

    @jax.jit
    def apply_for_eval(params: Params, batch: BatchExample) -> BatchEvalPrediction:
        return stax_apply(params, batch[input_key], **eval_kwargs)

    return Model(init, apply_for_train, apply_for_eval, train_loss, eval_metrics)


# ----------------------------------------------------------------------------------------------
# Losses and gradients.
# ----------------------------------------------------------------------------------------------


def _batch_size(batch: BatchExample) -> int | None:
    """The leading dimension of the batch's features (None if it has no array features)."""
    if EXAMPLE_MASK_KEY in batch:
        return int(jnp.shape(batch[EXAMPLE_MASK_KEY])[0])
    for value in jax.tree_util.tree_leaves(batch):
        if jnp.ndim(value) > 0:
            return int(jnp.shape(value)[0])
    return None


def _check_per_example(loss: jax.Array, batch: BatchExample, source: str) -> None:
    """Fails at trace time when a loss is not one value per example.

    A scalar (already averaged) loss would otherwise be silently re-averaged or broadcast
    against the padding mask, giving a wrong gradient for padded batches.
    """
    batch_size = _batch_size(batch)
    if jnp.ndim(loss) != 1 or (batch_size is not None and jnp.shape(loss)[0] != batch_size):
        expected = f"[{batch_size}]" if batch_size is not None else "[batch_size]"
        raise ValueError(
            f"{source} must return one loss per example, shape {expected}, but returned shape "
            f"{tuple(jnp.shape(loss))}. Do not reduce (mean/sum) inside the loss; the training "
            "step takes the mean over the unmasked examples."
        )


def model_per_example_loss(model: Model) -> PerExampleLoss:
    """``(params, batch, rng) -> [batch]``: ``model.train_loss`` of ``model.apply_for_train``.

    Raises:
        ValueError: (when called) if ``model.train_loss`` does not return a vector with one
            entry per example.
    """

    def per_example_loss(params: Params, batch: BatchExample, rng: PRNGKey) -> jax.Array:
        loss = model.train_loss(batch, model.apply_for_train(params, batch, rng))
        _check_per_example(loss, batch, "Model.train_loss")
        return loss

    return per_example_loss


def _mean_loss(batch_loss: jax.Array, batch: BatchExample) -> jax.Array:
    """The mean over the real examples: padding (mask False) contributes nothing."""
    if EXAMPLE_MASK_KEY in batch:
        mask = batch[EXAMPLE_MASK_KEY]
        return metrics._safe_divide(jnp.vdot(batch_loss, mask), jnp.sum(mask))
    return jnp.mean(batch_loss)


def grad(
    per_example_loss: PerExampleLoss, regularizer: Regularizer | None = None
) -> Callable[[Params, BatchExample, PRNGKey], Params]:
    """The jitted gradient of ``mean(per_example_loss) + regularizer(params)``.

    The mean is over the unmasked examples when the batch carries ``EXAMPLE_MASK_KEY``
    (a padded batch), so padding does not dilute the gradient; an all-padding batch gives a
    zero data gradient.

    Args:
        per_example_loss: ``(params, batch, rng) -> [batch]``.
        regularizer: Optional ``params -> scalar`` added to the mean loss.

    Returns:
        ``(params, batch, rng) -> grads`` with the structure of the params.
    """

    def scalar_loss(params: Params, batch: BatchExample, rng: PRNGKey) -> jax.Array:
        batch_loss = per_example_loss(params, batch, rng)
        _check_per_example(batch_loss, batch, "The per-example loss")
        loss = _mean_loss(batch_loss, batch)
        if regularizer is not None:
            loss += regularizer(params)
        return loss

    return jax.jit(jax.grad(scalar_loss))


def model_grad(
    model: Model, regularizer: Regularizer | None = None
) -> Callable[[Params, BatchExample, PRNGKey], Params]:
    """:func:`grad` of the model's per-example training loss (masked mean + regularizer)."""
    return grad(model_per_example_loss(model), regularizer)


# ----------------------------------------------------------------------------------------------
# Evaluation with metrics.
# ----------------------------------------------------------------------------------------------

Stats = dict[str, metrics.Stat]

# Consecutive batches of one shape are stacked into blocks of this many and evaluated by one
# dispatch of one compiled program; a run's remaining batches go one by one, so a batch shape
# compiles at most two programs (blocks of 8 batches and of 1).
_BLOCK_BATCHES = 8


def _batch_stats(model: Model, params: Params, batch: BatchExample) -> Stats:
    """Each eval metric's statistic of one batch; padding (mask False) contributes nothing."""
    prediction = model.apply_for_eval(params, batch)
    mask = batch.get(EXAMPLE_MASK_KEY)
    if mask is not None:
        mask = jnp.asarray(mask).astype(jnp.bool_)
    return {
        name: metrics.evaluate_batch(metric, batch, prediction, mask)
        for name, metric in model.eval_metrics.items()
    }


def _merge(stats: Stats, other: Stats) -> Stats:
    return {name: stat.merge(other[name]) for name, stat in stats.items()}


@functools.partial(jax.jit, static_argnums=0)
def _evaluate_block(
    model: Model, params: Params, batches: tuple[BatchExample, ...], stats: Stats
) -> Stats:
    """``stats`` merged with the statistics of each of the same-shape ``batches``, in order.

    The batches are stacked on the device (stacking NumPy batches on the host measured slower:
    a fresh host buffer per block) and scanned: the model runs on one batch at a time and the
    statistics merge in stream order, so the numbers are those of batch-by-batch evaluation
    (FedJAX's), bit for bit.
    """
    block = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *batches)
    # A scan's carry keeps its dtypes: start from what merging a batch gives (the incoming
    # zero statistics may be of other dtypes). eval_shape runs at trace time only.
    merged = jax.eval_shape(lambda s: _merge(s, _batch_stats(model, params, batches[0])), stats)
    stats = jax.tree_util.tree_map(lambda s, m: jnp.asarray(s, m.dtype), stats, merged)

    def step(stats: Stats, batch: BatchExample) -> tuple[Stats, None]:
        return _merge(stats, _batch_stats(model, params, batch)), None

    return jax.lax.scan(step, stats, block)[0]


@jax.jit
def _results(stats: Stats) -> dict[str, jax.Array]:
    return {name: stat.result() for name, stat in stats.items()}


def _signature(batch: BatchExample) -> Any:
    """What batches must share to be stacked: structure, keys, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x))) for x in leaves)


def _blocks(batches: Iterable[BatchExample]) -> Iterator[tuple[BatchExample, ...]]:
    """Consecutive same-shape batches grouped by ``_BLOCK_BATCHES``; the rest of a run of one
    shape (fewer) one by one."""
    pending: list[BatchExample] = []
    pending_signature = None
    for batch in batches:
        signature = _signature(batch)
        if signature != pending_signature:
            yield from ((b,) for b in pending)
            pending, pending_signature = [], signature
        pending.append(batch)
        if len(pending) == _BLOCK_BATCHES:
            yield tuple(pending)
            pending = []
    yield from ((b,) for b in pending)


# Cached per model: metric.zero() runs small eager JAX ops (~0.2 ms, a fifth of evaluating a
# client's single batch). Device arrays are immutable, so one set serves every call.
@functools.lru_cache(maxsize=64)
def _zero_stats(model: Model) -> Stats:
    """Each metric's zero statistic as device arrays of JAX's canonical (not weak) dtypes: the
    dtypes merged statistics have, so that the first block reuses the others' program."""
    zeros = {name: metric.zero() for name, metric in model.eval_metrics.items()}
    return jax.tree_util.tree_map(
        lambda x: jax.device_put(np.asarray(x, _canonical_dtype(x))), zeros
    )


def _canonical_dtype(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)  # np.result_type of a JAX array is deprecated.
    return jax.dtypes.canonicalize_dtype(np.result_type(leaf) if dtype is None else dtype)


def _evaluate(
    model: Model, params: Params, batches: Iterable[BatchExample], caller: str
) -> dict[str, np.ndarray]:
    stats, evaluated = _zero_stats(model), False
    for block in _blocks(batches):
        # No host sync here: blocks are dispatched asynchronously, the stats stay on device.
        stats, evaluated = _evaluate_block(model, params, block, stats), True
    if not evaluated:
        warnings.warn(
            f"{caller} got no batches; returning each metric's zero result (0 for means and "
            "sums), as FedJAX does. Check that the dataset or client is not empty.",
            RuntimeWarning,
            stacklevel=3,
        )
    results = jax.device_get(_results(stats))  # The one device -> host transfer of the call.
    # jit returns dicts with sorted keys; give them back in the order the model lists them.
    return {name: results[name] for name in model.eval_metrics}


def evaluate_model(
    model: Model, params: Params, batches: Iterable[BatchExample]
) -> dict[str, np.ndarray]:
    """Evaluates ``model.eval_metrics`` of ``params`` over all examples in ``batches``.

    Batches may be padded: examples whose ``EXAMPLE_MASK_KEY`` entry is false are ignored.
    Consecutive batches of one shape are taken 8 at a time, and each 8 is stacked and
    evaluated by one jitted program that runs the model batch by batch and merges the
    statistics in order, so the results equal batch-by-batch evaluation (FedJAX's) exactly.
    Statistics stay on the device; the host waits once per call, for the results.

    Args:
        model: The Model (``apply_for_eval`` and ``eval_metrics`` are used).
        params: The parameters to evaluate.
        batches: An iterable of batches (dicts of arrays with a leading batch axis).

    Returns:
        Metric name -> result, as 0-d (or, e.g. for a confusion matrix, n-d) NumPy arrays, in
        the order of ``model.eval_metrics``.

        An empty ``batches`` gives each metric's zero-statistic result (0 for ``MeanStat``
        and ``SumStat`` metrics), the same numbers FedJAX 0.0.17 returns, and emits a
        ``RuntimeWarning`` so an empty evaluation set does not pass unnoticed.
    """
    return _evaluate(model, params, batches, "evaluate_model")


class ModelEvaluator:
    """Evaluates a model on each client's batches, with shared or per-client params.

    To evaluate on a single dataset use :func:`evaluate_model`. Each client's result is
    computed as :func:`evaluate_model` would, including the warning for a client without
    batches.
    """

    def __init__(self, model: Model):
        self._model = model

    def evaluate_global_params(
        self, params: Params, clients: Iterable[tuple[ClientId, Iterable[BatchExample]]]
    ) -> Iterator[tuple[ClientId, dict[str, np.ndarray]]]:
        """Yields ``(client_id, results)`` for each client, all evaluated with ``params``."""
        return self.evaluate_per_client_params(
            (client_id, batches, params) for client_id, batches in clients
        )

    def evaluate_per_client_params(
        self, clients: Iterable[tuple[ClientId, Iterable[BatchExample], Params]]
    ) -> Iterator[tuple[ClientId, dict[str, np.ndarray]]]:
        """Yields ``(client_id, results)`` for each ``(client_id, batches, params)``."""
        for client_id, batches, params in clients:
            yield client_id, _evaluate(self._model, params, batches, "ModelEvaluator")


# ----------------------------------------------------------------------------------------------
# Evaluation of the average training loss.
# ----------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _average_loss_step(
    per_example_loss: PerExampleLoss,
    params: Params,
    batch: BatchExample,
    rng: PRNGKey,
    loss_sum: jax.Array,
    num_examples: jax.Array,
) -> tuple[PRNGKey, jax.Array, jax.Array]:
    rng, use_rng = jax.random.split(rng)
    loss = per_example_loss(params, batch, use_rng)
    _check_per_example(loss, batch, "The per-example loss")
    if EXAMPLE_MASK_KEY in batch:
        mask = batch[EXAMPLE_MASK_KEY]
        loss_sum += jnp.vdot(mask, loss)
        num_examples += jnp.sum(mask)
    else:
        loss_sum += jnp.sum(loss)
        num_examples += loss.shape[0]
    return rng, loss_sum, num_examples


@functools.partial(jax.jit, static_argnums=0)
def _finish_average_loss(
    regularizer: Regularizer | None,
    params: Params,
    loss_sum: jax.Array,
    num_examples: jax.Array,
) -> jax.Array:
    average = metrics._safe_divide(loss_sum, num_examples)
    if regularizer is not None:
        average += regularizer(params)
    return average


def _zero_accumulators() -> tuple[jax.Array, jax.Array]:
    # float32 counts are exact up to 2**24 examples; fixed dtypes mean one compile per shape.
    return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)


def evaluate_average_loss(
    params: Params,
    batches: Iterable[BatchExample],
    rng: PRNGKey,
    per_example_loss: PerExampleLoss,
    regularizer: Regularizer | None = None,
) -> jax.Array:
    """The mean per-example loss over all (unmasked) examples, plus ``regularizer(params)``.

    ``rng`` is split once per batch, in order, for the stochastic forward pass. With no
    batches (or only padding) the mean part is 0.
    """
    loss_sum, num_examples = _zero_accumulators()
    for batch in batches:
        rng, loss_sum, num_examples = _average_loss_step(
            per_example_loss, params, batch, rng, loss_sum, num_examples
        )
    return _finish_average_loss(regularizer, params, loss_sum, num_examples)


class AverageLossEvaluator:
    """:func:`evaluate_average_loss` for each client, with shared or per-client params."""

    def __init__(self, per_example_loss: PerExampleLoss, regularizer: Regularizer | None = None):
        self._per_example_loss = per_example_loss
        self._regularizer = regularizer

    def evaluate_global_params(
        self,
        params: Params,
        clients: Iterable[tuple[ClientId, Iterable[BatchExample], PRNGKey]],
    ) -> Iterator[tuple[ClientId, jax.Array]]:
        """Yields ``(client_id, average_loss)`` for each ``(client_id, batches, rng)``."""
        return self.evaluate_per_client_params(
            (client_id, batches, rng, params) for client_id, batches, rng in clients
        )

    def evaluate_per_client_params(
        self, clients: Iterable[tuple[ClientId, Iterable[BatchExample], PRNGKey, Params]]
    ) -> Iterator[tuple[ClientId, jax.Array]]:
        """Yields ``(client_id, average_loss)`` for each ``(client_id, batches, rng, params)``."""
        for client_id, batches, rng, params in clients:
            loss = evaluate_average_loss(
                params, batches, rng, self._per_example_loss, self._regularizer
            )
            yield client_id, loss
