"""The W&B offline run of `python run.py`, read back with `wandb leet inspect --json`, and the
failure path (non-finite loss) as W&B, status.json and metrics.jsonl record it."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
from helpers import run_py

TINY = [
    "logger=wandb",
    "trainer.steps=4",
    "trainer.log_every=2",
    "trainer.eval_every=4",
    "trainer.eval_batch_size=32",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=1",
    "trainer.checkpoint_every=2",
    "trainer.progress_bar=false",
]

pytestmark = pytest.mark.skipif(shutil.which("wandb") is None, reason="wandb CLI not found")


def run_cli(*overrides: str, run_dir: pathlib.Path) -> subprocess.CompletedProcess[str]:
    # No WANDB_MODE: the mode comes from the logger config, as for a user.
    return run_py([*TINY, *overrides, f"hydra.run.dir={run_dir}"], unset=["WANDB_MODE"])


def wandb_records(run_dir: pathlib.Path) -> list[dict]:
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(files[0])],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def of_type(records: list[dict], kind: str) -> list[dict]:
    return [r[kind] for r in records if r["type"] == kind]


def test_offline_run_holds_history_config_and_exit_code(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("logger.wandb.tags=[smoke,test]", "seed=3", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr
    records = wandb_records(run_dir)

    (run,) = of_type(records, "run")
    config = run["config"]["update"]
    assert config["seed"] == 3 and config["trainer"]["steps"] == 4
    assert config["model"]["_target_"] == "fedjax_exp.models.emnist.create_logistic_model"
    assert config["dataset"]["num_classes"] == 62  # Resolved, not "${...}".
    # Named after the command-line overrides (Hydra's override_dirname: sorted, comma-joined).
    overrides = sorted([*TINY, "logger.wandb.tags=[smoke,test]", "seed=3"])
    assert run["display_name"] == ",".join(overrides)
    assert run["run_group"] == "train"
    assert sorted(run.get("tags", [])) == ["smoke", "test"]

    # History matches the metrics file, step for step.
    local = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {}
    for h in of_type(records, "history"):
        logged.setdefault(h["step"]["num"], {}).update(h["item"])
    for record in local:
        for key, value in record.items():
            if key not in ("step", "time"):
                assert logged[record["step"]][key] == pytest.approx(value, rel=1e-6), key
    assert [s for s, item in logged.items() if "train/loss" in item] == [2, 4]
    assert "final/test/accuracy" in logged[4]
    (exit_record,) = of_type(records, "exit")
    assert exit_record.get("exit_code", 0) == 0  # Protobuf JSON omits a zero exit code.


def test_non_finite_loss_fails_the_run_everywhere_and_keeps_a_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "model=haiku",
        "optimizer=sgd",
        "optimizer.learning_rate=1e30",
        "trainer.checkpoint_every=1",
        run_dir=run_dir,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: training diverged")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and "diverged" in status["error"]
    assert status["final"] == {}
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["status"] == "failed" and lines[-1]["step"] == status["step"]
    assert any(r.get("train/loss", 0.0) is None for r in lines)  # The NaN, as JSON null.

    (exit_record,) = of_type(wandb_records(run_dir), "exit")
    assert exit_record["exit_code"] != 0

    # The last checkpoint predates the divergence and restores to finite parameters.
    from fedjax_exp.experiment.checkpoints import Checkpointer

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=3)
    kept = checkpointer.latest_step()
    assert kept is not None and kept < status["step"]
    assert f"last good checkpoint: step {kept}" in status["error"]
    path = run_dir / "checkpoints" / str(kept)
    item = checkpointer._manager.restore(kept)  # Raw arrays, no template needed.
    checkpointer.close()
    leaves = item["default"]["state"] if "default" in item else item["state"]
    assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves), path


def test_two_writers_live_at_once_each_keep_their_own_offline_run(tmp_path, monkeypatch):
    # A vectorized sweep logs each trial as its own live W&B run from one process.
    from fedjax_exp.experiment import writers

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    dirs = [tmp_path / "lr=0.1", tmp_path / "lr=0.01"]
    opened = []
    for d in dirs:
        d.mkdir()
        opened.append(
            writers.create_wandb_writer(
                {"mode": "offline", "project": "p"},
                directory=d,
                config={"lr": d.name},
                default_name=d.name,
                default_group="sweep",
            )
        )
    assert all(isinstance(w, writers.WandbWriter) for w in opened)
    for step in (1, 2):  # Interleaved, as the sweep logs them.
        for i, w in enumerate(opened):
            w.write_scalars(step, {"train/loss": 10.0 * i + step})
    opened[0].close(0)
    opened[1].close(1)

    for i, d in enumerate(dirs):
        records = wandb_records(d)
        (run,) = of_type(records, "run")
        assert run["display_name"] == d.name and run["config"]["update"]["lr"] == d.name
        history = {h["step"]["num"]: h["item"]["train/loss"] for h in of_type(records, "history")}
        assert history == {1: 10.0 * i + 1, 2: 10.0 * i + 2}
        (exit_record,) = of_type(records, "exit")
        assert exit_record.get("exit_code", 0) == i
