"""Errors the experiment layer reports to the user as one line (no traceback)."""

from __future__ import annotations


class ConfigError(ValueError):
    """The composed config cannot be run; the message names the problem and the fix."""


class RunFailed(RuntimeError):
    """Training started but could not finish (e.g. a non-finite loss)."""


class RunInterrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C (SIGINT); the message says where and what is kept.

    A KeyboardInterrupt, so that code catching ``Exception`` (Hydra's job runner) lets it pass."""
