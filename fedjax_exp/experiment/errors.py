"""Errors the experiment layer reports to the user as one line (no traceback)."""

from __future__ import annotations


class ConfigError(ValueError):
    """The composed config cannot be run; the message names the problem and the fix."""


class RunFailed(RuntimeError):
    """Training started but could not finish (e.g. a non-finite loss)."""


class RunInterrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C (SIGINT) after its last checkpoint ``checkpoint_step``
    (None: none yet). A KeyboardInterrupt: code that catches ``Exception`` lets it pass."""

    def __init__(self, message: str, checkpoint_step: int | None = None):
        super().__init__(message)
        self.checkpoint_step = checkpoint_step
