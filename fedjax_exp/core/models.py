"""The Model container and the functions that train and evaluate with it.

A :class:`Model` bundles the pure functions that centralized and federated training need:
``init``, ``apply_for_train``, ``apply_for_eval``, ``train_loss`` and ``eval_metrics``. It
works for Haiku (:func:`create_model_from_haiku`), stax (:func:`create_model_from_stax`) or
hand-written functions, with FedJAX 0.0.17's names, semantics and numbers.
"""

from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core import metrics
from fedjax_exp.core.buffer_pool import ZERO_COPY_ALIGNMENT, BufferPool
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


# Evaluation has no sequential dependence, so consecutive batches of one shape are evaluated
# in blocks: one dispatch (and, for NumPy input, one zero-copy transfer) per block, the
# per-batch statistics merged in stream order, so the sums are formed exactly as batch-by-batch
# evaluation (and FedJAX) forms them. Two ways to run the model over a block, chosen once per
# model and shapes (_block_plan):
# - joined: one forward pass over all the block's examples (one large matmul/conv; the
#   weights are read once, which is what helps the stax CNN, whose 12.8M-weight dense layer
#   is memory bound), then each batch's slice of the predictions is reduced on its own. Used
#   only where a probe shows XLA rounds the joined pass exactly as the per-batch one.
# - per batch: one forward pass per batch inside the block; exact by construction, worth it
#   only where a batch's pass is cheap next to the fixed cost of a dispatch.
_MAX_BLOCK_BATCHES = 8
# Caps on one block's examples and input bytes: they bound the joined pass's memory.
_MAX_BLOCK_EXAMPLES = 1024
_MAX_BLOCK_BYTES = 8 << 20
# Forward-pass FLOPs (XLA's estimate) that one dispatch should carry at least, per backend:
# about a millisecond of work on one CPU core; far more on an accelerator, where launches
# dominate small steps.
_BLOCK_FLOPS = {"cpu": 256e6}
_BLOCK_FLOPS_ACCELERATOR = 16e9


def _batch_stats(model: Model, batch: BatchExample, prediction: BatchEvalPrediction) -> Stats:
    mask = batch.get(EXAMPLE_MASK_KEY)
    if mask is not None:
        mask = jnp.asarray(mask).astype(jnp.bool_)
    return {
        name: metrics.evaluate_batch(metric, batch, prediction, mask)
        for name, metric in model.eval_metrics.items()
    }


def _evaluate_block(
    model: Model,
    num_batches: int,
    joined_forward: bool,
    params: Params,
    parts: tuple[BatchExample, ...],
    stats: Stats,
) -> Stats:
    """Adds the statistics of a block of ``num_batches`` same-shape batches to ``stats``.

    ``parts`` concatenated along the batch axis are the block's examples: either the batches
    themselves or (NumPy input, joined on the host so that one transfer replaces many) one
    batch holding them all. The first block starts from :func:`_initial_stats`, whose dtypes
    are those of the returned stats, so one compiled step serves every block of a shape.

    ``joined_forward``: run the model once over the whole block (one large matmul/conv, the
    weights read once) rather than once per batch; only where :func:`_block_plan` found that
    it rounds exactly as the per-batch pass does.
    """
    if len(parts) == 1:
        joined = parts[0]
    else:
        joined = jax.tree_util.tree_map(lambda *leaves: jnp.concatenate(leaves), *parts)
    size = _batch_size(joined) // num_batches

    def batch_slice(tree: Any, i: int) -> Any:
        if num_batches == 1:
            return tree
        return jax.tree_util.tree_map(lambda leaf: leaf[i * size : (i + 1) * size], tree)

    if joined_forward:
        joined_prediction = model.apply_for_eval(params, joined)
        predictions = [batch_slice(joined_prediction, i) for i in range(num_batches)]
    else:
        predictions = [
            model.apply_for_eval(params, batch_slice(joined, i)) for i in range(num_batches)
        ]
    for i in range(num_batches):
        batch_stats = _batch_stats(model, batch_slice(joined, i), predictions[i])
        stats = {name: stats[name].merge(batch_stats[name]) for name in model.eval_metrics}
    return stats


# Jitted with the model static, so the compiled step is cached per (model, batch shapes, block
# length).
_evaluate_block_into = jax.jit(_evaluate_block, static_argnums=(0, 1, 2))


def _zero_stats(model: Model) -> Stats:
    """Each eval metric's zero statistic, by name."""
    return {name: metric.zero() for name, metric in model.eval_metrics.items()}


# Only ever traced (for the stats' shapes and dtypes), never compiled; jit caches the trace.
_block_stats_shapes = jax.jit(_evaluate_block, static_argnums=(0, 1, 2)).eval_shape


# (model, block length, joined, params and block shapes) -> the first block's input stats;
# cleared when full. Device arrays are immutable and never donated, so one serves every call.
_INITIAL_STATS: dict[tuple[Any, ...], Stats] = {}


def _initial_stats(
    model: Model,
    num_batches: int,
    joined_forward: bool,
    params: Params,
    params_signature: Any,
    parts: tuple[BatchExample, ...],
) -> Stats:
    """Each metric's zero, with the shapes and dtypes :func:`_evaluate_block_into` returns.

    Starting from Python-float zeros instead would make the first block a second program to
    compile (~0.2-0.4 s on the 2-core CPU) only because its input dtypes differ. Cached per
    shapes: building them (a trace lookup and a few small device arrays) took ~0.8 ms of
    every call, a tenth of evaluating 40 logistic batches.
    """
    try:
        key = (
            model,
            num_batches,
            joined_forward,
            params_signature,
            _tree_signature(parts),
        )
        cached = _INITIAL_STATS.get(key)
    except TypeError:  # An unhashable model: build them each time.
        key, cached = None, None
    if cached is not None:
        return cached
    zeros = _zero_stats(model)
    shapes = _block_stats_shapes(model, num_batches, joined_forward, params, parts, zeros)
    stats = jax.tree_util.tree_map(
        lambda z, s: jnp.broadcast_to(jnp.asarray(z, s.dtype), s.shape), zeros, shapes
    )
    if key is not None:
        if len(_INITIAL_STATS) >= _MAX_PLANS:
            _INITIAL_STATS.clear()
        _INITIAL_STATS[key] = stats
    return stats


# Joined blocks are written into reused aligned buffers: XLA:CPU then reads them in place (no
# transfer copy), and a reused buffer does not page-fault as a fresh one does (40 batches of
# 128 images joined: 4.2 ms into fresh buffers, 1.1 ms reused). A buffer is reused only when
# no array from an earlier call still refers to it.
_BLOCK_BUFFERS = BufferPool(per_key=3, max_keys=16)


def _aligned_concatenate(leaves: tuple[np.ndarray, ...]) -> np.ndarray:
    """``np.concatenate(leaves)`` into a buffer that the CPU device can use in place."""
    first = leaves[0]
    shape = (sum(leaf.shape[0] for leaf in leaves), *first.shape[1:])
    out = _BLOCK_BUFFERS.get("block", shape, np.result_type(*leaves), aligned=True)
    np.concatenate(leaves, out=out)
    return out


def _adjacent_view(leaves: tuple[np.ndarray, ...]) -> np.ndarray | None:
    """The leaves as one array without a copy, when they lie back to back in memory.

    Full padded batches of a column store are consecutive slices of one column: their
    concatenation is just the longer slice. None when the leaves are not such slices.
    """
    first = leaves[0]
    # Views of one owner array only: the joined view then stays inside its memory.
    if first.base is None or not all(
        leaf.base is first.base and leaf.flags.c_contiguous for leaf in leaves
    ):
        return None
    pointer = first.__array_interface__["data"][0]
    for leaf in leaves:
        if (
            leaf.dtype != first.dtype
            or leaf.shape[1:] != first.shape[1:]
            or leaf.__array_interface__["data"][0] != pointer
        ):
            return None
        pointer += leaf.nbytes
    shape = (sum(leaf.shape[0] for leaf in leaves), *first.shape[1:])
    return np.lib.stride_tricks.as_strided(first, shape, first.strides, writeable=False)


def _join_leaves(leaves: tuple[np.ndarray, ...]) -> np.ndarray:
    # An unaligned view would still be copied by the transfer, and that copy measured ~3x
    # slower than np.concatenate into an aligned buffer (which is then used in place). The
    # view starts where the first leaf does, so test that first: NumPy's allocations are
    # seldom aligned, and building a view only to drop it cost more than the copy itself.
    if leaves[0].ctypes.data % ZERO_COPY_ALIGNMENT == 0:
        view = _adjacent_view(leaves)
        if view is not None:
            return view
    return _aligned_concatenate(leaves)


def _block_parts(block: tuple[BatchExample, ...]) -> tuple[BatchExample, ...]:
    """The block as :func:`_evaluate_block_into` takes it.

    NumPy batches are joined on the host, per feature: consecutive slices of one array (a
    column store's padded batches) as the longer slice, without a copy, where it is aligned;
    others into one aligned buffer (one memory copy, which the device then reads in place
    instead of copying each batch in its own transfer). Device arrays are passed as they are
    (joined in the jit).
    """
    if len(block) > 1 and all(
        isinstance(leaf, np.ndarray) for batch in block for leaf in jax.tree_util.tree_leaves(batch)
    ):
        return (jax.tree_util.tree_map(lambda *leaves: _join_leaves(leaves), *block),)
    return block


def _dtype(leaf: Any) -> np.dtype:
    """A leaf's dtype: an array's own (``np.result_type`` of a JAX array is deprecated, as an
    implicit array-to-dtype conversion), else NumPy's for a Python scalar."""
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.result_type(leaf)


def _signature(batch: BatchExample) -> tuple[Any, ...] | None:
    """What must match for batches to share a block (None: evaluate this batch alone)."""
    if not isinstance(batch, Mapping):
        return None
    try:
        leaves, treedef = jax.tree_util.tree_flatten(batch)
        shapes = tuple((tuple(np.shape(leaf)), _dtype(leaf)) for leaf in leaves)
    except TypeError:
        return None
    if not leaves or any(len(shape) == 0 for shape, _ in shapes):
        return None
    sizes = {shape[0] for shape, _ in shapes}
    if len(sizes) != 1:
        return None  # Inconsistent leading axes: let the model report it, batch by batch.
    return treedef, shapes


def _abstract(treedef: Any, shapes: tuple[Any, ...]) -> Any:
    return jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]
    )


def _probe_batch(treedef: Any, shapes: tuple[Any, ...], rows: int, seed: int) -> Any:
    """Random features of ``shapes`` with ``rows`` examples (ints 0, masks True)."""
    rng = np.random.default_rng(seed)
    leaves = []
    for shape, dtype in shapes:
        shape = (rows, *shape[1:])
        if np.issubdtype(dtype, np.floating):
            leaves.append(rng.standard_normal(shape).astype(dtype))
        else:
            leaves.append(np.ones(shape, dtype) if dtype == np.bool_ else np.zeros(shape, dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _joined_forward_is_exact(
    model: Model, params: Params, signature: tuple[Any, ...], num_batches: int
) -> bool:
    """Whether one forward pass over ``num_batches`` joined batches rounds exactly as one
    pass per batch does.

    XLA picks its matmul/conv kernels by shape, and some kernels block the reduction
    differently, which changes the last bits of some outputs. The choice depends on the
    shapes only, so one probe on random inputs tells for all data: a kernel that reduces
    in another order would change many of the outputs' last bits.
    """
    treedef, shapes = signature
    rows = shapes[0][0][0]
    apply = jax.jit(model.apply_for_eval)
    block = _probe_batch(treedef, shapes, rows * num_batches, seed=0)
    joined = jax.tree_util.tree_leaves(jax.device_get(apply(params, block)))
    for i in range(num_batches):
        rows_i = slice(i * rows, (i + 1) * rows)
        part = jax.tree_util.tree_map(operator.itemgetter(rows_i), block)
        single = jax.tree_util.tree_leaves(jax.device_get(apply(params, part)))
        pairs = zip(joined, single, strict=True)
        if any(np.asarray(a[rows_i]).tobytes() != np.asarray(b).tobytes() for a, b in pairs):
            return False
    return True


# (model, params shapes, batch shapes) -> plan; cleared when full (plans are cheap to redo).
_PLANS: dict[tuple[Any, ...], tuple[int, bool]] = {}
_MAX_PLANS = 256


def _block_plan(
    model: Model, params: Params, params_signature: Any, signature: tuple[Any, ...]
) -> tuple[int, bool]:
    """``(batches per dispatch, joined forward pass)`` for batches of ``signature``.

    Decided once per (model, params shapes, batch shapes): a joined forward pass where it is
    exact (:func:`_joined_forward_is_exact`); otherwise one pass per batch, blocked only when
    the pass is cheap (XLA's cost estimate). ``(1, False)`` when neither can be established.

    Raises:
        TypeError: the model is not hashable (then nothing can be cached).
    """
    key = (model, params_signature, signature)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _make_block_plan(model, params, params_signature, signature)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _make_block_plan(
    model: Model, params: Params, params_signature: Any, signature: tuple[Any, ...]
) -> tuple[int, bool]:
    treedef, shapes = signature
    examples = shapes[0][0][0]
    nbytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in shapes)
    caps = min(
        _MAX_BLOCK_BATCHES,
        _MAX_BLOCK_EXAMPLES // max(examples, 1),
        _MAX_BLOCK_BYTES // max(nbytes, 1),
    )
    caps = _pow2_floor(caps)
    if caps == 1:
        return 1, False
    try:
        if _joined_forward_is_exact(model, params, signature, caps):
            return caps, True
    except Exception:  # A model the probe cannot run: fall back to the per-batch pass.
        pass
    try:
        cost = (
            jax.jit(model.apply_for_eval)
            .lower(_abstract(*params_signature), _abstract(treedef, shapes))
            .cost_analysis()
        )
        flops = float(cost["flops"])
    except Exception:  # No estimate (backend, unusual model): the safe per-batch path.
        return 1, False
    target = _BLOCK_FLOPS.get(jax.default_backend(), _BLOCK_FLOPS_ACCELERATOR)
    return _pow2_floor(min(caps, int(target // max(flops, 1.0)))), False


def _pow2_floor(n: int) -> int:
    """The largest power of two <= ``n`` (1 for ``n`` < 1)."""
    return 1 << (max(n, 1).bit_length() - 1)


def _tree_signature(tree: Any) -> Any:
    """``(treedef, ((shape, dtype) per leaf))``: what a jitted call is specialised on."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), _dtype(x)) for x in leaves)


def _blocks(
    model: Model, params: Params, params_signature: Any, batches: Iterable[BatchExample]
) -> Iterator[tuple[tuple[BatchExample, ...], bool]]:
    """Groups consecutive same-shape batches into blocks of the planned length.

    Yields ``(block, joined_forward)``. With a joined forward pass, padded batches (with
    ``EXAMPLE_MASK_KEY``) always make full blocks: the last one is filled with all-padding
    batches, which add exact zeros to every statistic, so a batch shape compiles one block
    program instead of one per remainder length (~0.2-0.4 s each on the 2-core CPU); the
    filler costs little, as blocks are planned to be cheap. Other blocks end in power-of-two
    lengths. A shape is planned only when a second batch of it follows the first, so a lone
    batch (a client's short final batch) costs no probe.
    """
    pending: list[BatchExample] = []
    pending_signature = None
    limit, joined_forward = 0, False  # 0: not planned yet.

    def flush() -> Iterator[tuple[tuple[BatchExample, ...], bool]]:
        start = 0
        while start < len(pending):
            rest = len(pending) - start
            if joined_forward and rest < limit and EXAMPLE_MASK_KEY in pending[start]:
                filler = (_all_padding(pending[start]),) * (limit - rest)
                yield tuple(pending[start:]) + filler, joined_forward
                break
            length = _pow2_floor(rest)
            yield tuple(pending[start : start + length]), joined_forward and length > 1
            start += length
        pending.clear()

    for batch in batches:
        signature = _signature(batch)
        if signature is None or signature != pending_signature:
            yield from flush()
            pending_signature = signature
            limit, joined_forward = 0, False
            if signature is None:
                yield (batch,), False
                continue
        elif limit == 0:  # The second batch of this shape: blocks may pay, plan them.
            try:
                limit, joined_forward = _block_plan(model, params, params_signature, signature)
            except TypeError:  # Unhashable model or params: no cache, no blocks.
                limit, joined_forward = 1, False
            if len(pending) >= limit:
                yield from flush()
        pending.append(batch)
        if len(pending) == limit:
            yield from flush()
    yield from flush()


def _all_padding(batch: BatchExample) -> BatchExample:
    """A batch shaped like ``batch`` whose examples are all padding (zeros, mask False)."""
    return jax.tree_util.tree_map(lambda leaf: np.zeros(np.shape(leaf), _dtype(leaf)), batch)


@jax.jit
def _results(stats: Stats) -> dict[str, jax.Array]:
    return {name: stat.result() for name, stat in stats.items()}


def _zero_results(model: Model) -> dict[str, jax.Array]:
    return _results(_zero_stats(model))


def _evaluate_batches(
    model: Model, params: Params, batches: Iterable[BatchExample], caller: str
) -> dict[str, np.ndarray]:
    stats = None
    # Once per call: both the block plan and the first block's stats are cached by it.
    params_signature = _tree_signature(params)
    for block, joined_forward in _blocks(model, params, params_signature, batches):
        parts = _block_parts(block)
        if stats is None:
            stats = _initial_stats(
                model, len(block), joined_forward, params, params_signature, parts
            )
        # No host sync here: the stats stay on device and blocks are dispatched asynchronously.
        stats = _evaluate_block_into(model, len(block), joined_forward, params, parts, stats)
    if stats is None:
        warnings.warn(
            f"{caller} got no batches; returning each metric's zero result (0 for means and "
            "sums), as FedJAX does. Check that the dataset or client is not empty.",
            RuntimeWarning,
            stacklevel=3,
        )
        results = _zero_results(model)
    else:
        results = _results(stats)
    # The one device -> host transfer of the call.
    results = jax.device_get(results)
    # jit returns dicts with sorted keys; give them back in the order the model lists them.
    return {name: results[name] for name in model.eval_metrics}


def evaluate_model(
    model: Model, params: Params, batches: Iterable[BatchExample]
) -> dict[str, np.ndarray]:
    """Evaluates ``model.eval_metrics`` of ``params`` over all examples in ``batches``.

    Batches may be padded: examples whose ``EXAMPLE_MASK_KEY`` entry is false are ignored.
    Statistics accumulate on the device; the host waits only once, for the final results.
    Consecutive batches of one shape are dispatched together, up to 8 (and 1024 examples) at
    a time, in one jitted step that still reduces and merges them batch by batch, in order.
    The model runs once over a whole block only where a one-off probe (per model and shapes)
    shows XLA rounds that exactly as one pass per batch; otherwise once per batch. Either way
    the numbers are batch-by-batch evaluation's (and FedJAX's): the tests check them bit for
    bit. Steps are compiled once per model, batch shape and block length (1, 2, 4 or 8), and
    reused; the first call for a model and batch shape also runs the probe.

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
    return _evaluate_batches(model, params, batches, "evaluate_model")


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
            yield client_id, _evaluate_batches(self._model, params, batches, "ModelEvaluator")


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
