"""Metric writers: ``metrics.jsonl`` (always on; layout in :mod:`.run_files`) and W&B, and
``status.json``, how the run ended."""

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
    """Where metrics go (plain Python numbers). Beside ``write_scalars`` a writer may have
    ``write_histogram(step, name, values)``, ``write_summary(final)`` and ``close(exit_code)``
    (non-zero: the run failed); :class:`MultiWriter` skips those it lacks."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...


def _json_value(value: Any) -> Any:
    """A JSON-safe scalar: 0-d arrays as Python numbers, NaN/inf as null (strict JSON)."""
    if isinstance(value, np.generic) or (hasattr(value, "__array__") and np.ndim(value) == 0):
        value = np.asarray(value).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlWriter:
    """Appends one flushed JSON line per ``write_scalars`` to ``<dir>/metrics.jsonl``, its
    ``"time"`` from ``clock()``. A fresh run (``resume_step=None``) replaces the file; a
    resumed one drops the lines after ``resume_step``, final results and status events."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        clock: Callable[[], float],
        resume_step: int | None,
    ):
        self.path = pathlib.Path(directory) / METRICS_FILE
        self._clock = clock
        if resume_step is not None and self.path.exists():
            kept = [
                r
                for r in read_metrics(self.path)
                if r["step"] <= resume_step
                and "status" not in r
                and not any(k.startswith("final/") for k in r)
            ]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def _write(self, record: dict[str, Any]) -> None:
        record["time"] = round(self._clock(), 6)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._write({"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}})

    def write_event(self, step: int, **fields: str) -> None:
        """A non-metric line, e.g. ``status="failed", error=...``."""
        self._write({"step": int(step), **fields})

    def close(self, exit_code: int) -> None:
        self._file.close()


class WandbWriter:
    """Logs to one W&B run object (not the global ``wandb.log``: a sweep has several live)."""

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
    """The W&B run id stored in ``directory`` (a resumed run continues its W&B run), else a
    new one."""
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
    """A new W&B run in ``directory`` from ``logger.wandb`` settings; None for ``mode:
    disabled``, and None with a warning when W&B fails to start (training goes on with local
    logging). ``run_id`` None: :func:`wandb_run_id`. ``silent`` drops W&B's console output
    but an online run's URL."""
    mode = settings.get("mode", "offline")
    if mode == "disabled":
        return None
    try:
        import wandb

        run_id = run_id or wandb_run_id(directory)
        run = wandb.init(
            mode=mode,
            **{k: settings.get(k) for k in ("project", "entity", "job_type", "notes")},
            group=settings.get("group") or default_group,
            name=settings.get("name") or default_name,
            tags=list(settings.get("tags") or []),
            config=dict(config),
            dir=str(directory),
            id=run_id,
            resume="allow",
            reinit="create_new",  # Another run while others are live (wandb >= 0.19.10).
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


def _fan_out(method: str) -> Callable[..., None]:
    def call(self: MultiWriter, *args: Any) -> None:
        for w in self.writers:
            getattr(w, method, lambda *_: None)(*args)

    return call


class MultiWriter:
    """Fans every call out to the writers that have the method; ``close`` closes all and
    never raises (a close error is a warning: it must not replace the run's own error)."""

    def __init__(self, writers: Iterable[MetricWriter]):
        self.writers = list(writers)

    write_scalars = _fan_out("write_scalars")
    write_histogram = _fan_out("write_histogram")
    write_summary = _fan_out("write_summary")

    def close(self, exit_code: int) -> None:
        for w in self.writers:
            try:
                getattr(w, "close", lambda code: None)(exit_code)
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
    """Writes ``status.json`` atomically; ``final`` None leaves out its key (a sweep's own
    status), ``extra`` adds fields (``trials=[...]``)."""
    payload: dict[str, Any] = {"status": status, "step": int(step), "error": error}
    if final is not None:
        payload["final"] = {k: _json_value(v) for k, v in final.items()}
    payload.update(extra)
    atomic_write_text(pathlib.Path(directory) / STATUS_FILE, json.dumps(payload, indent=2) + "\n")
