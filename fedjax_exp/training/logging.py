"""Metric logging for federated experiments (``fedjax.training.Logger``) without TensorFlow.

FedJAX writes TensorFlow summaries, one event directory per writer. Here every record is one
line of JSON appended to ``<root_dir>/metrics.jsonl``::

    {"writer": "test_eval", "metric": "accuracy", "round": 10, "value": 0.8125}

Scalars are written as numbers and arrays as nested lists (FedJAX wrote those as histograms).
The file is plain text that any tool can read; :func:`read_metrics` reads it back.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np

__all__ = ["METRICS_FILE_NAME", "Logger", "read_metrics"]

METRICS_FILE_NAME = "metrics.jsonl"

_log = logging.getLogger(__name__)


def _json_value(value: Any) -> Any:
    """A JSON-ready number or nested list for ``value``; ValueError when there is none."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"not a numeric value: {value!r}")
    # NaN and infinity are not strict JSON; Python's json writes (and reads) them as NaN and
    # Infinity, which most readers accept, and a diverged loss must still be recorded.
    return array.item() if array.ndim == 0 else array.tolist()


class Logger:
    """Records metrics by writer name and round (``fedjax.training.Logger``).

    Every call logs the metric at INFO level (Python's ``logging``). With a ``root_dir`` it
    is also appended to ``<root_dir>/metrics.jsonl``, one JSON object a line, flushed at once,
    so a killed run loses no record it already made. A resumed run appends to the same file:
    rounds replayed after the last checkpoint appear twice, and :func:`read_metrics` keeps
    the latest record of each (writer, metric, round).

    Args:
        root_dir: directory for ``metrics.jsonl`` (created if missing); None logs to the
            Python logger only.
    """

    def __init__(self, root_dir: str | os.PathLike[str] | None = None):
        self._root_dir = None if root_dir is None else os.fspath(root_dir)
        self._path = None
        if self._root_dir is not None:
            os.makedirs(self._root_dir or ".", exist_ok=True)
            self._path = os.path.join(self._root_dir, METRICS_FILE_NAME)

    @property
    def path(self) -> str | None:
        """The JSON-lines file records go to, or None without a ``root_dir``."""
        return self._path

    def log(self, writer_name: str, metric_name: str, metric_value: Any, round_num: int) -> None:
        """Records ``metric_value`` as ``metric_name`` of writer ``writer_name`` at a round.

        A value that is not numeric (a string, None, an object) is logged at INFO level
        only, not written: FedJAX also skipped values its summaries could not hold.
        """
        _log.info("round %d %s: %s = %s", round_num, writer_name, metric_name, metric_value)
        if self._path is None:
            return
        try:
            value = _json_value(metric_value)
        except (ValueError, TypeError) as exc:
            _log.info("Not writing %s/%s to %s: %s", writer_name, metric_name, self._path, exc)
            return
        record = {
            "writer": writer_name,
            "metric": metric_name,
            "round": int(round_num),
            "value": value,
        }
        # Opened per record: a handful of records a round, and nothing stays open to leak.
        with open(self._path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(root_dir: str | os.PathLike[str]) -> dict[tuple[str, str], dict[int, Any]]:
    """Reads a :class:`Logger`'s records back: ``{(writer, metric): {round: value}}``.

    Where a round was recorded more than once (a resumed run replays the rounds after its
    last checkpoint), the latest record wins. A missing file reads as no records; a torn last
    line (the process killed mid-write) is ignored, any other bad line is an error.
    """
    path = os.path.join(os.fspath(root_dir), METRICS_FILE_NAME)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out: dict[tuple[str, str], dict[int, Any]] = {}
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last and not line.endswith("}"):
                break  # Torn final line of a killed writer.
            raise ValueError(f"{path!r} line {i + 1} is not a JSON record: {exc}") from exc
        out.setdefault((record["writer"], record["metric"]), {})[record["round"]] = record["value"]
    return out
