"""``fedjax-compare``: finished runs side by side, offline. :func:`find_runs` loads every run
(a dir with a ``metrics.jsonl``) below the given dirs; :func:`write_report` writes a table of
runs (labelled by the overrides that differ, failed runs marked ✗), a table of groups (mean ±
std; by itself over seeds when runs differ only by seed) and metric-vs-step plots, as
``report.md`` (PNGs in ``plots/``) and/or a self-contained ``report.html``.
"""

from __future__ import annotations

import argparse
import base64
import collections
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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import yaml

from fedjax_exp.experiment import run_files, run_record
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_files import TRIALS_DIR

FINAL_PREFIX = "final/"
RESERVED_KEYS = frozenset({"step", "time", "status", "error"})  # bookkeeping, not metrics
FORMATS = ("md", "html")
LEGEND_MAX = 40  # More lines than this get no legend (grouping is the readable view).
Groups = dict[tuple[str, ...], list["Run"]]


class CompareError(ValueError):
    """A problem with the runs to compare; the message says what to do."""


@dataclasses.dataclass
class Run:
    """One run dir: ``name`` relative to the dir given, ``label`` (:func:`label_runs`),
    ``config`` flattened with the config-group choices (``"optimizer": "adam"``), ``status``
    (``incomplete``: no status file) and ``history``: metric -> {step: value} (NaN: not finite)."""

    path: pathlib.Path
    name: str
    status: str
    error: str | None
    config: dict[str, Any]
    overrides: list[str]
    history: dict[str, dict[int, float]]
    label: str = ""

    @property
    def final(self) -> dict[str, float]:
        return {k: v[max(v)] for k, v in self.history.items() if k.startswith(FINAL_PREFIX)}

    @property
    def last_step(self) -> int | None:
        return max((step for points in self.history.values() for step in points), default=None)


def read_history(path: str | os.PathLike[str]) -> dict[str, dict[int, float]]:
    """A metrics file as metric -> {step: value}; null reads as NaN, non-numbers are left out."""
    try:
        records = run_files.read_metrics(path)
    except (OSError, UnicodeDecodeError, run_files.MetricsFileError) as e:
        raise CompareError(str(e)) from e
    history: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            value = math.nan if value is None else value
            if key not in RESERVED_KEYS and type(value) in (int, float):
                history.setdefault(key, {})[record["step"]] = float(value)
    return history


def _load(path: pathlib.Path, parse: Callable[[str], Any] = yaml.safe_load) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise CompareError(f"cannot read {path}: {e}") from e


def read_config(job_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], list[str]]:
    """The run's flattened config and overrides: ``run_config.json``, else ``.hydra/``."""
    hydra = pathlib.Path(job_dir) / run_files.HYDRA_DIR
    try:
        record = run_record.read(job_dir)
    except ConfigError as e:
        raise CompareError(str(e)) from e
    if record is None:
        record = {
            "config": _load(hydra / "config.yaml"),
            "overrides": _load(hydra / "overrides.yaml"),
        }
    overrides = [str(o) for o in record.get("overrides") or []]
    return run_record.flatten(record["config"] or {}), overrides


def load_run(job_dir: str | os.PathLike[str], name: str | None = None) -> Run:
    job_dir = pathlib.Path(job_dir)
    if not (job_dir / run_files.METRICS_FILE).is_file():
        raise CompareError(f"{job_dir} is not a run directory: it has no {run_files.METRICS_FILE}")
    status = _load(job_dir / run_files.STATUS_FILE, json.loads) or {"status": "incomplete"}
    if not isinstance(status, dict):
        raise CompareError(f"{job_dir / run_files.STATUS_FILE}: expected a JSON object")
    config, overrides = read_config(job_dir)
    # Config-group choices: Hydra's record of them, then overrides of keys that are not config
    # values (optimizer=sgd, not seed=1).
    hydra = _load(job_dir / run_files.HYDRA_DIR / "hydra.yaml") or {}
    recorded = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    for key, value in recorded.items():
        if not str(key).startswith("hydra/"):
            config.setdefault(str(key), str(value))
    for key, _, value in (o.lstrip("+~").partition("=") for o in overrides):
        if value and "." not in key and key not in config:
            config[key] = value
    return Run(
        path=job_dir,
        name=job_dir.name if name is None else name,
        status=str(status.get("status", "incomplete")),
        error=status.get("error"),
        config=config,
        overrides=overrides,
        history=read_history(job_dir / run_files.METRICS_FILE),
    )


def _natural_key(text: str) -> list[Any]:
    # Sweep jobs are numbered 0..N; sort 2 before 10.
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", text)]


def _job_dirs(root: pathlib.Path, marker: str) -> list[tuple[str, pathlib.Path]]:
    """(name, dir) of the dirs at or below ``root`` holding ``marker``, naturally sorted."""
    dirs = sorted({p.parent for p in root.rglob(marker)}, key=lambda d: _natural_key(d.as_posix()))
    return [(f"{root.name}/{d.relative_to(root).as_posix()}".removesuffix("/."), d) for d in dirs]


def label_runs(runs: Sequence[Run]) -> None:
    """Labels each run by its overrides not every run shares, plus its path where that leaves
    it without a label or with another run's."""
    common = set.intersection(*(set(run.overrides) for run in runs))
    for run in runs:
        run.label = " ".join(o for o in run.overrides if o not in common)
    labels = [run.label for run in runs]
    for run in runs:
        if not run.label or labels.count(run.label) > 1:
            run.label = f"{run.label} ({run.name})" if run.label else run.name


def find_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Run]:
    """Finds, loads and labels every run (dir with a metrics.jsonl) at or below ``paths``."""
    found: dict[pathlib.Path, Run] = {}
    for root in map(pathlib.Path, paths):
        if not root.is_dir():
            problem = "is a file" if root.exists() else "does not exist"
            raise CompareError(f"{root} {problem}; pass a run or sweep output directory")
        for name, job_dir in _job_dirs(root, run_files.METRICS_FILE):
            if job_dir.resolve() not in found:  # The same run given twice is listed once.
                found[job_dir.resolve()] = load_run(job_dir, name=name)
    if not found:
        raise CompareError(
            f"no runs found under {', '.join(map(str, paths))}: no {run_files.METRICS_FILE} "
            "below it; pass a job directory (outputs/<date>/<time>) or a sweep directory "
            "(multirun/<date>/<time>)"
        )
    label_runs(runs := list(found.values()))
    return runs


def find_not_started(paths: Sequence[str | os.PathLike[str]]) -> list[tuple[str, str | None]]:
    """(name, last logged error) of the job dirs (with a ``run.log``) without metrics."""
    found = []
    for root in map(pathlib.Path, paths):
        for name, job_dir in _job_dirs(root, run_files.RUN_LOG_FILE):
            if not any((job_dir / f).exists() for f in (run_files.METRICS_FILE, TRIALS_DIR)):
                log = (job_dir / run_files.RUN_LOG_FILE).read_text("utf-8", errors="replace")
                errors = re.findall(r"\[ERROR\] - (.*)", log)
                found.append((name, errors[-1] if errors else None))
    return found


def best_value(values: Iterable[float], metric: str) -> float | None:
    finite = [v for v in values if math.isfinite(v)]
    return (min if run_files.lower_is_better(metric) else max)(finite) if finite else None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value (or presence) differs across ``runs``."""
    keys = sorted({k for run in runs for k in run.config})
    return [k for k in keys if len({_canonical(run.config.get(k, "-")) for run in runs}) > 1]


def select_metrics(runs: Sequence[Run], patterns: Sequence[str] | None) -> list[str]:
    """Metric names matching any glob in ``patterns`` (default: final, eval and train/loss)."""
    names = sorted({k for run in runs for k in run.history})
    if not patterns:
        return [n for n in names if n.startswith((FINAL_PREFIX, "eval/")) or n == "train/loss"]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise CompareError(
            f"--metrics {' '.join(patterns)} matches none of the logged metrics: {', '.join(names)}"
        )
    return chosen


def _sort_key(value: Any) -> tuple[int, Any]:
    # Numbers first and by value (learning rates 1e-4 < 1e-3 < 0.01), then text naturally.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, _natural_key(str(value)))


def grouping_keys(runs: Sequence[Run], group_by: Sequence[str]) -> list[str] | None:
    """``group_by`` (checked), else the differing keys but ``*seed`` when some runs differ
    only by seed (``[]``: one group); None: no grouping."""
    unknown = [k for k in group_by if all(run.config.get(k) is None for run in runs)]
    if unknown:
        raise CompareError(
            f"--group-by {', '.join(unknown)} is neither a config key nor a config group of "
            f"any run; keys that differ across these runs: {', '.join(differing_keys(runs))}"
        )
    if group_by:
        return list(group_by)
    differing = differing_keys(runs)
    others = [k for k in differing if not k.rsplit(".", 1)[-1].endswith("seed")]
    values = [tuple(_canonical(run.config.get(k)) for k in others) for run in runs]
    return others if len(others) < len(differing) and len(set(values)) < len(values) else None


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> Groups:
    ordered = sorted(runs, key=lambda run: [_sort_key(run.config.get(k)) for k in keys])
    groups: Groups = {}
    for run in ordered:
        groups.setdefault(tuple(_format(run.config.get(k)) for k in keys), []).append(run)
    return groups


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return json.dumps(value, default=str) if isinstance(value, list | dict) else str(value)


def summary_frame(runs: Sequence[Run], metrics: Sequence[str]) -> pd.DataFrame:
    """Per run, each metric's last value, and its ``(best)`` where that differs (None: never
    logged)."""
    columns: dict[str, list[float | None]] = {}
    for metric in metrics:
        series = [[v for _, v in sorted(run.history.get(metric, {}).items())] for run in runs]
        columns[metric] = last = [values[-1] if values else None for values in series]
        best = [best_value(values, metric) for values in series]
        if not metric.startswith(FINAL_PREFIX) and any(
            b is not None and b != v for b, v in zip(best, last, strict=True)
        ):
            columns[f"{metric} (best)"] = [
                math.nan if b is None and v else b for b, v in zip(best, series, strict=True)
            ]
    return pd.DataFrame(columns, index=[run.label for run in runs], dtype=object)


def runs_table(runs: Sequence[Run], metrics: Sequence[str]) -> pd.DataFrame:
    """One row per run, sorted by the differing config values not set by an override."""
    differing = differing_keys(runs)
    overridden = {o.partition("=")[0].lstrip("+~") for run in runs for o in run.overrides}
    table = pd.DataFrame(
        {
            "run": [run.label + (" ✗" if run.status == "failed" else "") for run in runs],
            "dir": [run.name for run in runs],
            "status": [f"{run.status}: {run.error}" if run.error else run.status for run in runs],
            "step": [run.last_step for run in runs],
            **{k: [run.config.get(k) for run in runs] for k in differing if k not in overridden},
        },
        dtype=object,
    )
    table = pd.concat([table, summary_frame(runs, metrics).reset_index(drop=True)], axis=1)
    order = sorted(
        range(len(runs)), key=lambda i: [_sort_key(runs[i].config.get(k)) for k in differing]
    )
    return table.iloc[order].map(_format).reset_index(drop=True)


def grouped_table(groups: Groups, keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Per group: run counts and each metric's mean ± population std over finite values
    (``(n=k)``: only k runs had one)."""
    values = summary_frame([run for group in groups.values() for run in group], metrics)
    values = values.reset_index(drop=True).astype(float)
    by = values.where(values.abs() < math.inf).groupby(
        [i for i, g in enumerate(groups.values()) for _ in g]
    )
    mean, std, count = by.mean(), by.std(ddof=0), by.count()
    size = pd.Series([len(group) for group in groups.values()])
    text = mean.map(_format) + (" ± " + std.map("{:.2g}".format)).where(count > 1, "")
    text = text.where(count.eq(size, axis=0), text + " (n=" + count.astype(str) + ")")
    table = pd.DataFrame(
        [*groups] if keys else [("all",)] * len(groups), columns=keys or ["runs of"]
    )
    table["runs"] = size.astype(str)
    table["failed"] = [str(sum(run.status == "failed" for run in g)) for g in groups.values()]
    return pd.concat([table, text.where(count > 0, "—")], axis=1)


def _markdown(table: pd.DataFrame) -> str:
    def line(cells: Iterable[Any]) -> str:
        return (
            "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
        )

    rows = [line(row) for row in table.itertuples(index=False)]
    return "\n".join([line(table.columns), "|" + "---|" * len(table.columns), *rows])


def figure(
    runs: Sequence[Run],
    metric: str,
    groups: Groups | None = None,
    group_label: str = "",
    log_scale: bool = False,
) -> Any:
    """``metric`` against step, a line per run or a mean ± std band per group, the legend
    beside the axes; None when no run logged it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)  # The object-oriented API: no display, no pyplot global state.
    ax = fig.subplots()
    for value, members in (groups or {(run.label,): [run] for run in runs}).items():
        points = pd.concat([pd.Series(r.history.get(metric, {}), dtype=float) for r in members])
        if points.empty:
            continue
        by_step = points.groupby(level=0)  # A run is a group of one: its values, std 0.
        mean, std = by_step.mean(), by_step.std(ddof=0)
        if groups:
            name = f"{group_label}={', '.join(value)}" if value else "all"
            label = f"{name} (n={len(members)})"
        else:
            status = members[0].status
            label = members[0].label + (f" [{status}]" if status != "completed" else "")
        (line,) = ax.plot(
            mean.index,
            mean,
            "--" if all(run.status == "failed" for run in members) else "-",
            marker="o" if len(mean) == 1 else None,
            label=label,
        )
        ax.fill_between(mean.index, mean - std, mean + std, color=line.get_color(), alpha=0.2)
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


_HTML_HEAD = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>Run comparison</title>
<style>body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; } img { max-width: 100%; }
</style></head><body><h1>Run comparison</h1>"""


def write_report(
    runs: Sequence[Run],
    out_dir: str | os.PathLike[str],
    *,
    group_by: Sequence[str] = (),
    metrics: Sequence[str] | None = None,
    formats: Sequence[str] = FORMATS,
    not_started: Sequence[tuple[str, str | None]] = (),
    log_scale: bool = False,
) -> list[pathlib.Path]:
    """Writes the report into ``out_dir``; returns its files. ``metrics``: globs (default:
    final/*, eval/*, train/loss). Everything is computed first, and a failed write removes the
    ``out_dir`` it created: no partial report is left behind."""
    if not runs:
        raise CompareError("no runs to compare")
    if not formats or set(formats) - set(FORMATS):
        raise CompareError(f"unknown report format {list(formats)}; choose from md, html")
    if not runs[0].label:
        label_runs(runs)
    chosen = select_metrics(runs, metrics)
    keys = grouping_keys(runs, group_by)
    groups = group_runs(runs, keys) if keys is not None else None
    plots = {}
    for metric in (m for m in chosen if not m.startswith(FINAL_PREFIX)):  # final/: table only
        if (fig := figure(runs, metric, groups, ",".join(keys or []), log_scale)) is not None:
            plots[metric] = (f"plots/{re.sub(r'[^A-Za-z0-9_.-]+', '_', metric)}.png", png(fig))
    tables = [("Runs", runs_table(runs, chosen))]
    if groups:
        heading = f"Grouped by {', '.join(keys)}" if group_by else "Seeds aggregated"
        tables.insert(0, (f"{heading} (mean ± std)", grouped_table(groups, keys or [], chosen)))

    count = collections.Counter(run.status for run in runs)
    statuses = [f"{count.pop(s, 0)} {s}" for s in ("completed", "failed")]  # then interrupted...
    statuses += [f"{n} {s}" for s, n in count.items() if s != "incomplete"]
    statuses += [f"{count['incomplete']} without a status file (killed or running)"]
    summary = f"{len(runs)} run(s): {', '.join(statuses)}"
    if not_started:
        listed = "; ".join(f"{name} ({error})" if error else name for name, error in not_started)
        summary += f"; {len(not_started)} job(s) never started (rejected, or starting): {listed}"
    notes = []
    if offline := sum(len(list((run.path / "wandb").glob("offline-run-*"))) for run in runs):
        notes.append(
            f"{offline} offline W&B run(s): read one with `wandb leet inspect --json <job dir>/"
            "wandb/offline-run-*/run-*.wandb`; `wandb sync <job dir>/wandb/offline-run-*` "
            "uploads them (needs a W&B account and `wandb login`)."
        )
    notes.append("Sources: " + ", ".join(sorted({str(run.path.parent) for run in runs})))

    files: dict[str, bytes] = {}
    if "md" in formats:
        parts = ["# Run comparison", summary + "."]
        parts += [f"## {name}\n\n{_markdown(table)}" for name, table in tables]
        parts += ["## Metrics over steps"] if plots else []
        parts += [f"![{metric}]({path})" for metric, (path, _) in plots.items()]
        files["report.md"] = "\n\n".join([*parts, *notes]).encode() + b"\n"
        files.update(plots.values())
    if "html" in formats:
        parts = [_HTML_HEAD, f"<p>{html.escape(summary)}.</p>"]
        for name, table in tables:
            parts += [f"<h2>{html.escape(name)}</h2>", table.to_html(index=False, border=0)]
        parts += ["<h2>Metrics over steps</h2>"] if plots else []
        for metric, (_, image) in plots.items():
            data = base64.b64encode(image).decode("ascii")
            parts.append(f'<p><img alt="{html.escape(metric)}" src="data:image/png;base64,{data}">')
        parts += [f"<p>{html.escape(note)}</p>" for note in notes]
        files["report.html"] = "\n".join([*parts, "</body></html>\n"]).encode()

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


_EPILOG = """\
examples:
  fedjax-compare multirun/train/2024-05-01/12-00-00 --out report
  fedjax-compare multirun/train/2024-05-01/12-00-00 --group-by optimizer --log-scale \\
      --metrics 'eval/test/*' 'final/test/*' --format html

Runs are found recursively (every directory holding metrics.jsonl); failed runs are marked ✗.
Runs that differ only by seed are aggregated (mean ± std) without --group-by.
Offline W&B runs (the default W&B mode) can be read without an account:
  wandb leet inspect --json <job dir>/wandb/offline-run-*/run-*.wandb
and uploaded to a W&B server with an account (after `wandb login`):
  wandb sync <job dir>/wandb/offline-run-*
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedjax-compare",
        description="Compare experiment runs: tables of each run's metrics labelled by the "
        "overrides that differ, of groups (mean ± std), and metric-vs-step plots, as Markdown "
        "and/or self-contained HTML.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("paths", nargs="+", help="run or sweep output directories")
    add("--out", default="compare_report", help="report directory (default: %(default)s)")
    add(
        "--group-by",
        action="append",
        default=[],
        metavar="KEY",
        help="config group (optimizer) or dotted config key (optimizer.learning_rate) to group "
        "runs by; repeatable or comma-separated",
    )
    add("--metrics", nargs="+", metavar="GLOB", help="default: final/* eval/* train/loss")
    add("--format", choices=[*FORMATS, "both"], default="both")
    add("--log-scale", action="store_true", help="plot values on a log scale")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit code (1 with one error line on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        written = write_report(
            find_runs(args.paths),
            args.out,
            group_by=[k for arg in args.group_by for k in arg.split(",") if k],
            metrics=args.metrics,
            formats=FORMATS if args.format == "both" else (args.format,),
            not_started=find_not_started(args.paths),
            log_scale=args.log_scale,
        )
    except (CompareError, OSError) as e:
        print(f"fedjax-compare: error: {e}", file=sys.stderr)
        return 1
    print(*written, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
