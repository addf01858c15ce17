"""Evaluation metrics made from training losses, so any loss can be reported as ``loss``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.core.dataclasses import dataclass, field
from fedjax_exp.core.metrics import MeanStat


@dataclass
class PerExampleLossMetric:
    """The mean over examples of a per-example training loss ``(batch, output) -> vector``.

    ``conf/loss/hinge.yaml`` uses it to report the hinge loss as the ``loss`` metric; any user
    loss of that signature can be evaluated the same way.
    """

    loss_fn: Callable[..., Any] = field(pytree_node=False)

    def zero(self) -> MeanStat:
        return MeanStat.new(jnp.array(0.0), jnp.array(0.0))

    def evaluate_example(self, example: Mapping[str, Any], prediction: Any) -> MeanStat:
        # The loss works on batches: evaluate a batch of one.
        batch = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], dict(example))
        loss = self.loss_fn(batch, jax.tree_util.tree_map(lambda x: x[None], prediction))[0]
        return MeanStat.new(loss, jnp.array(1.0))
