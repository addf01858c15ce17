"""One-line descriptions of a run for its log (``run.log`` in the run dir, and the console).

A run's log says what was trained, where and how fast at the start, and what it reached at
the end; the numbers themselves live in ``metrics.jsonl`` and W&B.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

# The config groups that say what is trained, in the order a run is described.
DESCRIBED_GROUPS = ("experiment", "model", "loss", "optimizer", "dataset", "algorithm")


def config_choices() -> str:
    """The chosen options of the groups that say what is trained, e.g. ``model=logistic
    loss=cross_entropy optimizer=adam`` (empty outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = HydraConfig.get().runtime.choices
    except (ImportError, ValueError):
        return ""
    return " ".join(f"{group}={choices[group]}" for group in DESCRIBED_GROUPS if choices.get(group))


def describe(container: Mapping[str, Any], start_step: int, steps_per_dispatch: int) -> str:
    """What a run is about to train: groups, seed, step range, batch size, backend."""
    trainer = container["trainer"]
    return (
        f"training {config_choices() or 'the composed config'} seed={container['seed']}: "
        f"steps {start_step + 1}-{trainer['steps']}, batch {trainer['batch_size']}; "
        f"{jax.default_backend()} backend, {steps_per_dispatch} steps per dispatch"
    )


def count_parameters(params: Any) -> int:
    """Number of scalars in the ``params`` pytree."""
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(params))


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``key=value`` pairs of the scalar ``metrics`` (4 significant digits)."""
    return ", ".join(
        f"{k}={float(v):.4g}" for k, v in metrics.items() if isinstance(v, numbers.Real)
    )
