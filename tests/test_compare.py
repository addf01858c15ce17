"""Tests of the run comparison report (fedjax_exp.experiment.compare) on synthetic job dirs."""

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

from fedjax_exp.experiment import compare

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(
    job_dir: pathlib.Path,
    records: list[dict],
    config: dict | None = None,
    overrides: list[str] | None = None,
    status: dict | None = None,
    raw_tail: str = "",
) -> pathlib.Path:
    """Writes a job directory in the runner's layout."""
    job_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records) + raw_tail
    (job_dir / "metrics.jsonl").write_text(text)
    if config is not None:
        (job_dir / ".hydra").mkdir(exist_ok=True)
        (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides or []))
    if status is not None:
        (job_dir / "status.json").write_text(json.dumps(status))
    return job_dir


def base_config(lr: float, seed: int) -> dict:
    return {
        "seed": seed,
        "model": {"name": "logistic"},
        "optimizer": {"name": "adam", "learning_rate": lr},
        "trainer": {"num_steps": 20, "batch_size": 8},
    }


def history(accs: list[float], losses: list[float], final_acc: float) -> list[dict]:
    records = []
    for i, (acc, loss) in enumerate(zip(accs, losses, strict=True)):
        step = (i + 1) * 10
        records.append({"step": step, "time": 0.1 * step, "train/loss": loss})
        records.append({"step": step, "time": 0.1 * step, "eval/test/accuracy": acc})
    records.append({"step": 10 * len(accs), "time": 9.0, "final/test/accuracy": final_acc})
    return records


@pytest.fixture
def sweep(tmp_path: pathlib.Path) -> pathlib.Path:
    """A 4-job sweep over lr in {0.1, 0.01} x seed in {0, 1}, job 3 failed."""
    root = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    (root).mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    specs = [
        (0.1, 0, [0.5, 0.7], [2.0, 1.0], 0.75),
        (0.1, 1, [0.4, 0.9], [2.5, 0.5], 0.85),
        (0.01, 0, [0.2, 0.3], [3.0, 2.9], 0.35),
    ]
    for num, (lr, seed, accs, losses, final) in enumerate(specs):
        make_job(
            root / str(num),
            history(accs, losses, final),
            base_config(lr, seed),
            [f"optimizer.learning_rate={lr}", f"seed={seed}"],
            {"status": "completed", "step": 20, "error": None, "final": {}},
        )
    make_job(
        root / "3",
        [{"step": 10, "time": 1.0, "train/loss": "nan"}],
        base_config(0.01, 1),
        ["optimizer.learning_rate=0.01", "seed=1"],
        {"status": "failed", "step": 10, "error": "loss is nan at step 10", "final": {}},
    )
    return root


def test_find_runs_discovers_jobs_recursively_in_natural_order(tmp_path):
    root = tmp_path / "sweep"
    for num in (10, 2, 0):
        make_job(root / str(num), [{"step": 1, "train/loss": 1.0}])
    make_job(root / "nested" / "deeper" / "job", [{"step": 1, "train/loss": 1.0}])
    (root / "not_a_run").mkdir()
    runs = compare.find_runs([root])
    assert [r.name for r in runs] == ["sweep/0", "sweep/2", "sweep/10", "sweep/nested/deeper/job"]
    # The same run given twice (as the sweep and as the job) is listed once.
    assert len(compare.find_runs([root, root / "2"])) == 4


def test_single_job_dir_is_named_after_itself(tmp_path):
    job = make_job(tmp_path / "12-34-56", [{"step": 1, "train/loss": 1.0}])
    (run,) = compare.find_runs([job])
    assert run.name == "12-34-56"
    assert run.status == "incomplete"
    assert run.config == {} and run.overrides == []


def test_read_metrics_resumed_run_keeps_last_value_and_skips_partial_tail(tmp_path):
    job = make_job(
        tmp_path / "job",
        [
            {"step": 1, "time": 0.1, "train/loss": 3.0},
            {"step": 2, "time": 0.2, "train/loss": 2.0, "note": "text", "flag": True},
            # Resumed from step 1: step 2 is logged again with a new value.
            {"step": 2, "time": 0.3, "train/loss": 1.5},
            {"step": 3, "time": 0.4, "train/loss": 1.0},
            {"step": 4, "time": 0.5, "train/loss": "inf", "eval/loss": "-inf"},
            {"step": 5, "time": 0.6, "train/loss": "NaN"},
        ],
        raw_tail='{"step": 6, "train/lo',
    )
    metrics = compare.read_metrics(job / "metrics.jsonl")
    assert metrics.keys() == {"train/loss", "eval/loss"}
    assert [metrics["train/loss"][s] for s in (1, 2, 3, 4)] == [3.0, 1.5, 1.0, math.inf]
    assert math.isnan(metrics["train/loss"][5])
    assert metrics["eval/loss"] == {4: -math.inf}


def test_read_metrics_rejects_malformed_line_with_location(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\nnot json\n{"step": 2, "a": 2}\n')
    with pytest.raises(compare.CompareError, match=re.escape(f"{path}:2: not a JSON object")):
        compare.read_metrics(path)
    path.write_text('{"time": 1.0, "a": 1}\n{"step": 2}\n')
    with pytest.raises(compare.CompareError, match='needs an integer "step"'):
        compare.read_metrics(path)


def test_status_final_and_logged_final_metrics(tmp_path):
    job = make_job(
        tmp_path / "job",
        [{"step": 5, "final/test/loss": 0.25, "final/test/accuracy": 0.5}],
        status={
            "status": "completed",
            "step": 5,
            "error": None,
            "final": {"test/accuracy": 0.875, "final/test/num": 128},
        },
    )
    run = compare.load_run(job)
    # The status file wins over the metrics file; keys are namespaced under final/.
    assert run.final == {
        "final/test/accuracy": 0.875,
        "final/test/num": 128.0,
        "final/test/loss": 0.25,
    }
    assert run.history == {}
    assert run.last_step == 5


def test_summarize_last_and_best_by_metric_direction(sweep):
    run = compare.load_run(sweep / "1")
    metrics = ["eval/test/accuracy", "final/test/accuracy", "train/loss"]
    assert compare.summarize(run, metrics) == {
        "eval/test/accuracy (last)": 0.9,
        "eval/test/accuracy (best)": 0.9,
        "final/test/accuracy": 0.85,
        "train/loss (last)": 0.5,
        "train/loss (best)": 0.5,
    }
    run0 = compare.load_run(sweep / "0")
    assert run0.series("eval/test/accuracy") == ([10, 20], [0.5, 0.7])
    failed = compare.load_run(sweep / "3")
    # NaN is never "best"; a metric never logged is None.
    assert compare.summarize(failed, metrics) == {
        "eval/test/accuracy (last)": None,
        "eval/test/accuracy (best)": None,
        "final/test/accuracy": None,
        "train/loss (last)": pytest.approx(float("nan"), nan_ok=True),
        "train/loss (best)": None,
    }
    assert compare.best_value([0.3, 0.9, 0.5], "eval/test/accuracy") == 0.9
    assert compare.best_value([0.3, 0.9, 0.5], "eval/test/loss") == 0.3
    assert compare.best_value([0.3, 0.9, 0.5], "eval/test/error_rate") == 0.3


def test_differing_keys_and_group_stats(sweep):
    runs = compare.find_runs([sweep])
    assert compare.differing_keys(runs) == ["optimizer.learning_rate", "seed"]
    groups = compare.group_runs(runs, ["optimizer.learning_rate"])
    # Groups in ascending order of the value (the sweep ran 0.1 first).
    assert [(k, [r.name for r in v]) for k, v in groups.items()] == [
        (("0.01",), ["12-00-00/2", "12-00-00/3"]),
        (("0.1",), ["12-00-00/0", "12-00-00/1"]),
    ]
    table = compare.grouped_table(groups, ["optimizer.learning_rate"], ["final/test/accuracy"])
    assert table.header == ["optimizer.learning_rate", "runs", "failed", "final/test/accuracy"]
    # (0.75 + 0.85) / 2 = 0.8, population std 0.05; the failed run has no final metric.
    assert table.rows == [["0.01", "2", "1", "0.35 ± 0 (n=1)"], ["0.1", "2", "0", "0.8 ± 0.05"]]
    assert compare.mean_std([1.0, None, float("nan"), 3.0]) == (2.0, 1.0, 2)
    assert compare.mean_std([None]) is None


def test_group_by_unknown_key_names_the_keys_that_differ(sweep):
    runs = compare.find_runs([sweep])
    with pytest.raises(compare.CompareError, match="not a config key.*learning_rate, seed"):
        compare.group_runs(runs, ["optimizer.lr"])


def test_interpolations_resolved_where_possible(tmp_path):
    job = make_job(tmp_path / "job", [{"step": 1, "a": 1.0}])
    (job / ".hydra").mkdir()
    (job / ".hydra" / "config.yaml").write_text(
        "lr: 0.5\noptimizer:\n  learning_rate: ${lr}\nout: ${hydra:runtime.output_dir}\n"
        "layers: [4, 8]\n"
    )
    config, overrides = compare.read_config(job)
    assert config == {
        "lr": 0.5,
        "optimizer.learning_rate": 0.5,
        "out": "${hydra:runtime.output_dir}",
        "layers": [4, 8],
    }
    assert overrides == []


def test_runs_table_marks_failed_and_shows_only_differing_config(sweep):
    runs = compare.find_runs([sweep])
    table = compare.runs_table(runs, ["final/test/accuracy"])
    assert table.header == [
        "run",
        "status",
        "step",
        "optimizer.learning_rate",
        "seed",
        "overrides",
        "final/test/accuracy",
    ]
    assert table.rows[0] == [
        "12-00-00/0",
        "completed",
        "20",
        "0.1",
        "0",
        "optimizer.learning_rate=0.1 seed=0",
        "0.75",
    ]
    assert table.rows[3][1] == "failed: loss is nan at step 10"
    assert table.failed == [False, False, False, True]


def test_write_report_markdown_and_html(sweep, tmp_path):
    runs = compare.find_runs([sweep])
    out = tmp_path / "report"
    written = compare.write_report(runs, out, group_by=["optimizer.learning_rate"])
    assert written == [out / "report.md", out / "report.html"]
    plots = sorted(p.name for p in (out / "plots").iterdir())
    # Default metrics: eval/*, final/* (table only) and train/loss.
    assert plots == ["eval_test_accuracy.png", "train_loss.png"]
    for name in plots:
        assert (out / "plots" / name).read_bytes().startswith(PNG_MAGIC)

    md = (out / "report.md").read_text()
    assert "4 run(s): 3 completed, 1 failed, 0 without a status file" in md
    assert "## Grouped by optimizer.learning_rate (mean ± std)" in md
    # Seeds 0 and 1 at lr 0.1: last accuracy 0.7, 0.9; final 0.75, 0.85; last loss 1.0, 0.5.
    assert "| 0.1 | 2 | 0 | 0.8 ± 0.1 | 0.8 ± 0.1 | 0.8 ± 0.05 | 0.75 ± 0.25 | 0.75 ± 0.25 |" in md
    assert "| **12-00-00/3** ✗ | failed: loss is nan at step 10 |" in md
    assert "![train/loss](plots/train_loss.png)" in md
    assert "trainer.num_steps" not in md  # the same in every run

    page = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2
    assert base64.b64decode(images[0]).startswith(PNG_MAGIC)
    assert page.count('<tr class="failed">') == 1
    assert "plots/" not in page  # self-contained


def test_write_report_metric_selection_and_format(sweep, tmp_path):
    runs = compare.find_runs([sweep])
    out = tmp_path / "r"
    written = compare.write_report(runs, out, metrics=["train/*"], formats=["md"])
    assert written == [out / "report.md"]
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["train_loss.png"]
    md = (out / "report.md").read_text()
    assert "train/loss (best)" in md and "accuracy" not in md
    with pytest.raises(compare.CompareError, match="matches none of the logged metrics"):
        compare.write_report(runs, out, metrics=["nope/*"])
    with pytest.raises(compare.CompareError, match="unknown report format"):
        compare.write_report(runs, out, formats=["pdf"])


def test_main_writes_report_and_prints_paths(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    code = compare.main([str(sweep), "--out", str(out), "--format", "html", "--group-by", "seed"])
    assert code == 0
    assert capsys.readouterr().out.split() == [str(out / "report.html")]
    assert "Grouped by seed" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("empty", "no runs found under"),
        ("missing", "does not exist"),
        ("bad_json", "metrics.jsonl:1: not a JSON object"),
        ("bad_status", "status.json"),
    ],
)
def test_main_errors_are_one_line_and_nonzero(tmp_path, capsys, setup, message):
    target = tmp_path / "runs"
    target.mkdir()
    if setup == "missing":
        target = tmp_path / "absent"
    elif setup == "bad_json":
        (target / "metrics.jsonl").write_text('oops\n{"step": 1}\n')
    elif setup == "bad_status":
        make_job(target, [{"step": 1, "a": 1.0}])
        (target / "status.json").write_text("{broken")
    code = compare.main([str(target), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("fedjax-compare: error: ")
    assert message in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_script_wrapper_help_mentions_wandb_sync(repo_root):
    proc = subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "compare_runs.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "wandb sync <job dir>/wandb/offline-run-*" in proc.stdout
    assert "--group-by" in proc.stdout


def test_nan_values_plot_without_error(tmp_path):
    job = make_job(
        tmp_path / "j",
        [{"step": s, "train/loss": v} for s, v in [(1, 2.0), (2, math.nan), (3, math.inf)]],
    )
    runs = compare.find_runs([job])
    assert compare.plot_metric(runs, "train/loss", tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)
    assert not compare.plot_metric(runs, "eval/test/accuracy", tmp_path / "q.png")
    assert not (tmp_path / "q.png").exists()


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    header = path.read_bytes()[16:24]  # The IHDR chunk: width, height.
    return int.from_bytes(header[:4], "big"), int.from_bytes(header[4:], "big")


def test_many_runs_plot_a_legend_beside_the_axes_then_none(tmp_path):
    import warnings

    runs = compare.find_runs(
        [
            make_job(tmp_path / f"j{i}", [{"step": s, "train/loss": i + 1 / s} for s in (1, 2)])
            for i in range(45)
        ]
    )
    sizes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # E.g. matplotlib's "Tight layout not applied".
        for n in (3, 15, 45):
            path = tmp_path / f"plot{n}.png"
            assert compare.plot_metric(runs[:n], "train/loss", path)
            sizes[n] = _png_size(path)
    # 15 runs: the legend goes beside the axes, widening the image; 45: no legend at all.
    assert sizes[15][0] > sizes[3][0]
    assert sizes[45][0] <= sizes[3][0] + 10
