"""Hydra callbacks that check the run before Hydra writes anything (no JAX import: they run
in a multirun's parent process, before launchers fork)."""

from __future__ import annotations

import sys
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedjax_exp.experiment.validation import check_writable_dir


class OutputDirCheck(Callback):
    """Exits with one error line when the run (or sweep) output dir cannot be written."""

    def _check(self, path: str, override: str) -> None:
        problem = check_writable_dir(path)
        if problem is not None:
            print(
                f"error: cannot write the output dir {path!r} ({problem}); "
                f"choose a writable one with {override}=DIR",
                file=sys.stderr,
            )
            # SystemExit passes through Hydra's callback wrapper, which swallows Exceptions.
            raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.sweep.dir), "hydra.sweep.dir")
