"""The console of a training run: log lines and warnings printed above its progress bar, losses
that stay readable when they explode, and one warning when the loss grows far above its start."""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

# A logged mean training loss above this many times the loss of the first step gets one warning.
LOSS_GROWTH_WARNING = 10.0


def format_loss(value: float) -> str:
    """4 decimals, as a loss usually reads; scientific notation (3.2e+12) when that is wider."""
    return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.3g}"


def loss_growth_warning(start: tuple[int, float], step: int, loss: float) -> str | None:
    """The warning when the logged mean ``loss`` at ``step`` exceeds
    :data:`LOSS_GROWTH_WARNING` times the loss of the run's first step (``start``: its step
    and loss) though it is still finite (the run has not diverged yet), else None."""
    if not (math.isfinite(loss) and start[1] > 0 and loss > LOSS_GROWTH_WARNING * start[1]):
        return None
    ratio = loss / start[1]
    times = f"{ratio:,.0f}" if ratio < 1e6 else f"{ratio:.1e}"
    return (
        f"loss {format_loss(loss)} at step {step} is {times}x its value at step {start[0]} "
        f"({format_loss(start[1])}; warned once, above {LOSS_GROWTH_WARNING:g}x): the "
        "learning rate may be too high (optimizer.learning_rate)"
    )


def console_handlers() -> list[logging.Handler]:
    """The root logger's console handlers (plain stream handlers, not log files)."""
    return [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]


class _Prefixed(logging.Formatter):
    """Starts each message with ``prefix``."""

    def __init__(self, inner: logging.Formatter | None, prefix: str):
        super().__init__()
        self.inner, self.prefix = inner or logging.Formatter(), prefix

    def format(self, record: logging.LogRecord) -> str:
        prefixed = logging.makeLogRecord(record.__dict__)
        prefixed.msg, prefixed.args = f"{self.prefix}: {record.getMessage()}", None
        return self.inner.format(prefixed)


def prefix_console_lines(prefix: str | None) -> None:
    """Starts every console log line's message with ``prefix`` (None: no change). Once: a
    handler already prefixed keeps its prefix; a new logging set-up starts afresh."""
    for handler in console_handlers() if prefix else []:
        if not isinstance(handler.formatter, _Prefixed):
            handler.setFormatter(_Prefixed(handler.formatter, prefix))


class _AboveTheBar(logging.Handler):
    """A console handler's lines printed above the progress bar: the bar is cleared before
    the line and redrawn after it (flushed in between, as stdout to a pipe is buffered)."""

    def __init__(self, console: logging.Handler, bar: Any):
        super().__init__(console.level)
        self.console, self.bar = console, bar

    def emit(self, record: logging.LogRecord) -> None:
        self.bar.clear()
        self.console.handle(record)
        self.console.flush()
        self.bar.refresh()


@contextlib.contextmanager
def logs_above(bar: Any) -> Iterator[None]:
    """While ``bar`` shows, console log lines and Python warnings (e.g. JAX's) never glue onto
    it: the bar is cleared before each and redrawn after (see :class:`_AboveTheBar`)."""
    root, saved, show = logging.getLogger(), logging.getLogger().handlers, warnings.showwarning

    def show_above(*args: Any, **kwargs: Any) -> None:
        bar.clear()
        show(*args, **kwargs)
        bar.refresh()

    if not bar.disable:
        consoles = console_handlers()
        root.handlers = [_AboveTheBar(h, bar) if h in consoles else h for h in saved]
        warnings.showwarning = show_above
    try:
        yield
    finally:
        root.handlers, warnings.showwarning = saved, show
