"""Multirun sweeps through `python run.py -m ...`: launchers, Optuna, failures, comparison.

Each test runs real sweeps of tiny trainings (logistic model, a few steps, one eval batch) in
subprocesses, the way a user would, with all output under pytest's tmp dir.
"""

from __future__ import annotations

import json
import math
import pathlib
import subprocess

import pytest
import yaml
from helpers import compose_config, run_py

from fedjax_exp import compare

# A training that takes a second or two: a few steps, one eval batch, no progress bar.
TINY = [
    "model=logistic",
    "trainer.steps=4",
    "trainer.log_every=2",
    "trainer.eval_every=2",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=1",
    "trainer.checkpoint_every=0",
    "trainer.progress_bar=false",
]


def run_sweep(
    repo_root: pathlib.Path, sweep_dir: pathlib.Path, *overrides: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs `python run.py -m TINY overrides hydra.sweep.dir=sweep_dir` from the repo root."""
    return run_py(["-m", *TINY, *overrides, f"hydra.sweep.dir={sweep_dir}"], timeout=timeout)


def job_dirs(sweep_dir: pathlib.Path) -> list[pathlib.Path]:
    """The numbered job dirs of a sweep, in job order."""
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )


def read_status(job_dir: pathlib.Path) -> dict:
    return json.loads((job_dir / "status.json").read_text())


def wandb_records(job_dir: pathlib.Path) -> list[dict]:
    """The records of the job's one offline W&B run, via `wandb leet inspect --json`."""
    (run_file,) = job_dir.glob("wandb/offline-run-*/run-*.wandb")
    proc = subprocess.run(
        ["wandb", "leet", "inspect", "--json", str(run_file)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wandb_summary(records: list[dict]) -> dict:
    """The run id, config, logged history steps and exit code of an offline W&B run."""
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    (exit_record,) = [r["exit"] for r in records if r["type"] == "exit"]
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    return {
        "id": run["run_id"],
        "config": run["config"]["update"],
        "history": history,
        "exit_code": exit_record.get("exit_code", 0),
    }


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"sweep failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def check_completed_jobs(sweep_dir: pathlib.Path, seeds: list[int]) -> list[pathlib.Path]:
    """Asserts one completed job per seed, each with its own metrics and W&B run."""
    jobs = job_dirs(sweep_dir)
    assert [j.name for j in jobs] == [str(i) for i in range(len(seeds))]
    run_ids = set()
    for job, seed in zip(jobs, seeds, strict=True):
        status = read_status(job)
        assert status["status"] == "completed", status
        assert status["step"] == 4
        records = compare.read_history(job / "metrics.jsonl")
        assert sorted(records["train/loss"]) == [2, 4]
        assert 0.0 <= records["final/test/accuracy"][4] <= 1.0
        summary = wandb_summary(wandb_records(job))
        assert summary["exit_code"] == 0
        assert summary["config"]["seed"] == seed
        # The W&B run holds the same losses as the job's own metrics file.
        logged = {h["_step"]: h["train/loss"] for h in summary["history"] if "train/loss" in h}
        assert logged == pytest.approx(records["train/loss"])
        run_ids.add(summary["id"])
    assert len(run_ids) == len(seeds)  # distinct W&B runs, not one reused run
    return jobs


def compose_hydra(repo_root: pathlib.Path, overrides: list[str]):
    """The composed config including the hydra node (launcher, sweeper), in-process."""
    return compose_config(overrides, return_hydra_config=True)


def test_optuna_search_config_composes(repo_root):
    cfg = compose_hydra(repo_root, ["hparams_search=lr_optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize"
    assert cfg.optimized_metric == "final/validation/accuracy"
    assert cfg.dataset.validation.mode == "examples"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == cfg.seed
    assert dict(sweeper.params) == {
        "optimizer.learning_rate": "tag(log, interval(1e-4, 1e-1))",
        "trainer.batch_size": "choice(8, 16, 32)",
    }
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"


def test_slurm_launcher_preset_composes(repo_root):
    cfg = compose_hydra(repo_root, ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.timeout_min) == ("gpu", 1, 120)
    # Without one, sbatch gets no partition and SLURM uses the cluster's default.
    cfg = compose_hydra(repo_root, ["hydra/launcher=slurm"])
    assert cfg.hydra.launcher.partition is None


@pytest.fixture(scope="module")
def basic_sweep(repo_root, tmp_path_factory) -> pathlib.Path:
    """A 3-job sweep over seeds with Hydra's basic launcher (jobs in one process)."""
    sweep_dir = tmp_path_factory.mktemp("basic") / "sweep"
    proc = run_sweep(repo_root, sweep_dir, "seed=0,1,2")
    check_ok(proc)
    return sweep_dir


def test_basic_launcher_three_jobs_three_wandb_runs(basic_sweep):
    jobs = check_completed_jobs(basic_sweep, seeds=[0, 1, 2])
    assert (basic_sweep / "multirun.yaml").is_file()
    overrides = [yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text()) for j in jobs]
    assert [o[-1] for o in overrides] == ["seed=0", "seed=1", "seed=2"]
    # Different seeds train differently.
    finals = [read_status(j)["final"] for j in jobs]
    losses = [compare.read_history(j / "metrics.jsonl")["train/loss"][2] for j in jobs]
    assert len(set(losses)) == 3, (losses, finals)


def test_a_job_of_the_shared_process_equals_the_same_run_alone(basic_sweep, tmp_path):
    # The basic launcher runs every job in one process: nothing may leak from job 0 and 1
    # (compiled programs, RNG, writers) into job 2.
    alone = tmp_path / "alone"
    check_ok(run_py([*TINY, "seed=2", f"hydra.run.dir={alone}"]))

    def history(run_dir):
        return [
            {k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        ]

    assert history(job_dirs(basic_sweep)[2]) == history(alone)


def test_compare_report_renders_from_sweep(basic_sweep, tmp_path):
    out = tmp_path / "report"
    code = compare.main([str(basic_sweep), "--out", str(out), "--group-by", "model._target_"])
    assert code == 0
    runs = compare.find_runs([basic_sweep])
    assert [r.name for r in runs] == ["sweep/0", "sweep/1", "sweep/2"]
    assert compare.differing_keys(runs) == ["seed"]
    accuracies = [read_status(j)["final"] for j in job_dirs(basic_sweep)]
    md = (out / "report.md").read_text()
    assert "3 run(s): 3 completed, 0 failed" in md
    assert "| run | dir | status | step |" in md and "| seed=0 | sweep/0 | completed |" in md
    for run, final in zip(runs, accuracies, strict=True):
        assert run.final["final/test/accuracy"] == pytest.approx(
            final.get("final/test/accuracy", final.get("test/accuracy"))
        )
    assert (out / "plots" / "train_loss.png").read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in (out / "report.html").read_text()
    # All runs share model._target_: one group of 3, mean over the runs' final accuracy.
    mean = sum(r.final["final/test/accuracy"] for r in runs) / 3
    assert "| 3 | 0 | " in md and f"{mean:.4g} ± " in md


def test_failing_jobs_do_not_stop_the_others(repo_root, tmp_path):
    # Job 1's learning rate makes the loss overflow (it fails while training); job 2's is
    # rejected by validation before it writes anything. Jobs 0 and 3 still complete.
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(
        repo_root,
        sweep_dir,
        "logger=local",
        "optimizer=sgd",
        "optimizer.learning_rate=0.1,1e38,-1,0.05",
    )
    # Hydra's basic sweeper runs every job of the batch, then re-raises the first failure:
    # the sweep as a whole exits non-zero so the failure is not missed.
    assert proc.returncode != 0
    assert "diverged" in proc.stderr.lower()
    jobs = job_dirs(sweep_dir)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    for job in (jobs[0], jobs[3]):
        status = read_status(job)
        assert status["status"] == "completed"
        assert math.isfinite(status["final"]["final/test/accuracy"])
    diverged = read_status(jobs[1])
    assert diverged["status"] == "failed"
    assert "non-finite" in diverged["error"]
    # The rejected config left no half-written run behind.
    assert not (jobs[2] / "metrics.jsonl").exists()
    assert not (jobs[2] / "status.json").exists()
    # The report renders from the sweep, with the diverged run marked failed.
    out = tmp_path / "report"
    assert compare.main([str(sweep_dir), "--out", str(out), "--format", "md"]) == 0
    md = (out / "report.md").read_text()
    assert "3 run(s): 2 completed, 1 failed" in md
    assert "| optimizer.learning_rate=1e+38 ✗ | sweep/1 | failed: Diverged: " in md
    # The rejected job is listed with the error it logged.
    assert (
        "1 job(s) never started (rejected, or starting): sweep/2 (config error: "
        "optimizer.learning_rate must be a positive number, got -1" in md
    )


@pytest.mark.slow
def test_joblib_launcher_three_jobs_three_wandb_runs(repo_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(
        repo_root, sweep_dir, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "seed=0,1,2"
    )
    check_ok(proc)
    check_completed_jobs(sweep_dir, seeds=[0, 1, 2])


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model=logistic,cnnn"], "Could not find 'model/cnnn'; available options: cnn,"),
        (
            ["trainer.stepz=1,2"],
            "unknown config key 'trainer.stepz'; did you mean 'trainer.steps'?",
        ),
    ],
    ids=["group-option", "key"],
)
def test_a_typo_in_a_sweep_fails_in_one_line_before_any_job(repo_root, tmp_path, overrides, needle):
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(repo_root, sweep_dir, *overrides)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert needle in proc.stderr
    assert not sweep_dir.exists()


@pytest.mark.slow
def test_joblib_launcher_a_diverging_job_fails_alone(repo_root, tmp_path):
    # The failed job's exception travels back to the sweep pickled; the other jobs still run.
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(
        repo_root,
        sweep_dir,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "logger=local",
        "optimizer=sgd",
        "optimizer.learning_rate=0.1,1e38,0.05",
    )
    assert proc.returncode != 0
    assert "BrokenProcessPool" not in proc.stderr
    statuses = [read_status(job)["status"] for job in job_dirs(sweep_dir)]
    assert statuses == ["completed", "failed", "completed"]


@pytest.mark.slow
def test_submitit_local_two_jobs(repo_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(
        repo_root,
        sweep_dir,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.cpus_per_task=1",
        "seed=0,1",
    )
    check_ok(proc)
    check_completed_jobs(sweep_dir, seeds=[0, 1])
    # submitit ran each job in its own process and kept its logs under the sweep dir.
    assert len(list((sweep_dir / ".submitit").glob("*/*_log.out"))) == 2


@pytest.mark.slow
def test_optuna_search_three_trials(repo_root, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_sweep(
        repo_root,
        sweep_dir,
        "hparams_search=lr_optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        "logger=local",
    )
    check_ok(proc)
    jobs = job_dirs(sweep_dir)
    assert len(jobs) == 3
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    finals = []
    for job in jobs:
        status = read_status(job)
        assert status["status"] == "completed"
        final = compare.load_run(job).final
        assert "final/test/accuracy" in final  # Reported, not selected on.
        finals.append(final["final/validation/accuracy"])
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("optimizer.learning_rate=") for o in overrides)
    # The sweeper's best value is the best trial's returned metric, i.e. the best job's final
    # validation accuracy in its status file.
    assert results["best_value"] == pytest.approx(max(finals))
    assert 1e-4 <= results["best_params"]["optimizer.learning_rate"] <= 1e-1
    assert results["best_params"]["trainer.batch_size"] in (8, 16, 32)
