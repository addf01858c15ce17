"""The Hydra/W&B-aware experiment layer: config -> objects, the training loop, evaluation,
writers and checkpoints. ``run(cfg)`` is the entry point used by ``run.py``.

Importing this package does not import JAX (see ``fedjax_exp/__init__.py``): ``run`` is loaded
on first use.
"""

from __future__ import annotations

from typing import Any

from fedjax_exp.experiment import config_schema  # noqa: F401 - registers the config schemas.
from fedjax_exp.experiment.errors import ConfigError, RunFailed

__all__ = ["ConfigError", "RunFailed", "run"]


def run(cfg: Any, output_dir: Any = None) -> float:
    """Runs one experiment; see :func:`fedjax_exp.experiment.runner.run`."""
    from fedjax_exp.experiment.runner import run as _run

    return _run(cfg, output_dir)
