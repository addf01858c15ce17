"""Machine and versions, the ratio table as text and Markdown, and the JSON record."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
import subprocess
from collections.abc import Sequence
from importlib import metadata
from typing import Any

PACKAGES = ("jax", "jaxlib", "numpy", "optax", "dm-haiku", "fedjax", "fedjax_exp", "h5py")
COLUMNS = ("section", "data", "case", "unit", "FedJAX", "fedjax_exp", "ratio", "goal", "note")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_revision(repo: pathlib.Path) -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return None
    return f"{rev}{' (uncommitted changes)' if dirty else ''}" if rev else None


def machine_info(repo: pathlib.Path | None = None) -> dict[str, Any]:
    """CPU, cores, load, backend and package versions: what a reader needs to weigh the
    figures (the load average shows how busy a shared machine was)."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    devices = jax.devices()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [f"{d.platform}:{getattr(d, 'device_kind', '?')}" for d in devices],
        "versions": versions,
        "git": _git_revision(repo) if repo else None,
        "load_average_start": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def finish_machine_info(info: dict[str, Any]) -> None:
    info["load_average_end"] = list(os.getloadavg())
    info["benchmark_process_max_rss_mib"] = (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def _cells(row: dict[str, Any]) -> list[str]:
    ratio = row.get("ratio")
    goal = row.get("goal")
    goal_cell = "-"
    if goal is not None:
        mark = {True: "met", False: "NOT met", None: "?"}[row.get("meets_goal")]
        goal_cell = f">= {goal:g}x {mark}"
    note = row.get("note") or ""
    if row.get("errors"):
        missing = "; ".join(f"{k}: {v}" for k, v in row["errors"].items())
        note = f"{note}; {missing}" if note else missing
    return [
        row["section"],
        row["dataset"],
        row["case"],
        row["unit"],
        _fmt(row.get("fedjax")),
        _fmt(row.get("fedjax_exp")),
        f"{ratio:.2f}x" if ratio is not None else "-",
        goal_cell,
        note,
    ]


def text_table(rows: Sequence[dict[str, Any]], note_width: int = 60) -> str:
    """A fixed-width table for the terminal (notes clipped to ``note_width``)."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    for c in cells[1:]:
        if len(c[-1]) > note_width:
            c[-1] = c[-1][: note_width - 3] + "..."
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    numeric = {4, 5, 6}
    lines = []
    for n, r in enumerate(cells):
        parts = [
            r[i].rjust(widths[i]) if i in numeric else r[i].ljust(widths[i])
            for i in range(len(COLUMNS))
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _machine_lines(info: dict[str, Any]) -> list[str]:
    v = info.get("versions", {})
    versions = ", ".join(f"{k} {v[k]}" for k in PACKAGES if v.get(k))
    return [
        f"CPU: {info.get('cpu')} ({info.get('cores')} cores, "
        f"{info.get('cores_available')} available); backend {info.get('backend')} "
        f"{info.get('devices')}",
        f"Python {info.get('python')}; {versions}",
        f"load average at start {_loads(info.get('load_average_start'))}, "
        f"at end {_loads(info.get('load_average_end'))}; git {info.get('git')}; "
        f"{info.get('date')}",
    ]


def _loads(values: Any) -> str:
    return "/".join(f"{x:.2f}" for x in values) if values else "?"


def print_report(result: dict[str, Any]) -> str:
    """The text shown on the terminal: machine, versions, the table."""
    lines = _machine_lines(result["machine"])
    lines += ["ratio = how many times better fedjax_exp is (rates: ours/FedJAX; times, memory:"]
    lines += ["FedJAX/ours). Rates: median of repeated timed windows after warm-up."]
    lines += ["", text_table(result["rows"])]
    if result.get("missing"):
        lines += ["", "fedjax_exp pieces that failed or are missing:"]
        lines += [f"  - {m}" for m in result["missing"]]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The Markdown page written by ``--markdown`` (docs/benchmarks.md)."""
    s = result["settings"]
    out = [
        "# Benchmarks: fedjax_exp against FedJAX 0.0.17",
        "",
        "Generated by `scripts/benchmark.py`; rerun the command below to refresh this page.",
        "",
        "```",
        result["command"],
        "```",
        "",
        "## Machine",
        "",
        *[f"- {line}" for line in _machine_lines(result["machine"])],
        "",
        "## Results",
        "",
        "ratio = how many times better fedjax_exp is: fedjax_exp/FedJAX for rates,",
        "FedJAX/fedjax_exp for wall time and memory. Goals are the issue's (2-core CPU).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] * 4 + ["---:"] * 3 + ["---"] * 2) + "|",
    ]
    for row in result["rows"]:
        out.append("| " + " | ".join(c.replace("|", "/") for c in _cells(row)) + " |")
    out += [
        "",
        "## Method",
        "",
        f"- Datasets: {', '.join(d['name'] + ' (' + format(d['clients'], ',') + ' clients, ' + format(d['examples'], ',') + ' examples)' for d in result['datasets'])}."  # noqa: E501
        " Both libraries get the same arrays (`x = 1 - pixels[..., None]`, `y = label`).",
        f"- Data: each timed window draws {s['stream_batches']} batches (shuffled: at least "
        f"{s.get('stream_examples', 0):,} examples, so that a window holds epoch boundaries "
        "in proportion); shuffled streams continue one iterator after a warm-up, padded "
        "passes start fresh each window (creation included). Client buffer 16, example "
        "buffer 1024, seed 0.",
        f"- evaluate_model: padded batches of 128 materialised first (at most "
        f"{s['eval_max_batches']}), one untimed call to compile, then timed calls; the same "
        "metrics (accuracy, cross-entropy) on both sides.",
        f"- Training: {s['steps'] or 'per-model default'} steps per run (see each row's "
        "`steps` in the JSON), Adam 1e-3; each side runs in a fresh process of its own "
        f"(`bench.train_side`), as its users run it. Seed 0 is timed: the first "
        f"{s['warmup_steps']} steps (compilation; fedjax_exp's up to the next "
        "`trainer.log_every` boundary, so that every block length its loop dispatches has "
        "compiled) are not timed; the rest are split into "
        f"{s['windows']} windows ending in a device sync; the rate is the median window. "
        "FedJAX: the seed chapter's `jax.jit` step over "
        "`shuffle_repeat_batch_federated_data`. fedjax_exp: the model, loss, optimizer and "
        "algorithm `python run.py` builds, with the speed settings it resolves, driven by "
        "`fedjax_exp.experiment.loop.train` (logging every `trainer.log_every` steps). "
        "Accuracy: the first 16 padded test batches of 128, the mean over seeds "
        f"0..{s.get('accuracy_seeds', 1) - 1} per side; 'within noise' = the means differ by "
        "at most 3 standard errors, from the seed-to-seed spread (different initial keys and "
        "shuffles; the runner derives its init key with `split(PRNGKey(seed))`, the seed "
        "chapter uses `PRNGKey(seed)`), and never less than the evaluation's binomial noise.",
        "- Federated (`fed`): FedAvg with FedJAX's `experiments/fed_avg` EMNIST settings (10 "
        "clients per round, batch 10, one epoch; logistic: client SGD 10^-0.5, server Adagrad "
        "1.0 eps 1e-7; Haiku CNN: client SGD 0.001, server Adam 1.0 b1 0.9 b2 0.99 eps 0.01). "
        "FedJAX: `fedjax.algorithms.fed_avg.federated_averaging` with "
        "`UniformGetClientSampler` (sampler seed 2 + s, params seed 1 + s, as `run_fed_avg.py`), "
        "one `apply` per round. fedjax_exp: `python run.py experiment=fedavg_emnist_*`'s "
        "algorithm driven by the experiment loop with `seed` = 2 + s, so both sides draw the "
        "same clients each round (`bench.fed_side`), and the library port with the `jit` and "
        "`parallel` backends for reference. Each side in a fresh process; the first rounds "
        "(compilation) are not timed; rates are the median of timed windows of rounds. "
        "Accuracy: the whole test set after the last round, mean over seeds; 'within noise' "
        "pools the seed-to-seed spread (which clients are drawn) and never goes below the "
        "evaluation's binomial noise.",
        "- End to end: wall time and the child's peak RSS (`wait4`) of each process, from "
        "start-up to the final evaluation.",
        f"- Data and evaluation measurements are repeated {s['repeats']} times in one "
        "process (FedJAX and fedjax_exp "
        "alternating) and the median is reported. A load average above the core count means "
        "other processes shared the CPU: then the ratios, measured side by side, are more "
        "trustworthy than the absolute rates.",
        "",
    ]
    if result.get("missing"):
        out += ["## Not measured", ""] + [f"- {m}" for m in result["missing"]] + [""]
    return "\n".join(out)


def write_json(result: dict[str, Any], path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
