"""Metric writers: one interface, a local JSON-lines file (always on) and W&B.

``metrics.jsonl`` (layout in :mod:`~fedjax_exp.experiment.run_files`) holds one JSON object a
line: ``"step"``, ``"time"`` (seconds since the run started, carried across resumes) and flat
"/"-namespaced metrics such as ``"train/loss"`` and ``"final/test/accuracy"``; non-finite
values are written as null so that every line is strict JSON. ``status.json`` says how the
run ended.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from fedjax_exp.core.atomic_file import atomic_write_text
from fedjax_exp.experiment.run_files import METRICS_FILE, STATUS_FILE, WANDB_ID_FILE
from fedjax_exp.experiment.run_files import read_metrics as read_metrics  # re-exported

log = logging.getLogger(__name__)


class MetricWriter(Protocol):
    """Where metrics go. Values are plain Python numbers (host-side already)."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Records ``scalars`` at ``step``."""

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        """Records a distribution (e.g. per-client accuracy) at ``step``."""

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Records end-of-run values (final metrics)."""

    def close(self, exit_code: int) -> None:
        """Flushes and releases resources; ``exit_code != 0`` marks a failed run."""


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: NumPy/JAX 0-d arrays become Python numbers, and NaN/inf become
    null so every line stays strict JSON (``json.dumps`` would write the non-standard NaN)."""
    if isinstance(value, np.generic) or (hasattr(value, "__array__") and np.ndim(value) == 0):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends one JSON line per ``write_scalars`` call to ``<dir>/metrics.jsonl``.

    Each line is flushed at once so a killed run keeps everything logged before the kill.
    ``clock()`` gives the ``"time"`` of each line. With ``resume_step=None`` (a fresh run) an
    existing file is replaced; otherwise its lines after ``resume_step`` (which the resumed
    run logs again), its final results and its status events are dropped.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        clock: Callable[[], float],
        resume_step: int | None,
    ):
        self.path = pathlib.Path(directory) / METRICS_FILE
        self._clock = clock
        if resume_step is not None and self.path.exists():
            # Lines after the checkpoint would be logged again by the resumed run, and an old
            # "failed" event no longer describes it: keep one consistent history.
            kept = [
                r
                for r in read_metrics(self.path)
                if r["step"] <= resume_step
                and "status" not in r
                and not any(k.startswith("final/") for k in r)
            ]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)  # A fresh run does not inherit an old history.
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _write(self, record: dict[str, Any]) -> None:
        record["time"] = round(self._clock(), 6)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._write({"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}})

    def write_event(self, step: int, **fields: str) -> None:
        """A non-metric line, e.g. ``status="failed", error=...`` when the run fails."""
        self._write({"step": int(step), **fields})

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        pass  # The file holds scalars; distributions are summarised as percentiles instead.

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        pass  # Final values are written as scalars (final/...) and in status.json.

    def close(self, exit_code: int) -> None:
        self._file.close()  # The status goes to status.json (write_status), not here.


class WandbWriter:
    """Logs to one W&B run object (never the global ``wandb.log``, so that several runs can
    be live in one process). Created through :func:`create_wandb_writer`."""

    def __init__(self, run: Any):
        self.run = run

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.run.log({k: _json_value(v) for k, v in scalars.items()}, step=int(step))

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        import wandb

        self.run.log({name: wandb.Histogram(np.asarray(values))}, step=int(step))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        for key, value in summary.items():
            self.run.summary[key] = _json_value(value)

    def close(self, exit_code: int) -> None:
        self.run.finish(exit_code=exit_code)


def wandb_run_id(directory: str | os.PathLike[str]) -> str:
    """The W&B run id of the job in ``directory``: the one stored there by an earlier start
    (so a resumed run continues its W&B run), else a new random id (stored by
    :func:`create_wandb_writer` once the run has started)."""
    id_file = pathlib.Path(directory) / WANDB_ID_FILE
    stored = id_file.read_text().strip() if id_file.exists() else ""
    return stored or uuid.uuid4().hex[:12]


def create_wandb_writer(
    settings: Mapping[str, Any],
    *,
    directory: str | os.PathLike[str],
    config: Mapping[str, Any],
    default_name: str,
    default_group: str,
    run_id: str | None = None,
) -> WandbWriter | None:
    """Starts a W&B run from ``logger.wandb`` settings; None for ``mode: disabled``, and None
    with a warning when W&B fails to start.

    W&B is a convenience, never a reason to lose a run: when ``wandb.init`` raises (no login
    for online mode, a broken install, ...) training continues with local logging
    only. Each call starts a new, independent run (``reinit="create_new"``). ``run_id`` None:
    the id stored in ``directory`` (see :func:`wandb_run_id`), written there once the run has
    started; runs log to ``directory``. ``silent`` (default true) drops W&B's banner and run
    summary (about 20 console lines a run); an online run then logs its URL in one line.
    """
    mode = settings.get("mode", "offline")
    if mode == "disabled":
        return None
    try:
        import wandb

        run_id = run_id or wandb_run_id(directory)
        run = wandb.init(
            mode=mode,
            project=settings.get("project"),
            entity=settings.get("entity"),
            group=settings.get("group") or default_group,
            job_type=settings.get("job_type"),
            name=settings.get("name") or default_name,
            tags=list(settings.get("tags") or []),
            notes=settings.get("notes"),
            config=dict(config),
            dir=str(directory),
            id=run_id,
            resume="allow",
            # A new run even while others are live: a vectorized sweep logs one per trial
            # (wandb >= 0.19.10, pyproject.toml's lower bound).
            reinit="create_new",
            settings=wandb.Settings(silent=bool(settings.get("silent", True))),
        )
    except Exception as e:  # noqa: BLE001 - any W&B failure must fall back, not crash.
        _warn(f"W&B failed to start ({type(e).__name__}: {e}); logging locally only")
        return None
    atomic_write_text(pathlib.Path(directory) / WANDB_ID_FILE, run_id + "\n")
    if mode == "online" and settings.get("silent", True) and getattr(run, "url", None):
        log.info("W&B run: %s", run.url)
    return WandbWriter(run)


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)


class MultiWriter:
    """Fans every call out to several writers; ``close`` closes all of them and never raises
    (a writer that fails to close, e.g. W&B, is reported as a warning: by then the run's
    outcome is decided, and a close error must not replace the run's own error)."""

    def __init__(self, writers: Iterable[MetricWriter]):
        self.writers = list(writers)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        for w in self.writers:
            w.write_histogram(step, name, values)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        for w in self.writers:
            w.write_summary(summary)

    def close(self, exit_code: int) -> None:
        for w in self.writers:
            try:
                w.close(exit_code)
            except Exception as e:  # noqa: BLE001 - keep closing the others.
                _warn(f"closing the {type(w).__name__} failed ({type(e).__name__}: {e})")


def write_status(
    directory: str | os.PathLike[str],
    *,
    status: str,
    step: int,
    error: str | None,
    final: Mapping[str, float] | None = None,
    **extra: Any,
) -> None:
    """Writes ``status.json`` atomically: how the run ended and its final metrics.

    ``final`` None leaves out the ``"final"`` key (e.g. a vectorized sweep's own status, whose
    trials have their own); ``extra`` adds JSON-serialisable fields (e.g. ``trials=[...]``).
    """
    payload: dict[str, Any] = {"status": status, "step": int(step), "error": error}
    if final is not None:
        payload["final"] = {k: _json_value(v) for k, v in final.items()}
    payload.update(extra)
    atomic_write_text(pathlib.Path(directory) / STATUS_FILE, json.dumps(payload, indent=2) + "\n")
