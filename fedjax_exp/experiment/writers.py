"""Metric writers: one interface, a local JSON-lines file (always on) and W&B.

The metrics file ``metrics.jsonl`` is the contract with the comparison report: one JSON object
per line with ``"step"`` (int), ``"time"`` (seconds since the run started, carried across
resumes) and flat, "/"-namespaced metric keys such as ``"train/loss"``, ``"eval/test/accuracy"``
and ``"final/test/accuracy"``. ``status.json`` says how the run ended.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import math
import os
import pathlib
import threading
import uuid
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
# The W&B run id of a job dir, so that a resumed run continues the same W&B run.
WANDB_ID_FILE = "wandb_run_id.txt"


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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``path`` via a temporary file and rename (readers never see half)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order; lines that are not JSON (a partial last
    line from a kill) are skipped. Non-finite values read back as None."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


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
            self._truncate(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # A fresh run does not inherit an old history.
        # Held open for the run (closed in close()): one flushed line per write.
        self._file = open(self.path, "a")  # noqa: SIM115

    def _truncate(self, step: int) -> None:
        # Lines after the checkpoint we resume from (and old final results) would be logged
        # again by the resumed run, and an old "failed" event no longer describes it; dropping
        # them keeps one consistent history.
        kept = [
            r
            for r in read_metrics(self.path)
            if r.get("step", 0) <= step
            and "status" not in r
            and not any(k.startswith("final/") for k in r)
        ]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: _json_value(v) for k, v in scalars.items()}}
        record["time"] = round(self._clock(), 6)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_event(self, step: int, **fields: str) -> None:
        """A non-metric line, e.g. ``status="failed", error=...`` when the run fails."""
        record = {"step": int(step), **fields, "time": round(self._clock(), 6)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        pass  # The file holds scalars; distributions are summarised as percentiles instead.

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        pass  # Final values are written as scalars (final/...) and in status.json.

    def close(self, exit_code: int) -> None:
        self._file.close()  # The status goes to status.json (write_status), not here.


class WandbWriter:
    """Logs to a W&B run (offline by default). Created through :func:`create_wandb_writer`."""

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
    (so a resumed run continues its W&B run), else a new random id (not stored here:
    :func:`create_wandb_writer` stores it once the run has started)."""
    id_file = pathlib.Path(directory) / WANDB_ID_FILE
    if id_file.exists():
        stored = id_file.read_text().strip()
        if stored:
            return stored
    return uuid.uuid4().hex[:12]


def _start_wandb_run(
    settings: Mapping[str, Any],
    *,
    directory: str | os.PathLike[str],
    config: Mapping[str, Any],
    default_name: str,
    default_group: str,
    run_id: str | None,
) -> WandbWriter | None:
    """``wandb.init`` from ``logger.wandb`` settings (None for ``mode: disabled``); stores the
    run id in ``directory``. Raises whatever W&B raises."""
    mode = settings.get("mode", "offline")
    if mode == "disabled":
        return None
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
        # In a multirun every job gets its own run even if a previous one leaked.
        reinit="finish_previous",
    )
    atomic_write_text(pathlib.Path(directory) / WANDB_ID_FILE, run_id + "\n")
    return WandbWriter(run)


def _fallback_message(error: BaseException) -> str:
    return f"W&B failed to start ({type(error).__name__}: {error}); logging locally only"


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning(message)


def create_wandb_writer(
    settings: Mapping[str, Any],
    *,
    directory: str | os.PathLike[str],
    config: Mapping[str, Any],
    default_name: str,
    default_group: str,
    run_id: str | None = None,
) -> WandbWriter | None:
    """Starts a W&B run from ``logger.wandb`` settings; None (with a warning) if it fails.

    W&B is a convenience, never a reason to lose a run: when ``wandb.init`` raises (no
    login for online mode, a broken install, ...) training continues with local logging only.
    ``run_id`` None: the id stored in ``directory`` (see :func:`wandb_run_id`), which is
    written there once the run has started.
    """
    try:
        return _start_wandb_run(
            settings,
            directory=directory,
            config=config,
            default_name=default_name,
            default_group=default_group,
            run_id=run_id,
        )
    except Exception as e:  # noqa: BLE001 - any W&B failure must fall back, not crash.
        _warn(_fallback_message(e))
        return None


def import_in_background(module: str) -> threading.Thread:
    """Imports ``module`` on a daemon thread (nothing is written), so that a later import in
    the main thread finds it loaded. Import errors are left for that later import to report."""

    def load() -> None:
        with contextlib.suppress(Exception):  # Reported by the real import later.
            importlib.import_module(module)

    thread = threading.Thread(target=load, name=f"import-{module}", daemon=True)
    thread.start()
    return thread


class BackgroundWandbWriter:
    """A W&B writer whose run starts on a background thread (``wandb.init`` takes seconds:
    importing W&B and starting its service), overlapping compilation and training.

    Calls made before the run is up are buffered and replayed to it in order. When W&B fails
    to start, the buffer is dropped and a warning (raised in the caller's thread, at the next
    call or at ``close``) says that only local logging is left. ``close`` waits for the start
    and then finishes the run with the exit code.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        *,
        directory: str | os.PathLike[str],
        config: Mapping[str, Any],
        default_name: str,
        default_group: str,
    ):
        self._lock = threading.Lock()
        self._pending: list[tuple[str, tuple[Any, ...]]] = []
        self._writer: WandbWriter | None = None
        self._ready = False
        self._failure: str | None = None
        kwargs = dict(
            directory=directory,
            config=dict(config),
            default_name=default_name,
            default_group=default_group,
            run_id=None,
        )
        self._thread = threading.Thread(
            target=self._start, args=(dict(settings), kwargs), name="wandb-init", daemon=True
        )
        self._thread.start()

    def _start(self, settings: dict[str, Any], kwargs: dict[str, Any]) -> None:
        writer, failure = None, None
        try:
            writer = _start_wandb_run(settings, **kwargs)
        except Exception as e:  # noqa: BLE001 - any W&B failure must fall back, not crash.
            failure = _fallback_message(e)
        replay_error = None
        with self._lock:
            # Calls that arrive meanwhile wait on the lock, so the order is kept.
            if writer is not None:
                try:
                    for method, args in self._pending:
                        getattr(writer, method)(*args)
                except Exception as e:  # noqa: BLE001 - keep the run; W&B is best effort.
                    replay_error = e
            self._pending = []
            self._writer, self._failure, self._ready = writer, failure, True
        if replay_error is not None:
            log.warning(
                "W&B dropped buffered metrics (%s: %s)", type(replay_error).__name__, replay_error
            )

    @property
    def started(self) -> bool:
        """Whether the start finished (successfully or not)."""
        return self._ready

    def _report_failure(self) -> None:
        if self._failure is not None:
            message, self._failure = self._failure, None
            _warn(message)

    def _call(self, method: str, *args: Any) -> None:
        with self._lock:
            if not self._ready:
                self._pending.append((method, args))
                return
        self._report_failure()
        if self._writer is not None:
            getattr(self._writer, method)(*args)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._call("write_scalars", step, dict(scalars))

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        self._call("write_histogram", step, name, list(values))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self._call("write_summary", dict(summary))

    def close(self, exit_code: int) -> None:
        self._thread.join()
        self._report_failure()
        if self._writer is not None:
            self._writer.close(exit_code)


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
