"""The training input pipeline: step inputs grouped per dispatch and prepared ahead of time.

The loop dispatches steps in chunks (several steps per dispatch where that wins, cut so that
no logging/evaluation/checkpoint step falls inside a chunk: :func:`chunk_sizes`). Each chunk's
inputs are drawn from the data stream, stacked and handed to ``jax.device_put`` (which
returns at once and copies asynchronously) by :func:`prepared_chunks`; :class:`Prefetcher`
runs that on a background thread a few chunks ahead, so batch assembly and the host-to-device
copy overlap the running steps instead of sitting between them.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

_END = object()


def chunk_sizes(start: int, stop: int, per_dispatch: int, intervals: Iterable[int]) -> list[int]:
    """Sizes of the dispatches covering steps ``start + 1 .. stop``.

    Each is at most ``per_dispatch`` and ends at every multiple of the (positive) ``intervals``
    so the loop observes the state exactly at those steps.
    """
    if per_dispatch < 1:
        raise ValueError(
            f"trainer.steps_per_dispatch must be a positive integer, got {per_dispatch}"
        )
    every = [i for i in intervals if i and i > 0]
    sizes = []
    step = start
    while step < stop:
        end = min(stop, step + per_dispatch)
        for interval in every:
            end = min(end, (step // interval + 1) * interval)
        sizes.append(end - step)
        step = end
    return sizes


def even_steps_per_dispatch(per_dispatch: int, intervals: Iterable[int]) -> int:
    """The largest ``k <= per_dispatch`` that divides every positive interval, if it is at
    least half of ``per_dispatch``; else ``per_dispatch``.

    Why: a dispatch cut short at a logging/evaluation/checkpoint step is a program of another
    length, compiled separately (~0.3 s for the logistic model on the 2-core CPU). With K
    dividing the intervals, every dispatch has the same length and one program is compiled:
    e.g. 8 -> 5 for ``log_every=50``.
    """
    every = [i for i in intervals if i and i > 0]
    if not every:
        return per_dispatch
    common = math.gcd(*every)
    for k in range(per_dispatch, 0, -1):
        if common % k == 0:
            return k if 2 * k >= per_dispatch else per_dispatch
    return per_dispatch


def prepared_chunks(
    stream: Iterator[Any], sizes: Sequence[int], prepare: Callable[[list[Any]], Any]
) -> Iterator[Any]:
    """``prepare(next n inputs)`` for each ``n`` in ``sizes``."""
    for n in sizes:
        items = list(itertools.islice(stream, n))
        if len(items) != n:
            raise RuntimeError(f"the data stream ended early: wanted {n} inputs, got {len(items)}")
        yield prepare(items)


class Prefetcher:
    """Iterates ``source`` on a background thread, keeping up to ``depth`` items ready.

    Items come out in order; an exception raised by ``source`` is re-raised by ``next``.
    ``close()`` (also on garbage collection and as a context manager) stops the thread.
    ``depth=0`` iterates ``source`` in the caller's thread (no thread at all).
    """

    def __init__(self, source: Iterator[Any], depth: int = 2):
        if depth < 0:
            raise ValueError(f"trainer.prefetch must be a non-negative integer, got {depth}")
        self._source = source
        self._depth = depth
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
            self._thread = threading.Thread(target=self._fill, name="prefetch", daemon=True)
            self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._source:
                if not self._put((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer to re-raise.
            self._put((None, e))
            return
        self._put((_END, None))

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        if self._thread is None:
            return next(self._source)
        item, error = self._queue.get()
        if error is not None:
            raise error
        if item is _END:
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()
