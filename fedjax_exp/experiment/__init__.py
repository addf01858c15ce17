"""The Hydra/W&B-aware experiment layer; ``run(cfg)`` (used by ``run.py``) is imported on
first use, so that importing this package does not import JAX."""

from __future__ import annotations

from typing import Any

from fedjax_exp.experiment import config_schema  # noqa: F401 - registers the config schemas.
from fedjax_exp.experiment.errors import ConfigError, RunFailed

__all__ = ["ConfigError", "RunFailed", "run"]


def run(cfg: Any, output_dir: Any = None) -> float:
    """Runs one experiment; see :func:`fedjax_exp.experiment.runner.run`."""
    from fedjax_exp.experiment.runner import run as _run

    return _run(cfg, output_dir)
