"""Timing primitives: warm-up first, repeated timed windows, median of the rates.

JAX dispatches work asynchronously: a jitted call returns before the device has finished, so
a loop of calls timed without a final ``block_until_ready`` measures dispatch, not compute.
Every timed window here ends with :func:`sync` on the last result produced in it, which
waits for everything dispatched before it (one device stream, executed in order).
"""

from __future__ import annotations

import gc
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


def sync(tree: Any) -> Any:
    """Waits until every JAX array in ``tree`` is computed (NumPy leaves pass through)."""
    import jax

    return jax.block_until_ready(tree)


@dataclass
class Rate:
    """Repeated measurements of a rate (work units per second); the median is reported."""

    samples: list[float] = field(default_factory=list)
    unit: str = "items/s"

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def spread(self) -> float:
        """(max - min) / median: a quick noise indicator for the table notes."""
        if len(self.samples) < 2 or not self.median:
            return 0.0
        return (max(self.samples) - min(self.samples)) / self.median

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "samples": list(self.samples), "unit": self.unit}


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def stream_rate(
    make_stream: Callable[[], Iterator[Any]],
    batches: int,
    repeats: int,
    warmup: int,
    fresh: bool = False,
) -> Rate:
    """Batches/s of an iterator, median over ``repeats`` windows of ``batches`` batches.

    Args:
      make_stream: returns a new iterator of batches.
      batches: batches per timed window.
      repeats: timed windows.
      warmup: batches drawn (untimed) before the first window, so generator set-up, first
        buffer fills and lazy imports are excluded from the steady-state rate.
      fresh: ``True`` for finite streams (padded passes): every window starts a new iterator
        and counts what it delivers (at most ``batches``), so the creation cost is included.
        ``False``: all windows continue one endless iterator.
    """
    _check_positive("batches", batches)
    _check_positive("repeats", repeats)
    rate = Rate(unit="batches/s")
    stream = make_stream()
    for item in itertools.islice(stream, warmup):
        sync(item)
    for _ in range(repeats):
        if fresh:
            stream = make_stream()
        gc.collect()
        count, last = 0, None
        start = time.perf_counter()
        for last in itertools.islice(stream, batches):  # noqa: B007 - synced below.
            count += 1
        sync(last)
        elapsed = time.perf_counter() - start
        if count == 0:
            raise ValueError("the stream produced no batch; is the dataset empty?")
        rate.samples.append(count / elapsed)
    return rate


def call_rate(fn: Callable[[], Any], work: float, repeats: int, warmup: int = 1) -> Rate:
    """``work`` units / wall time of ``fn()`` (synced), median over ``repeats`` calls.

    The ``warmup`` calls (compilation, caches) are not timed.
    """
    _check_positive("repeats", repeats)
    for _ in range(warmup):
        sync(fn())
    rate = Rate()
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        sync(fn())
        rate.samples.append(work / (time.perf_counter() - start))
    return rate


def window_sizes(total: int, windows: int) -> list[int]:
    """Splits ``total`` steps into ``windows`` near-equal positive parts (fewer if short)."""
    if total <= 0:
        return []
    windows = max(1, min(windows, total))
    base, extra = divmod(total, windows)
    return [base + (1 if i < extra else 0) for i in range(windows)]
