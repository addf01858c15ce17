"""Metric writers: the metrics.jsonl contract, resume truncation, status.json, fan-out and the
W&B fallback. No JAX work and no W&B run: W&B is replaced by fakes."""

from __future__ import annotations

import json
import math
import os
import pathlib
import re

import numpy as np
import pytest

from fedjax_exp.experiment import run_files, writers


class FakeClock:
    def __init__(self, *times: float):
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_writes_one_strict_json_line_per_call(tmp_path):
    w = writers.JsonlWriter(tmp_path, FakeClock(1.25, 2.0000004), resume_step=None)
    w.write_scalars(5, {"train/loss": np.float32(0.5), "eval/test/accuracy": 0.75})
    w.write_scalars(np.int64(10), {"train/loss": float("nan"), "x": float("inf"), "n": 3})
    w.close(0)
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # Strict JSON for every reader.
    assert lines(tmp_path / "metrics.jsonl") == [
        {"step": 5, "train/loss": 0.5, "eval/test/accuracy": 0.75, "time": 1.25},
        {"step": 10, "train/loss": None, "x": None, "n": 3, "time": 2.0},
    ]


def test_json_value_converts_numpy_and_jax_scalars():
    jnp = pytest.importorskip("jax.numpy")
    assert writers._json_value(np.float64(0.25)) == 0.25
    assert writers._json_value(np.array(7, np.int32)) == 7
    assert type(writers._json_value(jnp.asarray(1.5))) is float
    assert writers._json_value(jnp.asarray(float("-inf"))) is None
    assert writers._json_value(True) is True
    assert writers._json_value("text") == "text"


def test_each_line_is_on_disk_before_close(tmp_path):
    # A killed run keeps every line written before the kill: no close() needed to read them.
    w = writers.JsonlWriter(tmp_path, FakeClock(0.0, 0.0), resume_step=None)
    w.write_scalars(1, {"a": 1.0})
    assert writers.read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 1.0, "time": 0}]
    w.write_scalars(2, {"a": 2.0})
    assert [r["step"] for r in writers.read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    w.close(0)


def test_fresh_run_replaces_an_old_history(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 99, "a": 1}\n')
    w = writers.JsonlWriter(tmp_path, FakeClock(0.5), resume_step=None)
    w.write_scalars(1, {"a": 2.0})
    w.close(0)
    assert lines(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 2.0, "time": 0.5}]


def test_resume_truncates_after_the_checkpoint_step(tmp_path):
    old = [
        {"step": 2, "train/loss": 1.0, "time": 1},
        {"step": 4, "train/loss": 0.9, "time": 2},
        {"step": 4, "eval/test/accuracy": 0.3, "time": 2},
        {"step": 4, "status": "failed", "error": "KeyboardInterrupt", "time": 2},
        {"step": 6, "train/loss": 0.8, "time": 3},
        {"step": 6, "final/test/accuracy": 0.4, "time": 3},
    ]
    path = tmp_path / "metrics.jsonl"
    # The last line was cut by a kill: it must not break the resume.
    path.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 7, "train/lo')
    w = writers.JsonlWriter(tmp_path, FakeClock(9.0), resume_step=4)
    w.write_scalars(6, {"train/loss": 0.7})
    w.close(0)
    assert lines(path) == [*old[:3], {"step": 6, "train/loss": 0.7, "time": 9.0}]


def test_resume_without_a_file_starts_one(tmp_path):
    w = writers.JsonlWriter(tmp_path, FakeClock(0.0), resume_step=3)
    w.write_scalars(4, {"a": 1.0})
    w.close(0)
    assert lines(tmp_path / "metrics.jsonl") == [{"step": 4, "a": 1.0, "time": 0.0}]


def test_failed_event_line(tmp_path):
    w = writers.JsonlWriter(tmp_path, FakeClock(0.1, 3.1234567), resume_step=None)
    w.write_scalars(3, {"train/loss": float("nan")})
    w.write_event(3, status="failed", error="Diverged: training diverged")
    w.close(1)
    assert lines(tmp_path / "metrics.jsonl")[-1] == {
        "step": 3,
        "status": "failed",
        "error": "Diverged: training diverged",
        "time": 3.123457,
    }


def test_read_metrics_skips_blank_lines_and_a_partial_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, "a": null}\n{"step": 3, "a"')
    assert writers.read_metrics(path) == [{"step": 1}, {"step": 2, "a": None}]


def test_read_metrics_rejects_a_malformed_line_inside_with_its_location(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\nnot json\n{"step": 2, "a": 2}\n')
    with pytest.raises(run_files.MetricsFileError, match=re.escape(f"{path}:2: not a JSON")):
        writers.read_metrics(path)
    path.write_text('{"time": 1.0, "a": 1}\n{"step": 2}\n')
    with pytest.raises(run_files.MetricsFileError, match=f'{path}:1: .*integer "step"'):
        writers.read_metrics(path)


def test_write_status_is_atomic_and_strict_json(tmp_path, monkeypatch):
    writers.write_status(
        tmp_path, status="completed", step=5, error=None, final={"final/test/loss": np.float32(2)}
    )
    assert json.loads((tmp_path / "status.json").read_text()) == {
        "status": "completed",
        "step": 5,
        "error": None,
        "final": {"final/test/loss": 2.0},
    }

    # A write interrupted before the rename leaves the previous status.json untouched.
    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        writers.write_status(
            tmp_path, status="failed", step=7, error="x", final={"a": float("nan")}
        )
    monkeypatch.undo()
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"
    # The next write goes through (reusing the leftover temporary file) and leaves no debris.
    writers.write_status(tmp_path, status="failed", step=7, error="E: x", final={"a": math.inf})
    status = json.loads((tmp_path / "status.json").read_text())
    assert status == {"status": "failed", "step": 7, "error": "E: x", "final": {"a": None}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


class Recorder:
    def __init__(self, fail_close: bool = False):
        self.calls: list[tuple] = []
        self.fail_close = fail_close

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))

    def write_histogram(self, step, name, values):
        self.calls.append(("histogram", step, name, list(values)))

    def write_summary(self, summary):
        self.calls.append(("summary", dict(summary)))

    def close(self, exit_code):
        self.calls.append(("close", exit_code))
        if self.fail_close:
            raise OSError("disk gone")


def test_multiwriter_fans_out_and_closes_all_even_if_one_fails():
    a, b, c = Recorder(), Recorder(fail_close=True), Recorder()
    multi = writers.MultiWriter([a, b, c])
    multi.write_scalars(1, {"x": 1.0})
    multi.write_histogram(2, "h", [0.5, 1.0])
    multi.write_summary({"final/x": 3.0})
    # A writer failing to close is a warning: it must not replace the run's own outcome.
    with pytest.warns(RuntimeWarning, match=r"closing the Recorder failed \(OSError: disk gone\)"):
        multi.close(1)
    expected = [
        ("scalars", 1, {"x": 1.0}),
        ("histogram", 2, "h", [0.5, 1.0]),
        ("summary", {"final/x": 3.0}),
        ("close", 1),
    ]
    assert a.calls == b.calls == c.calls == expected


class FakeRun:
    def __init__(self):
        self.logged: list[tuple[dict, int]] = []
        self.summary: dict = {}
        self.exit_code = None

    def log(self, data, step):
        self.logged.append((data, step))

    def finish(self, exit_code):
        self.exit_code = exit_code


def test_wandb_writer_logs_at_the_step_and_finishes_with_the_exit_code():
    run = FakeRun()
    w = writers.WandbWriter(run)
    w.write_scalars(np.int64(3), {"train/loss": np.float32(0.25), "bad": float("nan")})
    w.write_summary({"final/test/accuracy": np.float64(0.5)})
    w.close(1)
    assert run.logged == [({"train/loss": 0.25, "bad": None}, 3)]
    assert type(run.logged[0][1]) is int
    assert run.summary == {"final/test/accuracy": 0.5}
    assert run.exit_code == 1


def _create(tmp_path, settings, run_id="abc123"):
    return writers.create_wandb_writer(
        settings,
        directory=tmp_path,
        config={"seed": 0},
        default_name="model=cnn",
        default_group="train",
        run_id=run_id,
    )


def test_wandb_that_fails_to_start_falls_back_with_a_warning(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def broken_init(**kwargs):
        raise RuntimeError("no API key")

    monkeypatch.setattr(wandb, "init", broken_init)
    with pytest.warns(RuntimeWarning, match=r"W&B failed to start \(RuntimeError: no API key\)"):
        assert _create(tmp_path, {"mode": "online"}) is None


def test_wandb_init_gets_the_settings_and_defaults(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    seen = {}
    run = FakeRun()

    def fake_init(**kwargs):
        seen.update(kwargs)
        return run

    monkeypatch.setattr(wandb, "init", fake_init)
    w = _create(tmp_path, {"mode": "offline", "project": "p", "tags": ["a"], "group": None})
    assert isinstance(w, writers.WandbWriter) and w.run is run
    assert seen["mode"] == "offline" and seen["project"] == "p" and seen["tags"] == ["a"]
    assert seen["name"] == "model=cnn" and seen["group"] == "train"  # Defaults fill nulls.
    assert seen["dir"] == str(tmp_path) and seen["config"] == {"seed": 0}
    assert seen["id"] == "abc123" and seen["resume"] == "allow"
    # Each writer its own live run: a vectorized sweep keeps one per trial open at once.
    assert seen["reinit"] == "create_new"
    assert seen["settings"].silent is True  # No W&B banner unless logger.wandb.silent=false.
    _create(tmp_path, {"mode": "offline", "silent": False})
    assert seen["settings"].silent is False


def test_a_silent_online_run_logs_its_url_in_one_line(tmp_path, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")
    run = FakeRun()
    run.url = "https://wandb.ai/me/p/runs/abc123"
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    with caplog.at_level("INFO", logger=writers.__name__):
        _create(tmp_path, {"mode": "online"})
        _create(tmp_path, {"mode": "online", "silent": False})  # W&B prints it itself.
    assert caplog.messages == ["W&B run: https://wandb.ai/me/p/runs/abc123"]


def test_wandb_disabled_never_calls_init(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: pytest.fail("init called"))
    assert _create(tmp_path, {"mode": "disabled"}) is None


def test_write_status_extra_fields_and_no_final(tmp_path):
    trials = [{"name": "lr=0.1", "dir": "trials/lr=0.1"}]
    writers.write_status(tmp_path, status="completed", step=3, error=None, trials=trials)
    assert json.loads((tmp_path / "status.json").read_text()) == {
        "status": "completed",
        "step": 3,
        "error": None,
        "trials": trials,
    }


def test_wandb_run_id_is_reused_from_the_job_dir(tmp_path):
    first, second = writers.wandb_run_id(tmp_path), writers.wandb_run_id(tmp_path)
    assert first != second and len(first) == 12  # Nothing stored yet: a new id each time.
    (tmp_path / writers.WANDB_ID_FILE).write_text("abc123\n")
    assert writers.wandb_run_id(tmp_path) == "abc123"


def test_started_wandb_run_stores_its_id_for_a_resume(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    seen = []

    def fake_init(**kwargs):
        seen.append(kwargs["id"])
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    assert _create(tmp_path, {"mode": "offline"}, run_id=None) is not None
    assert (tmp_path / writers.WANDB_ID_FILE).read_text() == seen[0] + "\n"
    _create(tmp_path, {"mode": "offline"}, run_id=None)
    assert seen[1] == seen[0]


def test_pyproject_requires_a_wandb_with_reinit_create_new():
    # The writer starts one live run per trial with reinit="create_new" (wandb 0.19.10 on).
    text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    (bound,) = re.findall(r'^\s*"wandb>=([0-9.]+)', text, flags=re.M)
    assert tuple(int(part) for part in bound.split(".")) >= (0, 19, 10)
