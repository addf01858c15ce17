"""``fedjax-compare``: a report of finished runs side by side (tables and plots), offline.

A *run* is a directory holding a ``metrics.jsonl`` (layout: :mod:`.run_files`). Given run or
sweep directories, :func:`find_runs` loads every run below them and :func:`write_report` writes

* a table with one row per run, labelled by the command-line overrides that differ across the
  runs, with the last value of each selected metric (and its best where that differs), the
  config values that differ and are not in the label, failed runs marked;
* a grouped table (mean ± std over the runs of each group) when ``group_by`` names config keys
  or config-group choices (``optimizer``), and by itself when runs differ only by their seeds;
* one metric-vs-step plot per logged metric (one line per run, or a mean ± std band per group),

as ``report.md`` (PNGs in ``plots/``) and/or a self-contained ``report.html``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fnmatch
import html
import io
import json
import math
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import yaml

from fedjax_exp.experiment import run_record
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_files import (
    HYDRA_DIR,
    METRICS_FILE,
    RUN_LOG_FILE,
    STATUS_FILE,
    TRIALS_DIR,
    WANDB_DIR,
    MetricsFileError,
    read_metrics,
)
from fedjax_exp.experiment.run_record import flatten

FINAL_PREFIX = "final/"
RESERVED_KEYS = frozenset({"step", "time", "status", "error"})  # bookkeeping, not metrics
# Metrics whose name contains one of these are better when smaller; all others when larger.
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "regret")
FORMATS = ("md", "html")
SEED_KEY = "seed"
LEGEND_MAX = 40  # More lines than this get no legend (grouping is the readable view).


class CompareError(ValueError):
    """A problem with the runs to compare, with a message that says what to do about it."""


@dataclasses.dataclass
class Run:
    """What the report needs from one run directory.

    ``name`` is the path relative to the directory the user gave; ``label`` (set by
    :func:`find_runs`) the overrides that tell the run apart from the others. ``history`` maps
    metric -> {step: value} (a step logged twice, by a resumed run, keeps the last value;
    NaN for a non-finite value); ``choices`` the Hydra config-group choices (``optimizer:
    adam``); ``status`` is ``completed``, ``failed`` or ``incomplete`` (no status file).
    """

    path: pathlib.Path
    name: str
    status: str
    error: str | None
    config: dict[str, Any]
    overrides: list[str]
    choices: dict[str, str]
    history: dict[str, dict[int, float]]
    final: dict[str, float]
    last_step: int | None
    wandb_runs: list[pathlib.Path]
    label: str = ""

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """The (steps, values) of ``metric``, sorted by step; empty when never logged."""
        points = sorted(self.history.get(metric, {}).items())
        return [s for s, _ in points], [v for _, v in points]

    def value(self, key: str) -> Any:
        """A config value (dotted key) or a config-group choice; None when neither exists."""
        if key in self.config:
            return self.config[key]
        return self.choices.get(key)


# ---------------------------------------------------------------------------------------------
# Reading runs


def _number(value: Any) -> float | None:
    """A metric value as a float: null (how the writers store NaN and inf) is NaN; text,
    booleans and histograms are not metrics (None)."""
    if value is None:
        return math.nan
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def read_history(path: str | os.PathLike[str]) -> dict[str, dict[int, float]]:
    """A metrics file as metric -> {step: value} (see :class:`Run`)."""
    try:
        records = read_metrics(path)
    except (OSError, UnicodeDecodeError, MetricsFileError) as e:
        raise CompareError(str(e)) from e
    history: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            number = _number(value)
            if key not in RESERVED_KEYS and number is not None:
                history.setdefault(key, {})[record["step"]] = number
    return history


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"cannot read {path}: {e}") from e


def read_status(job_dir: pathlib.Path) -> tuple[str, str | None, dict[str, float]]:
    """``status.json`` as (status, error, final metrics under ``final/`` keys)."""
    path = job_dir / STATUS_FILE
    if not path.is_file():
        return "incomplete", None, {}
    status = _read_json(path)
    if not isinstance(status, dict):
        raise CompareError(f"{path}: expected a JSON object, got {type(status).__name__}")
    final = {}
    for key, value in (status.get("final") or {}).items():
        if (number := _number(value)) is not None:
            final[key if key.startswith(FINAL_PREFIX) else FINAL_PREFIX + key] = number
    return str(status.get("status", "incomplete")), status.get("error"), final


def _load_yaml(path: pathlib.Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError) as e:
        raise CompareError(f"cannot read {path}: {e}") from e


def read_config(job_dir: pathlib.Path) -> tuple[dict[str, Any], list[str]]:
    """The run's config (flattened) and command-line overrides: from the runner's record
    (``run_config.json``) where there is one (Hydra rewrites ``.hydra/`` on every invocation,
    also one the runner then rejects), else from ``.hydra/`` with interpolations resolved where
    possible."""
    try:
        record = run_record.read(job_dir)
    except ConfigError as e:
        raise CompareError(str(e)) from e
    if record is not None:
        return flatten(record["config"]), [str(o) for o in record.get("overrides") or []]
    config: dict[str, Any] = {}
    config_path = job_dir / HYDRA_DIR / "config.yaml"
    if config_path.is_file():
        from omegaconf import OmegaConf  # imported here: keeps `--help` fast

        try:
            cfg = OmegaConf.load(config_path)
        except Exception as e:  # yaml and omegaconf raise many types
            raise CompareError(f"cannot read {config_path}: {e}") from e
        for key, value in flatten(OmegaConf.to_container(cfg, resolve=False)).items():
            if isinstance(value, str) and "${" in value:
                # ${hydra:...} resolves only inside a Hydra app: shown as written.
                with contextlib.suppress(Exception):
                    value = OmegaConf.select(cfg, key)
            config[key] = value
    overrides = _load_yaml(job_dir / HYDRA_DIR / "overrides.yaml") or []
    return config, [str(o) for o in overrides]


def _choices(
    job_dir: pathlib.Path, config: dict[str, Any], overrides: Sequence[str]
) -> dict[str, str]:
    """Config-group choices: Hydra's record of them, then overrides of keys that are not
    config values (``optimizer=sgd``, not ``seed=1``)."""
    hydra = _load_yaml(job_dir / HYDRA_DIR / "hydra.yaml") or {}
    recorded = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    choices = {str(k): str(v) for k, v in recorded.items() if not str(k).startswith("hydra/")}
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if value and "." not in key and key not in config:
            choices.setdefault(key, value)
    return choices


def load_run(job_dir: str | os.PathLike[str], name: str | None = None) -> Run:
    """Loads one run directory (which must hold a ``metrics.jsonl``)."""
    job_dir = pathlib.Path(job_dir)
    if not (job_dir / METRICS_FILE).is_file():
        raise CompareError(f"{job_dir} is not a run directory: it has no {METRICS_FILE}")
    history = read_history(job_dir / METRICS_FILE)
    status, error, final = read_status(job_dir)
    for key, points in history.items():  # final/ lines count too (e.g. without a status file)
        if key.startswith(FINAL_PREFIX) and key not in final:
            final[key] = points[max(points)]
    config, overrides = read_config(job_dir)
    steps = [s for points in history.values() for s in points]
    return Run(
        path=job_dir,
        name=name if name is not None else job_dir.name,
        status=status,
        error=error,
        config=config,
        overrides=overrides,
        choices=_choices(job_dir, config, overrides),
        history={k: v for k, v in history.items() if not k.startswith(FINAL_PREFIX)},
        final=final,
        last_step=max(steps) if steps else None,
        wandb_runs=sorted((job_dir / WANDB_DIR).glob("offline-run-*")),
    )


def _natural_key(text: str) -> list[Any]:
    # Sweep jobs are numbered 0..N; sort 2 before 10.
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", text)]


def _job_dirs(root: pathlib.Path, marker: str) -> list[tuple[str, pathlib.Path]]:
    """(label, dir) of the dirs at or below ``root`` that hold ``marker``, in natural order."""
    dirs = {p.parents[len(pathlib.Path(marker).parts) - 1] for p in root.rglob(marker)}
    labelled = []
    for job_dir in dirs:
        rel = job_dir.relative_to(root).as_posix()
        labelled.append((root.name if rel == "." else f"{root.name}/{rel}", job_dir))
    return sorted(labelled, key=lambda item: _natural_key(item[1].as_posix()))


def label_runs(runs: Sequence[Run]) -> None:
    """Sets each run's ``label``: its overrides that not every run shares (e.g. ``seed=1``),
    falling back to its path where that leaves runs without a label or with the same one."""
    common = set.intersection(*(set(run.overrides) for run in runs)) if runs else set()
    for run in runs:
        own = [o for o in run.overrides if o not in common and not o.startswith("hydra.")]
        run.label = " ".join(own)
    labels = [run.label for run in runs]
    for run in runs:
        if not run.label or labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.name})" if run.label else run.name


def find_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """Finds, loads and labels every run (dir with a metrics.jsonl) at or below ``paths``."""
    if not paths:
        raise CompareError("no directories given; pass one or more run or sweep directories")
    runs: list[Run] = []
    seen: set[pathlib.Path] = set()
    for given in paths:
        root = pathlib.Path(given)
        if not root.exists():
            raise CompareError(f"{root} does not exist; pass a run or sweep output directory")
        if root.is_file():
            raise CompareError(f"{root} is a file; pass the directory that holds {METRICS_FILE}")
        for label, job_dir in _job_dirs(root, METRICS_FILE):
            if job_dir.resolve() not in seen:
                seen.add(job_dir.resolve())
                runs.append(load_run(job_dir, name=label))
    if not runs:
        raise CompareError(
            f"no runs found under {', '.join(str(p) for p in paths)}: no {METRICS_FILE} below "
            "it; pass a job directory (outputs/<date>/<time>) or a sweep directory "
            "(multirun/<date>/<time>)"
        )
    label_runs(runs)
    return runs


@dataclasses.dataclass(frozen=True)
class NotStarted:
    """A Hydra job dir without metrics: its config was rejected, or it is still starting."""

    name: str
    path: pathlib.Path
    error: str | None  # The last error its run.log records, if any.


def find_not_started(paths: Sequence[str | os.PathLike[str]]) -> list[NotStarted]:
    """Hydra job dirs (with ``.hydra/``) at or below ``paths`` that hold no metrics.jsonl."""
    found = []
    for given in paths:
        root = pathlib.Path(given)
        for label, job_dir in _job_dirs(root, f"{HYDRA_DIR}/config.yaml") if root.is_dir() else []:
            if not (job_dir / METRICS_FILE).exists() and not (job_dir / TRIALS_DIR).is_dir():
                found.append(NotStarted(label, job_dir, _last_logged_error(job_dir)))
    return found


def _last_logged_error(job_dir: pathlib.Path) -> str | None:
    try:
        text = (job_dir / RUN_LOG_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    errors = [line.split("[ERROR] - ", 1)[1] for line in text.splitlines() if "[ERROR] - " in line]
    return errors[-1] if errors else None


# ---------------------------------------------------------------------------------------------
# Summarizing


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` are better (losses and errors)."""
    leaf = metric.rsplit("/", 1)[-1].lower()
    return any(word in leaf for word in _LOWER_IS_BETTER)


def best_value(values: Iterable[float], metric: str) -> float | None:
    """The best finite value (max, or min for losses); None when there is none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return min(finite) if lower_is_better(metric) else max(finite)


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (a missing key counts as differing)."""
    keys = sorted({k for run in runs for k in run.config})
    return [
        k for k in keys if len({_canonical(run.config.get(k, "<missing>")) for run in runs}) > 1
    ]


def select_metrics(runs: Sequence[Run], patterns: Sequence[str] | None) -> list[str]:
    """Metric names matching any glob in ``patterns`` (default: final, eval and train/loss)."""
    names = sorted({k for run in runs for k in [*run.history, *run.final]})
    if not patterns:
        return [n for n in names if n.startswith((FINAL_PREFIX, "eval/")) or n == "train/loss"]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise CompareError(
            f"--metrics {' '.join(patterns)} matches none of the logged metrics: "
            + ", ".join(names)
        )
    return chosen


def summary_frame(runs: Sequence[Run], metrics: Sequence[str]) -> Any:
    """A DataFrame, one row per run: each metric's last (or final) value, and a ``(best)``
    column for a logged metric only where some run's best differs from its last value. NaN:
    not logged, or not finite."""
    import pandas as pd

    columns: dict[str, list[float]] = {}
    for metric in metrics:
        if metric.startswith(FINAL_PREFIX):
            columns[metric] = [run.final.get(metric, math.nan) for run in runs]
            continue
        series = [run.series(metric)[1] for run in runs]
        last = [values[-1] if values else math.nan for values in series]
        best = [best_value(values, metric) for values in series]
        best = [math.nan if b is None else b for b in best]
        columns[metric] = last
        if any(b != v and not math.isnan(b) for b, v in zip(best, last, strict=True)):
            columns[f"{metric} (best)"] = best
    return pd.DataFrame(columns, index=[run.label for run in runs], dtype=float)


def _sort_key(value: Any) -> tuple[int, Any]:
    # Numbers first and by value (learning rates 1e-4 < 1e-3 < 0.01), then text naturally.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, _natural_key(str(value)))


def grouping_keys(runs: Sequence[Run], group_by: Sequence[str]) -> list[str]:
    """The keys to group by: ``group_by`` (validated), else the differing config keys other
    than the seed when runs differ by their seeds and some of them only by it; else none."""
    if group_by:
        unknown = [k for k in group_by if all(run.value(k) is None for run in runs)]
        if unknown:
            hint = ", ".join(differing_keys(runs)) or "none"
            raise CompareError(
                f"--group-by {', '.join(unknown)} is neither a config key nor a config group "
                f"of any run; keys that differ across these runs: {hint}"
            )
        return list(group_by)
    differing = differing_keys(runs)
    if SEED_KEY not in differing:
        return []
    others = [k for k in differing if k != SEED_KEY]
    values = [tuple(_canonical(run.value(k)) for k in others) for run in runs]
    return others if len(set(values)) < len(values) else []


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> dict[tuple[str, ...], list[Run]]:
    """Runs grouped by their values of ``keys``, groups in numeric/natural order of the values."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    order: dict[tuple[str, ...], Any] = {}
    for run in runs:
        raw = [run.value(k) for k in keys]
        value = tuple(_format(v) for v in raw)
        groups.setdefault(value, []).append(run)
        order.setdefault(value, [_sort_key(v) for v in raw])
    return {value: groups[value] for value in sorted(groups, key=order.__getitem__)}


# ---------------------------------------------------------------------------------------------
# Tables (pandas DataFrames of strings, rendered to Markdown or HTML)


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)


def runs_table(runs: Sequence[Run], metrics: Sequence[str]) -> Any:
    """One row per run (sorted by the differing config values): label, dir, status, step,
    differing config values not already in the label, and metrics (``—``: never logged)."""
    config_keys = [
        k
        for k in differing_keys(runs)
        if not any(o.startswith(f"{k}=") for run in runs for o in run.overrides)
    ]
    values = summary_frame(runs, metrics)
    logged = {m: [m in run.history or m in run.final for run in runs] for m in metrics}
    rows = []
    for i, run in enumerate(runs):
        row = {
            "run": run.label + (" ✗" if run.status == "failed" else ""),
            "dir": run.name,
            "status": f"{run.status}: {run.error}" if run.error else run.status,
            "step": _format(run.last_step),
            **{k: _format(run.config.get(k)) for k in config_keys},
        }
        for column in values.columns:
            was_logged = logged[column.removesuffix(" (best)")][i]
            row[column] = _format(float(values.iloc[i][column])) if was_logged else "—"
        rows.append(row)
    order = sorted(
        range(len(runs)),
        key=lambda i: ([_sort_key(runs[i].value(k)) for k in differing_keys(runs)], i),
    )
    import pandas as pd

    return pd.DataFrame([rows[i] for i in order], columns=list(rows[0]))


def grouped_table(
    groups: dict[tuple[str, ...], list[Run]], keys: Sequence[str], metrics: Sequence[str]
) -> Any:
    """One row per group: its key values, run counts and the mean ± std (population) of each
    metric over its runs' finite values; a lone value shows no ± and ``(n=k)`` says how many
    runs contributed when some had no finite value."""
    import pandas as pd

    everyone = [run for members in groups.values() for run in members]
    frame = summary_frame(everyone, metrics).reset_index(drop=True)
    frame = frame.where(frame.map(math.isfinite))  # NaN and inf do not enter the mean
    rows, start = [], 0
    for value, members in groups.items():
        values, start = frame.iloc[start : start + len(members)], start + len(members)
        row = dict(zip(keys or ["runs of"], value or ("all",), strict=True))
        row["runs"] = str(len(members))
        row["failed"] = str(sum(run.status == "failed" for run in members))
        for column, column_values in values.items():
            mean, std, n = column_values.mean(), column_values.std(ddof=0), column_values.count()
            text = "—" if n == 0 else _format(mean) + (f" ± {std:.2g}" if n > 1 else "")
            row[column] = text if n in (0, len(members)) else f"{text} (n={n})"
        rows.append(row)
    return pd.DataFrame(rows).fillna("—")


def _markdown(table: Any) -> str:
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |"]
    lines.append("|" + "---|" * len(table.columns))
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") or "metric"


def figure(
    runs: Sequence[Run],
    metric: str,
    groups: dict[tuple[str, ...], list[Run]] | None = None,
    group_label: str = "",
    log_scale: bool = False,
) -> Any:
    """A matplotlib Figure of ``metric`` against step: one line per run, or a mean ± std band
    per group, the legend beside the axes (never on the lines). None when no run logged it."""
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # The object-oriented API: no display, no pyplot global state.
    ax = fig.subplots()
    for value, members in (groups or {(run.label,): [run] for run in runs}).items():
        points = pd.DataFrame(
            [(s, v) for run in members for s, v in zip(*run.series(metric), strict=True)],
            columns=["step", "value"],
        )
        if points.empty:
            continue
        if groups:
            by_step = points.groupby("step")["value"]
            mean, std = by_step.mean(), by_step.std(ddof=0)
            name = f"{group_label}={', '.join(value)}" if value else "all"
            (line,) = ax.plot(mean.index, mean, label=f"{name} (n={len(members)})")
            ax.fill_between(mean.index, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        else:
            (run,) = members
            ax.plot(
                points["step"],
                points["value"],
                "--" if run.status == "failed" else "-",
                marker="o" if len(points) == 1 else None,
                label=run.label + (f" [{run.status}]" if run.status != "completed" else ""),
            )
    lines = len(ax.get_legend_handles_labels()[1])
    if lines == 0:
        return None
    ax.set(xlabel="step", ylabel=metric, title=metric, yscale="log" if log_scale else "linear")
    ax.grid(True, alpha=0.3)
    if lines <= LEGEND_MAX:
        columns = math.ceil(lines / 20)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=columns)
    else:
        ax.set_title(f"{metric} ({lines} runs; --group-by draws one line per group)")
    return fig


def png(fig: Any) -> bytes:
    """The figure as PNG bytes, grown to hold the legend beside the axes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The report

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; }
"""


def _offline_hint(runs: Sequence[Run]) -> str:
    offline = sum(len(run.wandb_runs) for run in runs)
    if not offline:
        return ""
    return (
        f"{offline} offline W&B run(s) found: read one with `wandb leet inspect --json "
        "<job dir>/wandb/offline-run-*/run-*.wandb`; `wandb sync <job dir>/wandb/offline-run-*` "
        "uploads them (needs a W&B account and `wandb login`)."
    )


def write_report(
    runs: Sequence[Run],
    out_dir: str | os.PathLike[str],
    *,
    group_by: Sequence[str] = (),
    metrics: Sequence[str] | None = None,
    formats: Sequence[str] = FORMATS,
    title: str = "Run comparison",
    not_started: Sequence[NotStarted] = (),
    log_scale: bool = False,
) -> list[pathlib.Path]:
    """Writes the comparison report of ``runs`` into ``out_dir``; returns the files written.

    Everything is computed before the first file is written, and a failed write removes an
    ``out_dir`` it created, so a failure leaves no empty or partial report behind.

    Args:
      runs: the runs, e.g. from :func:`find_runs`.
      out_dir: gets ``report.md`` and/or ``report.html``, and ``plots/`` for the Markdown.
      group_by: config keys (dotted) or config groups to group runs by; empty: group by seed
        automatically (see :func:`grouping_keys`).
      metrics: glob patterns selecting metrics (default: final/*, eval/* and train/loss).
      formats: any of ``"md"`` and ``"html"``.
      title: the report's heading.
      not_started: job dirs without metrics (:func:`find_not_started`), listed with errors.
      log_scale: plot values on a log scale.
    """
    if not runs:
        raise CompareError("no runs to compare")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise CompareError(f"unknown report format {bad or formats}; choose from md, html")
    if not runs[0].label:
        label_runs(runs)
    chosen = select_metrics(runs, metrics)
    keys = grouping_keys(runs, group_by)
    groups = group_runs(runs, keys) if group_by or keys else None
    heading = f"Grouped by {', '.join(keys)}" if group_by else "Seeds aggregated"
    plots = {}
    for metric in (m for m in chosen if not m.startswith(FINAL_PREFIX)):  # final/: table only
        if (fig := figure(runs, metric, groups, ",".join(keys), log_scale)) is not None:
            plots[metric] = (f"plots/{_slug(metric)}.png", png(fig))
    tables = [("Runs", runs_table(runs, chosen))]
    if groups:
        tables.insert(0, (f"{heading} (mean ± std)", grouped_table(groups, keys, chosen)))

    n_failed = sum(run.status == "failed" for run in runs)
    n_incomplete = sum(run.status == "incomplete" for run in runs)
    counts = f"{len(runs)} run(s): {len(runs) - n_failed - n_incomplete} completed"
    counts += f", {n_failed} failed, {n_incomplete} without a status file (killed or running)"
    if not_started:
        listed = "; ".join(f"{j.name} ({j.error})" if j.error else j.name for j in not_started)
        counts += f"; {len(not_started)} job(s) never started (rejected, or starting): {listed}"
    notes = [counts + ".", _offline_hint(runs)]
    notes.append("Sources: " + ", ".join(sorted({str(run.path.parent) for run in runs})))

    files: dict[str, bytes] = {}
    if "md" in formats:
        parts = [f"# {title}", *(n for n in notes[:1])]
        for name, table in tables:
            parts += [f"## {name}", _markdown(table)]
        if plots:
            parts.append("## Metrics over steps")
            parts += [f"![{metric}]({path})" for metric, (path, _) in plots.items()]
        parts += [n for n in notes[1:] if n]
        files["report.md"] = ("\n\n".join(parts) + "\n").encode()
        files.update(plots.values())
    if "html" in formats:
        parts = [
            f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
            f"<p>{html.escape(notes[0])}</p>",
        ]
        for name, table in tables:
            parts += [f"<h2>{html.escape(name)}</h2>", table.to_html(index=False, border=0)]
        if plots:
            parts.append("<h2>Metrics over steps</h2>")
            for metric, (_, image) in plots.items():
                data = base64.b64encode(image).decode("ascii")
                parts.append(
                    f'<p><img alt="{html.escape(metric)}" src="data:image/png;base64,{data}"></p>'
                )
        parts += [f"<p>{html.escape(n)}</p>" for n in notes[1:] if n]
        files["report.html"] = ("\n".join([*parts, "</body></html>"]) + "\n").encode()

    out = pathlib.Path(out_dir)
    created = not out.exists()
    try:
        for name, data in files.items():
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(data)
    except OSError as e:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise CompareError(f"cannot write the report into {out}: {e}") from e
    return [out / name for name in ("report.md", "report.html") if name in files]


# ---------------------------------------------------------------------------------------------
# Command line

_EPILOG = """\
examples:
  fedjax-compare multirun/2024-05-01/12-00-00 --out report
  fedjax-compare multirun/2024-05-01/12-00-00 --group-by optimizer --log-scale \\
      --metrics 'eval/test/*' 'final/test/*' --format html

Runs are found recursively (every directory holding metrics.jsonl); failed runs are marked ✗.
Runs that differ only by seed are aggregated (mean ± std) without --group-by.
Offline W&B runs (the default W&B mode) can be read without an account:
  wandb leet inspect --json <job dir>/wandb/offline-run-*/run-*.wandb
and uploaded to a W&B server with an account (after `wandb login`):
  wandb sync <job dir>/wandb/offline-run-*
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``fedjax-compare`` / ``scripts/compare_runs.py``."""
    parser = argparse.ArgumentParser(
        prog="fedjax-compare",
        description="Compare experiment runs: a table of the metrics of each run with the "
        "overrides that differ, grouped tables (mean ± std) and metric-vs-step plots, as a "
        "Markdown and/or self-contained HTML report.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", help="run or sweep output directories")
    parser.add_argument("--out", default="compare_report", help="report dir (default: %(default)s)")
    parser.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="KEY",
        help="config group (optimizer) or dotted config key (optimizer.learning_rate) to group "
        "runs by, repeatable or comma-separated; groups show mean ± std over their runs",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="GLOB",
        help="metrics to show, as glob patterns, e.g. 'eval/test/*' (default: final/*, "
        "eval/* and train/loss)",
    )
    parser.add_argument("--format", choices=[*FORMATS, "both"], default="both")
    parser.add_argument("--title", default="Run comparison", help="report heading")
    parser.add_argument("--log-scale", action="store_true", help="plot values on a log scale")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0, or 1 with one error line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        runs = find_runs(args.paths)
        written = write_report(
            runs,
            args.out,
            group_by=[k for arg in args.group_by for k in arg.split(",") if k],
            metrics=args.metrics,
            formats=FORMATS if args.format == "both" else (args.format,),
            title=args.title,
            not_started=find_not_started(args.paths),
            log_scale=args.log_scale,
        )
    except (CompareError, OSError) as e:
        print(f"fedjax-compare: error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
