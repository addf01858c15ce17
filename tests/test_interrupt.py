"""Ctrl-C (SIGINT) to `python run.py`: one line and no traceback, status `interrupted`, only
complete checkpoints left, and the command that line prints resumes the run to exactly the
result of an uninterrupted one; running it once more says the run is complete and changes
nothing. run.log says why a run stopped and holds each periodic evaluation.

The child is slowed by a host callback in its training step ($STEP_SLEEP seconds a step, a
model plugged in by `model._target_`), so that the test can interrupt it mid-run.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO_ROOT, TINY_RUN, compose_config, run_py

from fedjax_exp.experiment.run_files import read_metrics

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
    "model._target_=test_interrupt.create_slow_model",
]


def create_slow_model(only_digits: bool = False):
    """A small Haiku MLP whose training step sleeps $STEP_SLEEP seconds on the host."""
    import jax

    from fedjax_exp.models.haiku import create_model_from_module

    model = create_model_from_module(
        "haiku.nets.MLP", {"output_sizes": [10 if only_digits else 62]}, flatten_input=True
    )
    seconds = float(os.environ.get("STEP_SLEEP", "0"))

    def apply_for_train(params, batch, rng=None):
        jax.debug.callback(lambda: time.sleep(seconds))
        return model.apply_for_train(params, batch, rng)

    return model.replace(apply_for_train=apply_for_train)


def child_env(sleep: float) -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {"STEP_SLEEP": str(sleep), "PYTHONPATH": path}


def history(run_dir: pathlib.Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in lines]


def files(run_dir: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def interrupt_when_logged(args: list[str], outputs: pathlib.Path, step: int) -> tuple[int, str]:
    """Starts `python run.py ARGS`, sends SIGINT once a metrics.jsonl under ``outputs`` has
    logged ``step``; returns (exit code, stdout + stderr)."""
    child = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    child.update(WANDB_MODE="offline", JAX_PLATFORMS="cpu", **child_env(0.5))
    proc = subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=REPO_ROOT,
        env=child,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        # read_metrics skips a last line still being written.
        logged = [r["step"] for f in outputs.glob("*/metrics.jsonl") for r in read_metrics(f)]
        if step in logged:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out + err


def test_ctrl_c_stops_in_one_line_and_the_printed_command_resumes_exactly(tmp_path):
    reference = tmp_path / "reference"
    proc = run_py([*TRAINER, f"hydra.run.dir={reference}"], env=child_env(0))
    assert proc.returncode == 0, proc.stderr

    outputs = tmp_path / "outputs"
    args = [*TRAINER, f"hydra.run.dir={outputs}/${{now:%H-%M-%S-%f}}"]
    code, console = interrupt_when_logged(args, outputs, step=4)
    assert code == 130, console
    assert "Traceback" not in console, console
    (run_dir,) = [p.parent for p in outputs.glob("*/status.json")]
    line = console.strip().splitlines()[-1]
    found = re.fullmatch(
        r"interrupted at step (\d+) of 12 \(SIGINT\); last checkpoint: step (4|8); "
        r"resume with: (python run\.py .*)",
        line,
    )
    assert found, console
    reached, kept = int(found.group(1)), int(found.group(2))
    # The run stops after the step in progress (and the save of checkpoint 4, if under way).
    assert 6 <= reached < 12 and kept <= reached
    command = shlex.split(found.group(3))
    assert command[2:] == [*args, "trainer.resume=latest"]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == reached
    # Only complete checkpoints: digit-named step dirs, the newest the one the line names.
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved[-1] == str(kept) and all(name.isdigit() for name in saved)
    log = (run_dir / "run.log").read_text()
    assert re.search(
        r"eval at step 4: train/accuracy=[0-9.]+, train/loss=[0-9.]+, test/accuracy=", log
    )
    assert f"interrupted at step {reached} of 12 (SIGINT); last checkpoint: step {kept}\n" in log

    resumed = run_py(command[2:], env=child_env(0))
    assert resumed.returncode == 0, resumed.stderr
    assert [p.parent for p in outputs.glob("*/run_config.json")] == [run_dir]
    assert history(run_dir) == history(reference)
    assert json.loads((run_dir / "status.json").read_text()) == json.loads(
        (reference / "status.json").read_text()
    )

    before = files(run_dir)
    again = run_py(command[2:], env=child_env(0))
    assert again.returncode == 0, again.stderr
    final = json.loads((run_dir / "status.json").read_text())["final"]
    assert again.stdout.strip() == (
        f"already complete: {run_dir} reached trainer.steps=12; "
        f"final/test/accuracy={final['final/test/accuracy']:.4g}, "
        f"final/test/loss={final['final/test/loss']:.4g}"
    )
    assert files(run_dir) == before


def test_run_log_says_why_a_run_failed(tmp_path):
    from fedjax_exp.experiment import RunFailed, run

    cfg = compose_config([*TINY_RUN, "optimizer=sgd", "optimizer.learning_rate=1e38"])
    handler = logging.FileHandler(tmp_path / "run.log")  # As Hydra's job logging has.
    logging.getLogger().addHandler(handler)
    try:
        with pytest.raises(RunFailed):
            run(cfg, output_dir=tmp_path / "run")
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    log = (tmp_path / "run.log").read_text().splitlines()
    assert log[-1].startswith("failed: Diverged: training diverged: non-finite train/loss=")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and log[-1] == f"failed: {status['error']}"


def test_the_resume_command_for_a_run_a_run_without_checkpoints_and_a_sweep():
    from fedjax_exp.experiment.cli import resume_command

    args = ["seed=1", "trainer.resume=/old/run", "hydra.run.dir=out/${now:%H}"]
    assert resume_command(args, None, checkpointed=True) == (
        "resume with: python run.py seed=1 'hydra.run.dir=out/${now:%H}' trainer.resume=latest"
    )
    assert resume_command(args, None, checkpointed=False) == (
        "start again with: python run.py seed=1 trainer.resume=/old/run "
        "'hydra.run.dir=out/${now:%H}'"
    )
    sweep = ["-m", "seed=0,1", "hydra.sweep.dir=old"]
    assert resume_command(sweep, "multirun/x", checkpointed=False) == (
        "resume with: python run.py -m seed=0,1 hydra.sweep.dir=multirun/x"
    )


@pytest.mark.slow
def test_ctrl_c_stops_a_sweep_in_one_line_and_the_sweep_resumes(tmp_path):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", *TRAINER, "seed=0,1", f"hydra.sweep.dir={sweep_dir}"]
    code, console = interrupt_when_logged(args, sweep_dir, step=4)
    assert code == 130, console
    assert "Traceback" not in console, console
    line = console.strip().splitlines()[-1]
    assert re.fullmatch(r"interrupted at step \d+ of 12 \(SIGINT\); .*; resume with: .*", line)
    assert line.endswith(shlex.join(["python", "run.py", *args])), line
    assert json.loads((sweep_dir / "0" / "status.json").read_text())["status"] == "interrupted"
    assert not (sweep_dir / "1").exists()  # The sweep stopped.

    resumed = run_py(args[:-1] + [line.split()[-1]], env=child_env(0))
    assert resumed.returncode == 0, resumed.stderr
    for job in ("0", "1"):
        assert json.loads((sweep_dir / job / "status.json").read_text())["status"] == "completed"
