"""Per-example training losses (the ``loss`` config group).

Two layers:

* array level, ``(targets, logits) -> [batch]``: :func:`softmax_cross_entropy`,
  :func:`multiclass_hinge`;
* ``Model.train_loss`` level, ``(batch, output) -> [batch]``: :func:`cross_entropy_loss`,
  :func:`hinge_loss`, which read the integer targets from ``batch[target_key]``.

:func:`get_train_loss` builds the latter by name with any target key. Losses are NOT reduced:
a training step takes the (masked) mean, see :func:`fedjax_exp.core.models.model_grad`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.core import metrics
from fedjax_exp.core.dataclasses import dataclass, field
from fedjax_exp.core.typing import BatchExample

__all__ = [
    "LOSSES",
    "PerExampleLossMetric",
    "TrainLoss",
    "cross_entropy_loss",
    "get_train_loss",
    "hinge_loss",
    "multiclass_hinge",
    "softmax_cross_entropy",
]

# (batch, model output) -> per-example loss vector.
TrainLoss = Callable[[BatchExample, jax.Array], jax.Array]


def softmax_cross_entropy(targets: jax.Array, logits: jax.Array) -> jax.Array:
    """``-sum_c onehot(y)_c * log_softmax(logits)_c``, one value per example.

    Args:
        targets: Integer class ids, shape ``[...]``.
        logits: Unnormalized scores, shape ``[..., num_classes]``.

    Returns:
        The per-example loss, shape ``[...]``: the sparse case of
        :func:`fedjax_exp.metrics.unreduced_cross_entropy_loss` (one definition, so training
        and evaluation losses cannot drift apart).
    """
    return metrics.unreduced_cross_entropy_loss(targets, logits)


def multiclass_hinge(targets: jax.Array, scores: jax.Array) -> jax.Array:
    """The multi-class (Crammer-Singer) hinge loss, one value per example.

    ``max_c (s_c + 1 - [c == y]) - s_y``: zero when the true class beats every other class by
    a margin of at least 1, otherwise the worst violation. As FedJAX's model tutorial writes it.

    Args:
        targets: Integer class ids, shape ``[...]``.
        scores: Unnormalized scores, shape ``[..., num_classes]``.

    Returns:
        The per-example loss, shape ``[...]``, always >= 0.
    """
    mask = jax.nn.one_hot(targets, scores.shape[-1])
    label_score = jnp.sum(scores * mask, axis=-1)
    best_score = jnp.max(scores + 1.0 - mask, axis=-1)
    return best_score - label_score


def _targets(batch: BatchExample, target_key: str) -> jax.Array:
    try:
        return batch[target_key]
    except KeyError:
        raise KeyError(
            f"the loss reads targets from batch[{target_key!r}], but the batch has only "
            f"{sorted(batch)}; pass target_key= (or loss.target_key in the config) to pick "
            "the right feature"
        ) from None


def cross_entropy_loss(batch: BatchExample, output: jax.Array, target_key: str = "y") -> jax.Array:
    """``Model.train_loss``: :func:`softmax_cross_entropy` of output vs ``batch[target_key]``."""
    return softmax_cross_entropy(_targets(batch, target_key), output)


def hinge_loss(batch: BatchExample, output: jax.Array, target_key: str = "y") -> jax.Array:
    """``Model.train_loss``: :func:`multiclass_hinge` of ``output`` vs ``batch[target_key]``."""
    return multiclass_hinge(_targets(batch, target_key), output)


# Config name -> Model.train_loss function.
LOSSES: dict[str, TrainLoss] = {
    "cross_entropy": cross_entropy_loss,
    "hinge": hinge_loss,
}


@functools.cache
def get_train_loss(name: str, target_key: str = "y") -> TrainLoss:
    """The ``Model.train_loss`` called ``name`` (see :data:`LOSSES`), reading ``target_key``.

    Cached, so equal arguments give the identical function: Models built from it compare equal
    and share compiled code.
    """
    try:
        loss = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
    if target_key == "y":
        return loss
    return functools.partial(loss, target_key=target_key)


@dataclass
class PerExampleLossMetric(metrics.Metric):
    """The mean over examples of a per-example training loss ``(batch, output) -> vector``.

    ``conf/loss/hinge.yaml`` uses it to report the hinge loss as the ``loss`` metric; any user
    loss of that signature can be evaluated the same way.
    """

    loss_fn: Callable[..., Any] = field(pytree_node=False)

    def zero(self) -> metrics.MeanStat:
        return metrics.MeanStat.new(jnp.array(0.0), jnp.array(0.0))

    def evaluate_example(self, example: Mapping[str, Any], prediction: Any) -> metrics.MeanStat:
        # The loss works on batches: evaluate a batch of one.
        batch = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], dict(example))
        loss = self.loss_fn(batch, jax.tree_util.tree_map(lambda x: x[None], prediction))[0]
        return metrics.MeanStat.new(loss, jnp.array(1.0))
