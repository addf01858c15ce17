"""The run comparison report (fedjax_exp.compare) on synthetic run dirs."""

from __future__ import annotations

import base64
import json
import math
import pathlib
import re
import subprocess
import sys

import pytest
import yaml

from fedjax_exp import compare
from fedjax_exp.experiment import run_record

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(
    job_dir: pathlib.Path,
    records: list[dict],
    config: dict | None = None,
    overrides: list[str] | None = None,
    status: dict | None = None,
    raw_tail: str = "",
    choices: dict | None = None,
) -> pathlib.Path:
    """Writes a run dir in the runner's layout (and Hydra's choices when given)."""
    job_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + raw_tail
    (job_dir / "metrics.jsonl").write_text(text)
    if config is not None:
        run_record.write(job_dir, config, overrides or [])
    if choices is not None:
        (job_dir / ".hydra").mkdir(exist_ok=True)
        hydra = {"hydra": {"runtime": {"choices": {**choices, "hydra/launcher": "basic"}}}}
        (job_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if status is not None:
        (job_dir / "status.json").write_text(json.dumps(status))
    return job_dir


def base_config(lr: float, seed: int) -> dict:
    return {
        "seed": seed,
        "model": {"name": "logistic"},
        "optimizer": {"_target_": "adam", "learning_rate": lr},
        "trainer": {"steps": 20, "batch_size": 8},
    }


def history(accs: list[float], losses: list[float], final_acc: float) -> list[dict]:
    records = []
    for i, (acc, loss) in enumerate(zip(accs, losses, strict=True)):
        step = (i + 1) * 10
        records.append({"step": step, "time": 0.1 * step, "train/loss": loss})
        records.append({"step": step, "time": 0.1 * step, "eval/test/accuracy": acc})
    records.append({"step": 10 * len(accs), "time": 9.0, "final/test/accuracy": final_acc})
    return records


COMPLETED = {"status": "completed", "step": 20, "error": None, "final": {}}


@pytest.fixture
def sweep(tmp_path: pathlib.Path) -> pathlib.Path:
    """A 4-job sweep over lr in {0.1, 0.01} x seed in {0, 1}; job 3 diverged (nulls)."""
    root = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    specs = [
        (0.1, 0, [0.5, 0.7], [2.0, 1.0], 0.75),
        (0.1, 1, [0.9, 0.8], [2.5, 0.5], 0.85),
        (0.01, 0, [0.2, 0.3], [3.0, 2.9], 0.35),
    ]
    for num, (lr, seed, accs, losses, final) in enumerate(specs):
        overrides = ["model=logistic", f"optimizer.learning_rate={lr}", f"seed={seed}"]
        make_job(root / str(num), history(accs, losses, final), base_config(lr, seed), overrides)
        (root / str(num) / "status.json").write_text(json.dumps(COMPLETED))
    make_job(
        root / "3",
        # How the writers record a non-finite loss: null.
        [{"step": 10, "time": 1.0, "train/loss": None}],
        base_config(0.01, 1),
        ["model=logistic", "optimizer.learning_rate=0.01", "seed=1"],
        {"status": "failed", "step": 10, "error": "loss is nan at step 10", "final": {}},
    )
    return root


def test_a_diverged_run_keeps_its_non_finite_values(sweep, tmp_path):
    # The writers store NaN/inf as null; the report must show them, not drop the run's metric.
    diverged = compare.load_run(sweep / "3")
    assert list(diverged.history) == ["train/loss"]
    assert math.isnan(diverged.history["train/loss"][10])
    runs = compare.find_runs([sweep])
    table = compare.runs_table(runs, ["train/loss"])
    row = table[table["dir"] == "12-00-00/3"].iloc[0]
    assert row["train/loss"] == "nan" and row["status"] == "failed: loss is nan at step 10"
    fig = compare.figure(runs, "train/loss")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "optimizer.learning_rate=0.01 seed=1 [failed]" in labels


def test_find_runs_discovers_jobs_recursively_in_natural_order(tmp_path):
    root = tmp_path / "sweep"
    for num in (10, 2, 0):
        make_job(root / str(num), [{"step": 1, "train/loss": 1.0}])
    make_job(root / "nested" / "deeper" / "job", [{"step": 1, "train/loss": 1.0}])
    (root / "not_a_run").mkdir()
    runs = compare.find_runs([root])
    assert [r.name for r in runs] == ["sweep/0", "sweep/2", "sweep/10", "sweep/nested/deeper/job"]
    # Without overrides a run is labelled by its path.
    assert [r.label for r in runs] == [r.name for r in runs]
    # The same run given twice (as the sweep and as the job) is listed once.
    assert len(compare.find_runs([root, root / "2"])) == 4


def test_resumed_run_keeps_the_last_value_and_skips_a_partial_tail(tmp_path):
    job = make_job(
        tmp_path / "job",
        [
            {"step": 1, "time": 0.1, "train/loss": 3.0},
            {"step": 2, "time": 0.2, "train/loss": 2.0, "note": "text", "flag": True},
            {"step": 2, "time": 0.3, "train/loss": 1.5},  # Resumed from step 1.
            {"step": 3, "time": 0.4, "train/loss": None, "eval/loss": 0.5},
        ],
        raw_tail='{"step": 4, "train/lo',
    )
    history = compare.read_history(job / "metrics.jsonl")
    assert history.keys() == {"train/loss", "eval/loss"}
    assert [history["train/loss"][s] for s in (1, 2)] == [3.0, 1.5]
    assert math.isnan(history["train/loss"][3]) and history["eval/loss"] == {3: 0.5}


def test_final_metrics_are_the_last_logged_final_values(tmp_path):
    job = make_job(
        tmp_path / "job",
        [
            {"step": 5, "final/test/loss": 0.25, "final/test/accuracy": None},
            {"step": 5, "final/test/loss": 0.5},  # Written again by a resumed run.
        ],
        status={"status": "completed", "step": 5, "error": None, "final": {}},
    )
    run = compare.load_run(job)
    assert run.final.keys() == {"final/test/loss", "final/test/accuracy"}
    assert run.final["final/test/loss"] == 0.5 and math.isnan(run.final["final/test/accuracy"])
    assert run.status == "completed" and run.last_step == 5


def test_jobs_that_never_started_are_listed_with_their_logged_error(sweep, tmp_path):
    # A rejected job has Hydra's run.log but no metrics (nor .hydra/: the runner writes that
    # only once a run is accepted).
    rejected = sweep / "4"
    rejected.mkdir()
    (rejected / "run.log").write_text(
        "[2024-01-01 12:00:00,000][fedjax_exp][ERROR] - config error: seed must be an integer\n"
    )
    assert compare.find_not_started([sweep]) == [
        ("12-00-00/4", "config error: seed must be an integer")
    ]
    compare.write_report(
        compare.find_runs([sweep]),
        tmp_path / "out",
        formats=["md"],
        not_started=compare.find_not_started([sweep]),
    )
    md = (tmp_path / "out" / "report.md").read_text()
    assert "1 job(s) never started (rejected, or starting): 12-00-00/4 (config error: " in md


def test_runs_are_labelled_by_the_overrides_that_differ(sweep):
    runs = compare.find_runs([sweep])
    # model=logistic is in every run's overrides: left out of the labels.
    assert [r.label for r in runs] == [
        "optimizer.learning_rate=0.1 seed=0",
        "optimizer.learning_rate=0.1 seed=1",
        "optimizer.learning_rate=0.01 seed=0",
        "optimizer.learning_rate=0.01 seed=1",
    ]


def test_runs_table_is_narrow_numerically_sorted_and_marks_failures(sweep):
    runs = compare.find_runs([sweep])
    table = compare.runs_table(runs, ["eval/test/accuracy", "train/loss", "final/test/accuracy"])
    # A "(best)" column only where some run's best differs from its last value (accuracy).
    assert list(table.columns) == [
        "run",
        "dir",
        "status",
        "step",
        "eval/test/accuracy",
        "eval/test/accuracy (best)",
        "train/loss",
        "final/test/accuracy",
    ]
    # Sorted by learning rate as a number (0.01 < 0.1), then seed; failed runs marked.
    assert table["run"].tolist() == [
        "optimizer.learning_rate=0.01 seed=0",
        "optimizer.learning_rate=0.01 seed=1 ✗",
        "optimizer.learning_rate=0.1 seed=0",
        "optimizer.learning_rate=0.1 seed=1",
    ]
    assert table.iloc[1, 4:].tolist() == ["—", "—", "nan", "—"]
    assert table.iloc[3, 4:].tolist() == ["0.8", "0.9", "0.5", "0.85"]


def test_best_value_by_metric_direction():
    assert compare.best_value([0.3, 0.9, math.nan], "eval/test/accuracy") == 0.9
    assert compare.best_value([0.3, 0.9, 0.5], "eval/test/loss") == 0.3
    assert compare.best_value([0.3, 0.9, 0.5], "eval/test/error_rate") == 0.3
    assert compare.best_value([math.nan], "train/loss") is None


def test_seeds_are_aggregated_when_runs_differ_only_by_seed(sweep):
    runs = compare.find_runs([sweep])
    assert compare.differing_keys(runs) == ["optimizer.learning_rate", "seed"]
    keys = compare.grouping_keys(runs, [])
    assert keys == ["optimizer.learning_rate"]
    groups = compare.group_runs(runs, keys)
    table = compare.grouped_table(groups, keys, ["final/test/accuracy", "train/loss"])
    assert list(table.columns) == [
        "optimizer.learning_rate",
        "runs",
        "failed",
        "final/test/accuracy",
        "train/loss",
    ]
    # 0.01: one finite value of two runs, shown without "± 0"; 0.1: (0.75 + 0.85) / 2 = 0.8,
    # population std 0.05.
    assert table.values.tolist() == [
        ["0.01", "2", "1", "0.35 (n=1)", "2.9 (n=1)"],
        ["0.1", "2", "0", "0.8 ± 0.05", "0.75 ± 0.25"],
    ]
    # Runs that differ in more than the seed, each its own group: nothing to aggregate.
    assert compare.grouping_keys([runs[0], runs[3]], []) is None
    assert compare.grouping_keys(runs[:1] + runs[2:3], []) is None


def test_runs_that_differ_only_by_seed_form_one_group(sweep, tmp_path):
    same = [r for r in compare.find_runs([sweep]) if r.config["optimizer.learning_rate"] == 0.1]
    assert compare.grouping_keys(same, []) == []
    compare.write_report(same, tmp_path / "out", formats=["md"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Seeds aggregated (mean ± std)" in md
    assert "| runs of | runs | failed | eval/test/accuracy |" in md
    assert "| all | 2 | 0 | 0.75 ± 0.05 | 0.8 ± 0.1 | 0.8 ± 0.05 | 0.75 ± 0.25 |" in md


def test_group_by_a_config_group_choice(tmp_path):
    root = tmp_path / "sweep"
    for num, (opt, seed, acc) in enumerate([("sgd", 0, 0.5), ("adam", 0, 0.7), ("sgd", 1, 0.6)]):
        make_job(
            root / str(num),
            [{"step": 1, "final/test/accuracy": acc}],
            {"seed": seed, "optimizer": {"_target_": opt, "learning_rate": 0.1}},
            [f"seed={seed}"] + (["optimizer=adam"] if opt == "adam" else []),
            choices={"optimizer": opt, "model": "logistic"},
        )
    runs = compare.find_runs([root])
    assert runs[0].config["optimizer"] == "sgd" and runs[0].config["model"] == "logistic"
    assert "hydra/launcher" not in runs[0].config
    groups = compare.group_runs(runs, compare.grouping_keys(runs, ["optimizer"]))
    table = compare.grouped_table(groups, ["optimizer"], ["final/test/accuracy"])
    assert table.values.tolist() == [["adam", "1", "0", "0.7"], ["sgd", "2", "0", "0.55 ± 0.05"]]
    with pytest.raises(compare.CompareError, match="neither a config key nor a config group"):
        compare.grouping_keys(runs, ["optimizer.lr"])


def test_choices_fall_back_to_group_overrides(tmp_path):
    job = make_job(tmp_path / "j", [{"step": 1}], {"seed": 0}, ["optimizer=sgd", "seed=0"])
    assert compare.load_run(job).config == {"seed": 0, "optimizer": "sgd"}


def test_legend_sits_beside_the_axes_and_log_scale(sweep):
    runs = compare.find_runs([sweep])
    fig = compare.figure(runs, "train/loss", log_scale=True)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    renderer = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 > ax.get_window_extent(renderer).x1
    assert compare.figure(runs, "train/loss").axes[0].get_yscale() == "linear"
    assert compare.png(fig).startswith(PNG_MAGIC)
    assert compare.figure(runs, "eval/test/missing") is None


def test_grouped_plot_draws_one_band_per_group(sweep):
    runs = compare.find_runs([sweep])
    groups = compare.group_runs(runs, ["optimizer.learning_rate"])
    fig = compare.figure(runs, "eval/test/accuracy", groups, "lr")
    (line,) = [ln for ln in fig.axes[0].get_lines() if ln.get_label().startswith("lr=0.1 ")]
    assert line.get_label() == "lr=0.1 (n=2)"
    assert line.get_xydata().tolist() == [[10, 0.7], [20, 0.75]]


def test_many_runs_plot_without_a_legend(tmp_path):
    runs = compare.find_runs(
        [make_job(tmp_path / f"j{i}", [{"step": 1, "train/loss": i}]) for i in range(45)]
    )
    assert compare.figure(runs[:40], "train/loss").axes[0].get_legend() is not None
    many = compare.figure(runs, "train/loss").axes[0]
    assert many.get_legend() is None and "45 runs" in many.get_title()


def test_write_report_markdown_and_html(sweep, tmp_path):
    runs = compare.find_runs([sweep])
    out = tmp_path / "report"
    written = compare.write_report(runs, out)
    assert written == [out / "report.md", out / "report.html"]
    plots = sorted(p.name for p in (out / "plots").iterdir())
    # Default metrics: eval/*, final/* (table only) and train/loss.
    assert plots == ["eval_test_accuracy.png", "train_loss.png"]
    md = (out / "report.md").read_text()
    assert "4 run(s): 3 completed, 1 failed, 0 without a status file" in md
    assert "## Seeds aggregated (mean ± std)" in md
    assert "| 0.1 | 2 | 0 | 0.75 ± 0.05 | 0.8 ± 0.1 | 0.8 ± 0.05 | 0.75 ± 0.25 |" in md
    assert "| optimizer.learning_rate=0.01 seed=1 ✗ | 12-00-00/3 | failed: loss is nan" in md
    assert "![train/loss](plots/train_loss.png)" in md
    assert "trainer.steps" not in md  # the same in every run
    page = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and base64.b64decode(images[0]).startswith(PNG_MAGIC)
    assert "<td>optimizer.learning_rate=0.01 seed=1 ✗</td>" in page
    assert "plots/" not in page  # self-contained


def test_the_summary_counts_every_status(sweep, tmp_path):
    make_job(sweep / "4", [{"step": 3, "train/loss": 1.0}], status={"status": "interrupted"})
    make_job(sweep / "5", [{"step": 3, "train/loss": 1.0}])  # No status file: killed.
    compare.write_report(compare.find_runs([sweep]), tmp_path / "out", formats=["md"])
    md = (tmp_path / "out" / "report.md").read_text()
    assert "6 run(s): 3 completed, 1 failed, 1 interrupted, 1 without a status file" in md


def test_write_report_metric_selection_and_format(sweep, tmp_path):
    runs = compare.find_runs([sweep])
    out = tmp_path / "r"
    assert compare.write_report(runs, out, metrics=["train/*"], formats=["md"]) == [
        out / "report.md"
    ]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["train_loss.png"]
    assert "accuracy" not in (out / "report.md").read_text()
    with pytest.raises(compare.CompareError, match="matches none of the logged metrics"):
        compare.write_report(runs, out, metrics=["nope/*"])
    with pytest.raises(compare.CompareError, match="unknown report format"):
        compare.write_report(runs, out, formats=["pdf"])


def test_a_failed_report_leaves_no_output_dir(sweep, tmp_path, monkeypatch):
    runs = compare.find_runs([sweep])
    out = tmp_path / "out"
    with pytest.raises(compare.CompareError):
        compare.write_report(runs, out, group_by=["nope"])
    assert not out.exists()

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_bytes", full_disk)
    with pytest.raises(compare.CompareError, match="cannot write the report.*No space left"):
        compare.write_report(runs, out)
    assert not out.exists()


def test_main_writes_report_and_prints_paths(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(sweep), "--out", str(out), "--format", "html", "--group-by", "seed", "--log-scale"]
    assert compare.main(args) == 0
    assert capsys.readouterr().out.split() == [str(out / "report.html")]
    assert "Grouped by seed" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "no runs found under"),
        ("missing", "does not exist"),
        ("bad_json", "metrics.jsonl:1: not a JSON object"),
        ("no_step", 'metrics.jsonl:1: each record needs an integer "step"'),
        ("bad_status", "status.json"),
        ("bad_group", "--group-by nope is neither"),
    ],
)
def test_main_errors_are_one_line_and_nonzero(tmp_path, capsys, setup, message):
    target = tmp_path / "runs"
    target.mkdir()
    args = []
    if setup == "missing":
        target = tmp_path / "absent"
    elif setup == "bad_json":
        (target / "metrics.jsonl").write_text('oops\n{"step": 1}\n')
    elif setup == "no_step":
        (target / "metrics.jsonl").write_text('{"time": 1}\n{"step": 1}\n')
    elif setup == "bad_status":
        make_job(target, [{"step": 1, "a": 1.0}])
        (target / "status.json").write_text("{broken")
    elif setup == "bad_group":
        make_job(target, [{"step": 1, "a": 1.0}])
        args = ["--group-by", "nope"]
    code = compare.main([str(target), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("fedjax-compare: error: ")
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_script_wrapper_help_says_how_to_read_offline_runs(repo_root):
    proc = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "compare_runs.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wandb leet inspect --json <job dir>/wandb/offline-run-*/run-*.wandb" in proc.stdout
    assert "with an account" in proc.stdout and "--group-by" in proc.stdout
