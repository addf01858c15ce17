"""Kill-and-resume: a run killed mid-training and rerun ends exactly like an uninterrupted one.

The kill is real (SIGKILL from inside a train step) and deterministic: the model below is the
package's Haiku wrapper plus a host callback that kills the process on its N-th training call,
once (a marker file records that it happened). It is plugged in by `model._target_`, the way
user code plugs in.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal

import pytest
from helpers import run_py

TESTS = pathlib.Path(__file__).resolve().parent

TRAINER = [
    "logger=local",
    "trainer.steps=12",
    "trainer.log_every=2",
    "trainer.eval_every=4",
    "trainer.eval_batch_size=32",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=2",
    "trainer.checkpoint_every=4",
    "trainer.keep_checkpoints=2",
    "trainer.progress_bar=false",
    "model._target_=test_run_resume.create_killing_model",
]
KILL_AT_CALL = 7  # During step 7: after the step-4 checkpoint, before the step-8 one.


def create_killing_model(only_digits: bool = False):
    """A small MLP whose training forward pass SIGKILLs the process on call KILL_AT_CALL,
    unless the marker file named by $KILL_MARKER exists (then it behaves normally).

    Its training outputs carry noise drawn from the step's rng, so a resumed run matches the
    uninterrupted one only if it restores the key stream too."""
    import jax

    from fedjax_exp.models.haiku import create_model_from_module

    model = create_model_from_module(
        "haiku.nets.MLP", {"output_sizes": [10 if only_digits else 62]}, flatten_input=True
    )
    marker = pathlib.Path(os.environ["KILL_MARKER"])
    calls = [0]

    def maybe_kill() -> None:
        calls[0] += 1
        if calls[0] == KILL_AT_CALL and not marker.exists():
            marker.write_text("killed")
            os.kill(os.getpid(), signal.SIGKILL)

    def apply_for_train(params, batch, rng=None):
        jax.debug.callback(maybe_kill)
        logits = model.apply_for_train(params, batch, rng)
        return logits + 0.1 * jax.random.normal(rng, logits.shape)

    return model.replace(apply_for_train=apply_for_train)


def run_cli(*overrides: str, run_dir: pathlib.Path, marker: pathlib.Path):
    env = {
        "KILL_MARKER": str(marker),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    return run_py([*TRAINER, *overrides, f"hydra.run.dir={run_dir}"], env=env)


def history(run_dir: pathlib.Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def steps_on_disk(run_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
    """An uninterrupted run (the marker exists, so nothing is killed)."""
    tmp = tmp_path_factory.mktemp("reference")
    marker = tmp / "marker"
    marker.write_text("no kill")
    proc = run_cli(run_dir=tmp / "run", marker=marker)
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def test_killed_run_resumes_to_identical_metrics(tmp_path, reference):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    killed = run_cli(run_dir=run_dir, marker=marker)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert marker.read_text() == "killed"
    assert steps_on_disk(run_dir) == [4]
    assert not (run_dir / "status.json").exists()
    # Step 6 was logged before the kill; the resumed run will log it again from step 4.
    assert [r["step"] for r in history(run_dir) if "train/loss" in r] == [2, 4, 6]

    resumed = run_cli(run_dir=run_dir, marker=marker)  # The very same command.
    assert resumed.returncode == 0, resumed.stderr
    assert history(run_dir) == history(reference)
    status = json.loads((run_dir / "status.json").read_text())
    expected = json.loads((reference / "status.json").read_text())
    assert status == expected
    assert status["status"] == "completed" and status["step"] == 12
    assert steps_on_disk(run_dir) == [8, 12]  # keep_checkpoints=2


def test_resume_from_another_runs_checkpoint(tmp_path, reference):
    marker = tmp_path / "marker"
    marker.write_text("no kill")
    run_dir = tmp_path / "run"
    proc = run_cli(
        f"trainer.resume={reference / 'checkpoints' / '8'}", run_dir=run_dir, marker=marker
    )
    assert proc.returncode == 0, proc.stderr
    # The new run dir holds steps 9..12 only, and ends exactly like the reference.
    new_history = history(run_dir)
    assert min(r["step"] for r in new_history) == 10
    assert new_history == [r for r in history(reference) if r["step"] > 8]
    final = json.loads((run_dir / "status.json").read_text())["final"]
    assert final == json.loads((reference / "status.json").read_text())["final"]


def test_resume_path_that_does_not_exist_fails_in_one_line(tmp_path):
    proc = run_cli("trainer.resume=/no/such/run", run_dir=tmp_path / "run", marker=tmp_path / "m")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "trainer.resume='/no/such/run' does not exist" in proc.stderr


def test_rerunning_a_dir_with_another_config_is_refused_and_changes_nothing(tmp_path, reference):
    marker = tmp_path / "marker"
    marker.write_text("no kill")
    run_dir = tmp_path / "run"
    first = run_cli("trainer.steps=8", run_dir=run_dir, marker=marker)
    assert first.returncode == 0, first.stderr
    # Every file, Hydra's .hydra/config.yaml and overrides.yaml included, byte for byte.
    before = {
        str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()
    }
    assert ".hydra/config.yaml" in before and ".hydra/overrides.yaml" in before
    proc = run_cli("seed=5", "optimizer.learning_rate=0.5", run_dir=run_dir, marker=marker)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "optimizer.learning_rate: 0.001 -> 0.5; seed: 0 -> 5" in proc.stderr
    after = {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before
    assert steps_on_disk(run_dir) == [4, 8]
    # Training longer is the same run: it resumes and ends like the uninterrupted 12 steps.
    longer = run_cli(run_dir=run_dir, marker=marker)
    assert longer.returncode == 0, longer.stderr
    assert history(run_dir) == history(reference)
