"""End-to-end `python run.py ...` runs in a subprocess: exit codes, files, error lines."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess

import pytest
from helpers import TINY_RUN, run_py


def run_cli(*overrides: str, run_dir: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return run_py([*overrides, f"hydra.run.dir={run_dir}"])


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cnn_with_hinge_loss_trains_and_writes_metrics(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("model=cnn", "loss=hinge", *TINY_RUN, run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
    assert [r["step"] for r in records if "eval/test/accuracy" in r] == [2, 4]
    final = [r for r in records if "final/test/accuracy" in r]
    assert len(final) == 1 and final[0]["step"] == 4
    assert set(final[0]) >= {"final/test/accuracy", "final/test/loss", "time", "step"}
    assert 0.0 <= final[0]["final/test/accuracy"] <= 1.0
    # The hinge loss is >= 0 (its values: test_losses.py).
    assert all(r["train/loss"] >= 0 for r in records if "train/loss" in r)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 4 and status["error"] is None
    assert status["final"]["final/test/accuracy"] == final[0]["final/test/accuracy"]
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "model=cnn" in overrides and "loss=hinge" in overrides
    # Saved at steps 2 and 4; only the latest is kept by default (keep_checkpoints: 1).
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    # The run's log says what was trained, each evaluation, and what it reached.
    log = (run_dir / "run.log").read_text().splitlines()
    assert len(log) == 4, log
    evaluated = [r for r in records if "eval/test/accuracy" in r][1]
    shown = ", ".join(f"{k[5:]}={v:.4g}" for k, v in evaluated.items() if k.startswith("eval/"))
    assert log[2].endswith(f" - eval at step 4: {shown}"), log[2]
    assert "training model=cnn loss=hinge optimizer=adam dataset=sample" in log[0]
    assert "seed=0: steps 1-4, batch 8; cpu backend" in log[0]
    expected_end = (
        f"finished step 4 after [0-9.]+ s of training: "
        f"final/test/accuracy={final[0]['final/test/accuracy']:.4g}, "
        f"final/test/loss={final[0]['final/test/loss']:.4g}$"
    )
    assert re.search(expected_end, log[3]), log[3]


def _assert_one_line_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    first = lines[0]
    for needle in needles:
        assert needle in first, proc.stderr
    return first


def _assert_nothing_written(run_dir: pathlib.Path) -> None:
    # Not even Hydra's .hydra/ and run.log: the rejected run's fresh dir is removed.
    assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))


def test_a_rejected_run_in_an_existing_dir_leaves_its_files(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    proc = run_cli(*TINY_RUN, "trainer.steps=-1", run_dir=run_dir)
    assert proc.returncode == 2
    assert (run_dir / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["optimizer.learning_rate=0"], ["optimizer.learning_rate", "positive", "0"]),
        (["optimizer=sgd", "optimizer.learning_rate=-0.1"], ["optimizer.learning_rate"]),
        (["trainer.batch_size=0"], ["trainer.batch_size", "positive integer", "0"]),
        (["trainer.steps=-1"], ["trainer.steps", "-1"]),
        (
            ["dataset=files", "dataset.loader.train_path=/nope/a.h5", "dataset.loader.test_path=x"],
            ["dataset.loader.train_path", "/nope/a.h5", "does not exist"],
        ),
        (["model._target_=no_such_pkg.make_model"], ["model._target_", "no_such_pkg"]),
        (["dataset=files"], ["dataset.loader.train_path", "required"]),
    ],
    ids=["lr0", "lr-neg", "batch0", "steps-neg", "missing-path", "bad-target", "unset-path"],
)
def test_bad_config_values_fail_in_one_line(tmp_path, overrides, needles):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY_RUN, *overrides, run_dir=run_dir)
    first = _assert_one_line_failure(proc, *needles)
    assert first.startswith("error: ")
    assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    assert proc.returncode == 2
    _assert_nothing_written(run_dir)


def test_unknown_group_option_fails_clearly(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY_RUN, "model=no_such_model", run_dir=run_dir)
    _assert_one_line_failure(proc, "model/no_such_model")
    assert not run_dir.exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.no_such_key=3", "trainer.no_such_key"),
        # A misspelled key names the nearest real one.
        ("optimizer.learning_rat=0.1", "did you mean 'optimizer.learning_rate'?"),
    ],
    ids=["unknown", "misspelled"],
)
def test_unknown_key_fails_clearly(tmp_path, override, needle):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY_RUN, override, run_dir=run_dir)
    _assert_one_line_failure(proc, needle)
    assert not run_dir.exists()


def test_an_added_key_that_nothing_reads_is_refused(tmp_path):
    proc = run_cli(*TINY_RUN, "+trainer.stepz=3", run_dir=tmp_path / "run")
    _assert_one_line_failure(proc, "trainer.stepz")
    assert "trainer.steps" in proc.stderr


def test_unwritable_output_dir_is_reported_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a dir")
    proc = run_cli(*TINY_RUN, run_dir=blocker / "run")
    first = _assert_one_line_failure(proc, "cannot write the output dir", str(blocker / "run"))
    assert first.startswith("error: ")
    assert proc.returncode == 2
    assert blocker.read_text() == "not a dir"


def _snapshot(run_dir: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_a_second_run_in_a_busy_dir_stops_in_one_line(tmp_path):
    # Another process holds the run dir's lock, as a run in progress does.
    import sys

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)  # The files of the run holding the dir.
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 3\n")
    (run_dir / ".hydra" / "overrides.yaml").write_text("- seed=3\n")
    (run_dir / "run.log").write_text("the other run's log\n")
    before = _snapshot(run_dir)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
            str(run_dir),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = run_py([*TINY_RUN, f"hydra.run.dir={run_dir}"])
    finally:
        holder.communicate("")
    assert busy.returncode == 2
    assert busy.stderr.strip().splitlines() == [busy.stderr.strip()]
    assert "another run is using" in busy.stderr
    assert _snapshot(run_dir) == before  # Nothing written, not even Hydra's .hydra/ files.
    # Once the other process is gone, the dir is free again.
    free = run_py([*TINY_RUN, f"hydra.run.dir={run_dir}"])
    assert free.returncode == 0, free.stderr


def test_a_file_system_without_flock_runs_unlocked(tmp_path, monkeypatch, caplog):
    import fcntl
    import os
    import stat

    from helpers import compose_config

    from fedjax_exp.experiment import run

    flock = fcntl.flock

    def no_flock_on_dirs(fd, operation):
        # Only the run dir's lock fails; file locks (the compilation cache's) still work.
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(95, "Operation not supported")
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_flock_on_dirs)
    run(compose_config(TINY_RUN), output_dir=tmp_path / "run")
    assert (tmp_path / "run" / "status.json").exists()
    assert "running without the lock" in caplog.text
