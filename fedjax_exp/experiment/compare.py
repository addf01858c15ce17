"""Side-by-side comparison of finished runs: a W&B-report-like table and plots, offline.

A *run* is any directory holding a ``metrics.jsonl`` written by the experiment runner. Given
one or more run or sweep directories, :func:`find_runs` discovers every run below them and
:func:`write_report` renders

* a table of the final and best value of each selected metric per run, next to the config
  values that differ across the runs (flattened from the run's recorded config) and the command
  line overrides, with failed and unfinished runs marked;
* optionally, the same table grouped by one or more config keys (mean ± std over the runs of
  each group, e.g. over seeds);
* one metric-vs-step PNG per logged metric (matplotlib, no display needed),

into ``report.md`` (PNGs beside it) and/or a self-contained ``report.html`` (PNGs inlined).

Run layout read here (written by the runner and by Hydra)::

    <job dir>/metrics.jsonl          {"step": int, "time": float, "<ns>/<metric>": value, ...}
    <job dir>/status.json            {"status": "completed"|"failed", "step", "error", "final"}
    <job dir>/run_config.json        the config and overrides the run was started with
    <job dir>/.hydra/config.yaml     the composed config (for runs without run_config.json)
    <job dir>/.hydra/overrides.yaml  the command-line overrides (likewise)
    <job dir>/wandb/offline-run-*/   the offline W&B run, if W&B logging was on
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import fnmatch
import html
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from fedjax_exp.experiment import run_record
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_record import flatten

METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
FINAL_PREFIX = "final/"
# Keys of a metrics.jsonl record that are bookkeeping, not metrics.
RESERVED_KEYS = frozenset({"step", "time"})
# Metrics whose name contains one of these are better when smaller; all others when larger.
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "regret")
FORMATS = ("md", "html")


class CompareError(ValueError):
    """A problem with the runs to compare, with a message that says what to do about it."""


@dataclasses.dataclass
class Run:
    """Everything the report needs from one job directory.

    Attributes:
      path: the job directory.
      name: a short label, the path relative to the directories given by the user.
      status: ``completed``, ``failed``, or ``incomplete`` (no status file: killed or running).
      error: the error message of a failed run.
      config: the composed config, flattened to dotted keys.
      overrides: the command-line overrides of the job.
      history: metric name -> {step: value}; a step logged twice (a resumed run) keeps the
        last value.
      final: final metric name (``final/...``) -> value.
      last_step: the largest step logged.
      wandb_runs: offline W&B run directories inside the job directory.
    """

    path: pathlib.Path
    name: str
    status: str
    error: str | None
    config: dict[str, Any]
    overrides: list[str]
    history: dict[str, dict[int, float]]
    final: dict[str, float]
    last_step: int | None
    wandb_runs: list[pathlib.Path]

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """The (steps, values) of ``metric``, sorted by step; empty when never logged."""
        points = sorted(self.history.get(metric, {}).items())
        return [s for s, _ in points], [v for _, v in points]


# ---------------------------------------------------------------------------------------------
# Reading runs


# The runner writes non-finite values as strings so that every line stays valid JSON.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "infinity": math.inf, "-inf": -math.inf}


def _to_float(value: Any) -> float | None:
    """A metric value as a float; None for values that are not numbers (text, histograms)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return _NON_FINITE.get(value.strip().lower())
    return None


def read_metrics(path: pathlib.Path) -> dict[str, dict[int, float]]:
    """Reads a metrics.jsonl file into metric -> {step: value}.

    Values that are not numbers (text, histograms) are skipped; the strings ``"nan"``,
    ``"inf"`` and ``"-inf"`` (how the runner writes non-finite values) become floats. A
    malformed *last* line is ignored, because a killed process can leave a partly written
    line; a malformed line elsewhere is an error.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"cannot read {path}: {e}") from e
    history: dict[str, dict[int, float]] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                continue
            raise CompareError(
                f"{path}:{lineno}: not a JSON object ({e.msg}); every line of {METRICS_FILE} "
                "must be one JSON object"
            ) from e
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise CompareError(
                f'{path}:{lineno}: each record needs an integer "step", got {line[:80]!r}'
            )
        step = record["step"]
        for key, value in record.items():
            number = _to_float(value)
            if key not in RESERVED_KEYS and number is not None:
                history.setdefault(key, {})[step] = number
    return history


def read_status(job_dir: pathlib.Path) -> tuple[str, str | None, dict[str, float]]:
    """Reads ``status.json``: (status, error, final metrics with ``final/`` keys)."""
    path = job_dir / STATUS_FILE
    if not path.is_file():
        return "incomplete", None, {}
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"cannot read {path}: {e}") from e
    if not isinstance(status, dict):
        raise CompareError(f"{path}: expected a JSON object, got {type(status).__name__}")
    final = {}
    for key, value in (status.get("final") or {}).items():
        number = _to_float(value)
        if number is not None:
            name = key if key.startswith(FINAL_PREFIX) else FINAL_PREFIX + key
            final[name] = number
    return str(status.get("status", "incomplete")), status.get("error"), final


def read_config(job_dir: pathlib.Path) -> tuple[dict[str, Any], list[str]]:
    """Reads the job's config (flattened) and command-line overrides.

    From the runner's record of the run (``run_config.json``) where there is one: Hydra
    rewrites ``.hydra/`` on every invocation, also one the runner then rejects. Else from
    ``.hydra/`` (interpolations resolved where possible).
    """
    try:
        record = run_record.read(job_dir)
    except ConfigError as e:
        raise CompareError(str(e)) from e
    if record is not None:
        return flatten(record["config"]), [str(o) for o in record.get("overrides") or []]
    from omegaconf import OmegaConf  # imported here: keeps `--help` fast

    config: dict[str, Any] = {}
    config_path = job_dir / ".hydra" / "config.yaml"
    if config_path.is_file():
        try:
            cfg = OmegaConf.load(config_path)
        except Exception as e:  # yaml and omegaconf raise many types
            raise CompareError(f"cannot read {config_path}: {e}") from e
        raw = flatten(OmegaConf.to_container(cfg, resolve=False))
        for key, value in raw.items():
            if isinstance(value, str) and "${" in value:
                # Interpolations such as ${hydra:...} only resolve inside a Hydra app; show
                # those as written rather than failing the whole report.
                with contextlib.suppress(Exception):
                    value = OmegaConf.select(cfg, key)
            config[key] = value
    overrides: list[str] = []
    overrides_path = job_dir / ".hydra" / "overrides.yaml"
    if overrides_path.is_file():
        try:
            loaded = yaml.safe_load(overrides_path.read_text(encoding="utf-8")) or []
        except (OSError, yaml.YAMLError) as e:
            raise CompareError(f"cannot read {overrides_path}: {e}") from e
        overrides = [str(o) for o in loaded]
    return config, overrides


def load_run(job_dir: str | os.PathLike, name: str | None = None) -> Run:
    """Loads one job directory (which must hold a ``metrics.jsonl``)."""
    job_dir = pathlib.Path(job_dir)
    metrics_path = job_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise CompareError(f"{job_dir} is not a run directory: it has no {METRICS_FILE}")
    history = read_metrics(metrics_path)
    status, error, final = read_status(job_dir)
    # Final metrics logged to the metrics file count too (e.g. a run without a status file).
    for key, points in history.items():
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
        history={k: v for k, v in history.items() if not k.startswith(FINAL_PREFIX)},
        final=final,
        last_step=max(steps) if steps else None,
        wandb_runs=sorted((job_dir / "wandb").glob("offline-run-*")),
    )


def _natural_key(path: pathlib.Path) -> list[Any]:
    # Sweep jobs are numbered 0..N; sort 2 before 10.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.as_posix())]


def find_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
    """Finds and loads every run (directory with a metrics.jsonl) at or below ``paths``."""
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
        job_dirs = sorted({p.parent for p in root.rglob(METRICS_FILE)}, key=_natural_key)
        for job_dir in job_dirs:
            if job_dir.resolve() in seen:
                continue
            seen.add(job_dir.resolve())
            rel = job_dir.relative_to(root).as_posix()
            label = root.name if rel == "." else f"{root.name}/{rel}"
            runs.append(load_run(job_dir, name=label))
    if not runs:
        where = ", ".join(str(p) for p in paths)
        raise CompareError(
            f"no runs found under {where}: no {METRICS_FILE} below it; pass a job directory "
            "(outputs/<date>/<time>) or a sweep directory (multirun/<date>/<time>)"
        )
    return runs


@dataclasses.dataclass(frozen=True)
class NotStarted:
    """A Hydra job dir without metrics: its config was rejected, or it is still starting."""

    name: str
    path: pathlib.Path
    error: str | None  # The last error its run.log records, if any.


def find_not_started(paths: Sequence[str | os.PathLike]) -> list[NotStarted]:
    """Hydra job dirs (with ``.hydra/``) at or below ``paths`` that hold no metrics.jsonl:
    e.g. a sweep job whose config the runner rejected (it writes nothing but Hydra's files)."""
    found: list[NotStarted] = []
    for given in paths:
        root = pathlib.Path(given)
        if not root.is_dir():
            continue
        hydra_dirs = sorted({p.parent.parent for p in root.rglob(".hydra/config.yaml")})
        for job_dir in sorted(hydra_dirs, key=_natural_key):
            if (job_dir / METRICS_FILE).exists() or (job_dir / "trials").is_dir():
                continue
            rel = job_dir.relative_to(root).as_posix()
            label = root.name if rel == "." else f"{root.name}/{rel}"
            found.append(NotStarted(label, job_dir, _last_logged_error(job_dir / "run.log")))
    return found


def _last_logged_error(log_file: pathlib.Path) -> str | None:
    try:
        lines = log_file.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    errors = [line.split("[ERROR] - ", 1)[1] for line in lines if "[ERROR] - " in line]
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


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (a missing key counts as differing)."""
    keys = sorted({k for run in runs for k in run.config})
    missing = object()

    def canonical(value: Any) -> str:
        return "<missing>" if value is missing else json.dumps(value, sort_keys=True, default=str)

    return [
        key for key in keys if len({canonical(run.config.get(key, missing)) for run in runs}) > 1
    ]


def select_metrics(runs: Sequence[Run], patterns: Sequence[str] | None) -> list[str]:
    """Metric names matching any glob in ``patterns`` (default: final, eval and train/loss)."""
    names = sorted({k for run in runs for k in [*run.history, *run.final]})
    if patterns:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise CompareError(
                f"--metrics {' '.join(patterns)} matches none of the logged metrics: "
                + ", ".join(names)
            )
        return chosen
    return [n for n in names if n.startswith((FINAL_PREFIX, "eval/")) or n == "train/loss"]


def summary_columns(metrics: Sequence[str]) -> list[str]:
    """Table column names: a final metric is one column; a logged metric gets last and best."""
    columns = []
    for metric in metrics:
        if metric.startswith(FINAL_PREFIX):
            columns.append(metric)
        else:
            columns += [f"{metric} (last)", f"{metric} (best)"]
    return columns


def summarize(run: Run, metrics: Sequence[str]) -> dict[str, float | None]:
    """One run's value for each of :func:`summary_columns` (None where it was not logged)."""
    row: dict[str, float | None] = {}
    for metric in metrics:
        if metric.startswith(FINAL_PREFIX):
            row[metric] = run.final.get(metric)
            continue
        _, values = run.series(metric)
        row[f"{metric} (last)"] = values[-1] if values else None
        row[f"{metric} (best)"] = best_value(values, metric)
    return row


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> dict[tuple[Any, ...], list[Run]]:
    """Runs grouped by their values of the config ``keys``, groups in ascending order of the
    values (numbers by value, e.g. learning rates 1e-4 < 1e-3 < 0.01)."""
    known = {k for run in runs for k in run.config}
    unknown = [k for k in keys if k not in known]
    if unknown:
        hint = ", ".join(differing_keys(runs)) or "none"
        raise CompareError(
            f"--group-by {', '.join(unknown)} is not a config key of any run; keys that differ "
            f"across these runs: {hint}"
        )
    groups: dict[tuple[Any, ...], list[Run]] = {}
    order: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for run in runs:
        raw = [run.config.get(k, "<missing>") for k in keys]
        value = tuple(_format_value(v) for v in raw)
        groups.setdefault(value, []).append(run)
        order.setdefault(value, tuple(_sort_key(v) for v in raw))
    return {value: groups[value] for value in sorted(groups, key=order.__getitem__)}


def _sort_key(value: Any) -> tuple[int, Any]:
    # Numbers before other values, each kind in its own natural order.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int] | None:
    """Mean and (population) std of the finite values, and their count; None if there are none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None
    mean = sum(finite) / len(finite)
    std = math.sqrt(sum((v - mean) ** 2 for v in finite) / len(finite))
    return mean, std, len(finite)


# ---------------------------------------------------------------------------------------------
# Plotting


def _slug(metric: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", metric).strip("_") or "metric"


# Legends: inside the axes up to this many lines, beside them up to LEGEND_MAX, and beyond
# that none (a legend of more runs covers the plot; grouping is the readable view).
LEGEND_INSIDE_MAX = 10
LEGEND_MAX = 40


def plot_metric(
    runs: Sequence[Run],
    metric: str,
    path: pathlib.Path,
    groups: Mapping[tuple[Any, ...], Sequence[Run]] | None = None,
    group_label: str = "",
) -> bool:
    """Draws ``metric`` against step, one line per run (or mean ± std band per group).

    Returns False (and writes nothing) when no run logged the metric.
    """
    # The object-oriented API leaves pyplot's global backend state alone and needs no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = False
    if groups:
        for value, members in groups.items():
            by_step: dict[int, list[float]] = {}
            for run in members:
                for step, v in zip(*run.series(metric), strict=True):
                    by_step.setdefault(step, []).append(v)
            if not by_step:
                continue
            steps = sorted(by_step)
            stats = [mean_std(by_step[s]) or (math.nan, math.nan, 0) for s in steps]
            mean = [m for m, _, _ in stats]
            std = [s for _, s, _ in stats]
            label = f"{group_label}={', '.join(value)} (n={len(members)})"
            (line,) = ax.plot(steps, mean, label=label)
            lower = [m - s for m, s in zip(mean, std, strict=True)]
            upper = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, lower, upper, color=line.get_color(), alpha=0.2)
            drawn = True
    else:
        for run in runs:
            steps, values = run.series(metric)
            if not steps:
                continue
            style = "--" if run.status == "failed" else "-"
            suffix = f" [{run.status}]" if run.status != "completed" else ""
            marker = "o" if len(steps) == 1 else None
            ax.plot(steps, values, style, marker=marker, label=run.name + suffix)
            drawn = True
    if not drawn:
        return False
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    lines = len(ax.get_legend_handles_labels()[1])
    if lines <= LEGEND_INSIDE_MAX:
        ax.set_title(metric)
        ax.legend(fontsize="small", loc="best")
    elif lines <= LEGEND_MAX:
        # Beside the axes, in columns of at most 20 entries, so no line is hidden under it.
        ax.set_title(metric)
        ax.legend(
            fontsize="x-small",
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            ncol=math.ceil(lines / 20),
        )
    else:
        ax.set_title(f"{metric} ({lines} runs; --group-by draws one line per group)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # "tight" grows the image to hold a legend beside the axes.
    fig.savefig(path, format="png", bbox_inches="tight")
    return True


# ---------------------------------------------------------------------------------------------
# Rendering


def _format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _format_stat(stat: tuple[float, float, int] | None, group_size: int) -> str:
    if stat is None:
        return "—"
    mean, std, n = stat
    text = f"{mean:.4g} ± {std:.2g}"
    return text if n == group_size else f"{text} (n={n})"


@dataclasses.dataclass
class Table:
    """A rendered-format-agnostic table: header and rows of strings, and a per-row flag."""

    header: list[str]
    rows: list[list[str]]
    failed: list[bool]


def runs_table(runs: Sequence[Run], metrics: Sequence[str]) -> Table:
    """The per-run table: run, status, step, differing config values, overrides, metrics."""
    config_keys = differing_keys(runs)
    columns = summary_columns(metrics)
    header = ["run", "status", "step", *config_keys, "overrides", *columns]
    rows, failed = [], []
    for run in runs:
        summary = summarize(run, metrics)
        status = run.status if not run.error else f"{run.status}: {run.error}"
        rows.append(
            [
                run.name,
                status,
                _format_value(run.last_step),
                *(_format_value(run.config.get(k)) for k in config_keys),
                " ".join(run.overrides) or "—",
                *(_format_value(summary[c]) for c in columns),
            ]
        )
        failed.append(run.status == "failed")
    return Table(header, rows, failed)


def grouped_table(
    groups: Mapping[tuple[Any, ...], Sequence[Run]], keys: Sequence[str], metrics: Sequence[str]
) -> Table:
    """Mean ± std of every summary column over the runs of each group."""
    columns = summary_columns(metrics)
    header = [*keys, "runs", "failed", *columns]
    rows, failed = [], []
    for value, members in groups.items():
        summaries = [summarize(run, metrics) for run in members]
        n_failed = sum(run.status == "failed" for run in members)
        rows.append(
            [
                *value,
                str(len(members)),
                str(n_failed),
                *(_format_stat(mean_std(s[c] for s in summaries), len(members)) for c in columns),
            ]
        )
        failed.append(n_failed == len(members))
    return Table(header, rows, failed)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(table: Table) -> str:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in table.header) + " |",
        "|" + "---|" * len(table.header),
    ]
    for row, failed in zip(table.rows, table.failed, strict=True):
        cells = [_md_cell(c) for c in row]
        if failed:
            cells[0] = f"**{cells[0]}** ✗"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = []
    for row, failed in zip(table.rows, table.failed, strict=True):
        cls = ' class="failed"' if failed else ""
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
tr.failed td { background: #fde8e8; }
img { max-width: 100%; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def _sync_hint(runs: Sequence[Run]) -> str:
    offline = sum(len(run.wandb_runs) for run in runs)
    if not offline:
        return ""
    return (
        f"{offline} offline W&B run(s) found; upload them with "
        "`wandb sync <job dir>/wandb/offline-run-*`."
    )


def write_report(
    runs: Sequence[Run],
    out_dir: str | os.PathLike,
    *,
    group_by: Sequence[str] = (),
    metrics: Sequence[str] | None = None,
    formats: Sequence[str] = FORMATS,
    title: str = "Run comparison",
    not_started: Sequence[NotStarted] = (),
) -> list[pathlib.Path]:
    """Writes the comparison report of ``runs`` into ``out_dir``; returns the files written.

    Args:
      runs: the runs, e.g. from :func:`find_runs`.
      out_dir: created if needed; gets ``report.md`` and/or ``report.html`` and ``plots/``.
      group_by: config keys (dotted) to group runs by; empty for no grouping.
      metrics: glob patterns selecting metrics (default: final/*, eval/* and train/loss).
      formats: any of ``"md"`` and ``"html"``.
      title: the report's heading.
      not_started: job dirs without metrics (see :func:`find_not_started`), listed with
        their logged error.
    """
    if not runs:
        raise CompareError("no runs to compare")
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise CompareError(f"unknown report format {bad or formats}; choose from md, html")
    out = pathlib.Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompareError(f"cannot create the report directory {out}: {e}") from e
    chosen = select_metrics(runs, metrics)
    groups = group_runs(runs, group_by) if group_by else None
    group_label = ",".join(group_by)

    plots: list[tuple[str, pathlib.Path]] = []
    for metric in chosen:
        if metric.startswith(FINAL_PREFIX):
            continue  # logged once per run: the table shows it
        path = out / "plots" / f"{_slug(metric)}.png"
        if plot_metric(runs, metric, path, groups, group_label):
            plots.append((metric, path))

    table = runs_table(runs, chosen)
    gtable = grouped_table(groups, group_by, chosen) if groups else None
    n_failed = sum(run.status == "failed" for run in runs)
    n_incomplete = sum(run.status == "incomplete" for run in runs)
    counts = f"{len(runs)} run(s): {len(runs) - n_failed - n_incomplete} completed"
    counts += f", {n_failed} failed, {n_incomplete} without a status file (killed or running)"
    if not_started:
        listed = "; ".join(
            f"{job.name} ({job.error})" if job.error else job.name for job in not_started
        )
        counts += f"; {len(not_started)} job(s) never started (rejected, or starting): {listed}"
    sources = sorted({str(run.path.parent) for run in runs})
    written = []

    if "md" in formats:
        parts = [f"# {title}", "", counts + ".", ""]
        if gtable:
            parts += [f"## Grouped by {group_label} (mean ± std)", "", _markdown_table(gtable), ""]
        parts += ["## Runs", "", _markdown_table(table), ""]
        if plots:
            parts += ["## Metrics over steps", ""]
            parts += [f"![{m}]({p.relative_to(out).as_posix()})\n" for m, p in plots]
        if hint := _sync_hint(runs):
            parts += [hint, ""]
        parts += ["Sources: " + ", ".join(f"`{s}`" for s in sources), ""]
        path = out / "report.md"
        path.write_text("\n".join(parts), encoding="utf-8")
        written.append(path)

    if "html" in formats:
        parts = [
            "<!DOCTYPE html>",
            '<html><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
            f"<h1>{html.escape(title)}</h1><p>{html.escape(counts)}.</p>",
        ]
        if gtable:
            parts.append(f"<h2>Grouped by {html.escape(group_label)} (mean ± std)</h2>")
            parts.append(_html_table(gtable))
        parts += ["<h2>Runs</h2>", _html_table(table)]
        if plots:
            parts.append("<h2>Metrics over steps</h2>")
            for metric, p in plots:
                data = base64.b64encode(p.read_bytes()).decode("ascii")
                alt = html.escape(metric)
                parts.append(f'<p><img alt="{alt}" src="data:image/png;base64,{data}"></p>')
        if hint := _sync_hint(runs):
            parts.append(f"<p>{html.escape(hint)}</p>")
        parts.append("<p>Sources: " + ", ".join(html.escape(s) for s in sources) + "</p>")
        parts.append("</body></html>")
        path = out / "report.html"
        path.write_text("\n".join(parts), encoding="utf-8")
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Command line

_EPILOG = """\
examples:
  fedjax-compare multirun/2024-05-01/12-00-00 --out report
  fedjax-compare multirun/2024-05-01/12-00-00 --group-by optimizer.learning_rate \\
      --metrics 'eval/test/*' 'final/test/*' --format html

Runs are found recursively (every directory holding metrics.jsonl). Failed runs are marked.
Offline W&B runs (the default W&B mode) can be uploaded to a W&B server later with
  wandb sync <job dir>/wandb/offline-run-*
and compared there as well.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``fedjax-compare`` / ``scripts/compare_runs.py``."""
    parser = argparse.ArgumentParser(
        prog="fedjax-compare",
        description="Compare experiment runs: a table of final and best metrics with the "
        "config values that differ, optionally grouped, and metric-vs-step plots, as a "
        "Markdown and/or self-contained HTML report.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", help="run or sweep output directories")
    parser.add_argument(
        "--out", default="compare_report", help="report directory (default: %(default)s)"
    )
    parser.add_argument(
        "--group-by",
        action="append",
        default=[],
        metavar="KEY",
        help="dotted config key to group runs by, e.g. optimizer.learning_rate (repeatable); "
        "groups show mean ± std over their runs",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="GLOB",
        help="metrics to show, as glob patterns, e.g. 'eval/test/*' (default: final/*, "
        "eval/* and train/loss)",
    )
    parser.add_argument(
        "--format",
        choices=[*FORMATS, "both"],
        default="both",
        help="report format (default: %(default)s)",
    )
    parser.add_argument("--title", default="Run comparison", help="report heading")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0, or 1 with one error line on stderr)."""
    args = build_parser().parse_args(argv)
    formats = FORMATS if args.format == "both" else (args.format,)
    group_by = [k for arg in args.group_by for k in arg.split(",") if k]
    try:
        runs = find_runs(args.paths)
        written = write_report(
            runs,
            args.out,
            group_by=group_by,
            metrics=args.metrics,
            formats=formats,
            title=args.title,
            not_started=find_not_started(args.paths),
        )
    except (CompareError, OSError) as e:
        print(f"fedjax-compare: error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
