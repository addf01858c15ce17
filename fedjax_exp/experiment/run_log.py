"""One-line descriptions of a run for its log (``run.log`` and the console): what is trained,
each periodic evaluation, what it reached or why it stopped."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Any

import jax

log = logging.getLogger(__name__)

# The config groups that say what is trained, in the order a run is described.
DESCRIBED_GROUPS = ("experiment", "model", "loss", "optimizer", "dataset", "algorithm")


def hydra_config() -> Any:
    """Hydra's runtime config, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def step_name(container: Mapping[str, Any]) -> str:
    """What one loop step is: ``"round"`` for a federated algorithm, else ``"step"``."""
    return "round" if "clients_per_round" in (container.get("algorithm") or {}) else "step"


def describe(container: Mapping[str, Any], start_step: int, steps_per_dispatch: int) -> str:
    """What a run is about to train: groups, seed, step (or round) range, batch size, backend."""
    trainer, algorithm = container["trainer"], container.get("algorithm") or {}
    unit = step_name(container) + "s"
    span = f"{unit} {start_step + 1}-{trainer['steps']}, "
    if unit == "rounds":
        span += (
            f"{algorithm['clients_per_round']} clients per round, "
            f"client batch {algorithm['client_batch_size']}"
        )
    else:
        span += f"batch {trainer['batch_size']}"
    choices = hc.runtime.choices if (hc := hydra_config()) is not None else {}
    chosen = " ".join(f"{g}={choices[g]}" for g in DESCRIBED_GROUPS if choices.get(g))
    return (
        f"training {chosen or 'the composed config'} seed={container['seed']}: "
        f"{span}; {jax.default_backend()} backend, {steps_per_dispatch} {unit} per dispatch"
    )


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """``key=value`` pairs of the scalar ``metrics`` (4 significant digits)."""
    return ", ".join(
        f"{k}={float(v):.4g}" for k, v in metrics.items() if isinstance(v, numbers.Real)
    )


class EvaluationLog:
    """A metric writer that logs each periodic evaluation (``eval/...``) as one line."""

    def __init__(self, label: str = ""):
        self.label = label  # E.g. a trial's name.

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        evaluated = {k[5:]: v for k, v in scalars.items() if k.startswith("eval/")}
        if evaluated:
            log.info("%seval at step %d: %s", self.label, step, format_metrics(evaluated))


def note_in_log_file(message: str) -> None:
    """Writes ``message`` to the log files only (``run.py`` prints its own console line)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
