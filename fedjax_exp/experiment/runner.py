"""``run(cfg)``: one experiment from a composed config, start to finish.

A vectorized sweep (``trainer.vectorize``) writes each trial as its own run dir under
``<run dir>/trials/<name>/``. Every check that can reject a run runs before its first write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig

from fedjax_exp.experiment import run_files, run_log, run_record
from fedjax_exp.experiment.errors import ConfigError, RunInterrupted
from fedjax_exp.experiment.run_files import CHECKPOINTS_DIR, HYDRA_DIR, STATUS_FILE
from fedjax_exp.experiment.validation import check_writable_dir, validate_config

log = logging.getLogger(__name__)


class RunDirBusy(ConfigError):
    """Another run holds the run dir's lock."""


def _job_name_and_group(task_name: str) -> tuple[str, str]:
    """(run name, W&B group): the job's overrides, and in a multirun the sweep dir."""
    hc = run_log.hydra_config()
    if hc is None:
        return task_name, task_name
    from hydra.types import RunMode

    name = hc.job.override_dirname or task_name
    multirun = hc.mode == RunMode.MULTIRUN
    return name, f"{task_name}:{hc.sweep.dir}" if multirun else task_name


def save_hydra_files(out: pathlib.Path, cfg: DictConfig) -> None:
    """Hydra's ``.hydra/`` files, saved here rather than by Hydra (``hydra.output_subdir:
    null``), which would save before a rejected run could leave its dir's files alone."""
    from omegaconf import OmegaConf

    hc = run_log.hydra_config()
    if hc is None:
        return
    directory = out / HYDRA_DIR
    directory.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, directory / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), directory / "hydra.yaml")
    OmegaConf.save(hc.overrides.task, directory / "overrides.yaml")


@contextlib.contextmanager
def _run_dir_lock(out: pathlib.Path) -> Iterator[None]:
    """An exclusive flock on the run dir (dropped by the OS when the process ends): a second
    run in the dir stops at once. Without ``fcntl`` (Windows): no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirBusy(
                f"another run is using {out}: wait for it to end or use a new hydra.run.dir"
            ) from None
        except OSError as e:  # A file system without flock: run unlocked rather than not.
            log.warning("cannot lock the run dir %s (%s); running without the lock", out, e)
        yield
    finally:
        os.close(fd)  # Releases the lock.


@contextlib.contextmanager
def _ctrl_c_between_steps() -> Iterator[list[int]]:
    """A first Ctrl-C only asks to stop (the yielded list turns non-empty; the run stops after
    the step, never inside a checkpoint write); a second one stops at once."""
    requested: list[int] = []

    def request(signum: int, frame: Any) -> None:
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)

    if threading.current_thread() is not threading.main_thread():
        yield requested  # Only the main thread receives signals.
        return
    previous = signal.signal(signal.SIGINT, request)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


def run(cfg: DictConfig, output_dir: str | os.PathLike[str] | None = None) -> float:
    """Trains and evaluates ``cfg`` in ``output_dir`` (default: Hydra's job dir; layout in
    :mod:`.run_files`); returns ``cfg.optimized_metric`` (a sweep: the best trial's). Rerunning
    a dir resumes it (same config) or leaves a completed one as it is. Raises ConfigError
    before writing anything, RunFailed when training fails, RunInterrupted on Ctrl-C."""
    if output_dir is None:
        hc = run_log.hydra_config()
        if hc is None:
            raise ConfigError("no output dir: call run(cfg, output_dir=DIR) outside Hydra")
        output_dir = hc.runtime.output_dir
    out = pathlib.Path(output_dir)
    problem = check_writable_dir(out)
    if problem is not None:
        raise ConfigError(f"cannot write the output dir {str(out)!r} ({problem}): choose another")
    container = validate_config(cfg)
    with _run_dir_lock(out):
        return _run_validated(cfg, container, out)


@dataclasses.dataclass
class _Member:
    """One run the runner writes: the plain run itself, or one trial of a sweep."""

    directory: pathlib.Path
    writer: Any
    jsonl: Any
    final: dict[str, float] = dataclasses.field(default_factory=dict)
    error: str | None = None


def _open_members(container, out, trials, start_step, resumed, clock) -> list[_Member]:
    """The run's writers (metrics.jsonl, the log, W&B), one set per trial of a sweep."""
    from fedjax_exp.experiment import vectorized, writers

    name, group = _job_name_and_group(str(container.get("task_name", "train")))
    wandb = (container.get("logger") or {}).get("wandb")
    members = []
    for trial in trials or [None]:
        directory, config, settings, run_name, label = out, container, wandb, name, ""
        if trial is not None:  # Its own run dir and W&B run, grouped under the sweep's name.
            directory, label = out / run_files.TRIALS_DIR / trial.name, f"{trial.name}: "
            config = vectorized.write_trial_files(directory, container, trial)
            if wandb:
                settings, group = {**wandb, "name": None}, wandb.get("group") or name
                run_name = f"{wandb.get('name') or name}/{trial.name}"
        directory.mkdir(parents=True, exist_ok=True)
        jsonl = writers.JsonlWriter(directory, clock, resume_step=start_step if resumed else None)
        parts = [jsonl, run_log.EvaluationLog(label)]
        if settings:
            parts.append(
                writers.create_wandb_writer(
                    settings,
                    directory=directory,
                    config=config,
                    default_name=run_name,
                    default_group=group,
                )
            )
        members.append(_Member(directory, writers.MultiWriter(filter(None, parts)), jsonl))
    return members


def _read_status(directory: pathlib.Path) -> dict[str, Any]:
    try:
        return json.loads((directory / STATUS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _completed_runs(out: pathlib.Path, steps: int) -> list[_Member] | None:
    """The runs of ``out`` (a sweep's: one per trial) when it already completed ``steps``."""
    status = _read_status(out)
    if status.get("status") != "completed" or status.get("step") != steps:
        return None
    runs = []
    for directory in [out / t["dir"] for t in status.get("trials", [])] or [out]:
        ended = status if directory == out else _read_status(directory)
        final = {k: math.nan if v is None else v for k, v in (ended.get("final") or {}).items()}
        runs.append(_Member(directory, None, None, final, ended.get("error")))
    return runs


def _run_validated(cfg: DictConfig, container: dict[str, Any], out: pathlib.Path) -> float:
    """:func:`run` once the config is validated and the run dir is this process's."""
    from fedjax_exp.experiment import vectorized
    from fedjax_exp.experiment.checkpoints import resume_source

    trainer = container["trainer"]
    trials = vectorized.trials_of(cfg, container)  # None: a plain run.
    own_checkpoints = out / CHECKPOINTS_DIR
    source = resume_source(trainer["resume"], own_checkpoints)
    if source is not None and source[0].resolve() == own_checkpoints.resolve():
        run_record.check_resumable(out, container)
        completed_runs = _completed_runs(out, trainer["steps"])
        if completed_runs is not None:  # Nothing to do, and nothing is written.
            final = completed_runs[0].final
            reached = f"; {run_log.format_metrics(final)}" if trials is None else ""
            print(f"already complete: {out} reached trainer.steps={trainer['steps']}{reached}")
            return _optimized_metric(container, completed_runs)

    # Only now import JAX and the library (Hydra's parent process never gets here).
    import jax
    import numpy as np

    # JAX reports at INFO that it found no TPU; Hydra's job logging would print that.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from fedjax_exp.experiment import builders, compilation_cache, loop, parallel
    from fedjax_exp.experiment.checkpoints import Checkpointer
    from fedjax_exp.experiment.evaluation import Evaluator
    from fedjax_exp.training import console

    console.prefix_console_lines(loop.parallel_job_label())  # Parallel jobs: whose line.

    compilation_cache.enable(trainer.get("compilation_cache"))
    model, train_model, train_data, eval_splits = builders.build_model_and_data(cfg)

    def make_algorithm(optimizer: Any, **overrides: Any) -> Any:
        return builders.build_algorithm(cfg, train_model, optimizer, train_data, **overrides)

    if trials is None:
        algorithm = make_algorithm(builders.build_optimizer(cfg))
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(int(container["seed"])))
    else:
        algorithm = vectorized.build(cfg, make_algorithm, trials)
        init_rng, train_rng = vectorized.trial_keys(trials)
    speed = parallel.speed_up(algorithm, trainer)
    state = algorithm.init(init_rng)
    start_step, elapsed = 0, 0.0
    if source is not None:
        reader = Checkpointer(source[0], keep=int(trainer["keep_checkpoints"]), own=False)
        snapshot = reader.restore(state, np.asarray(train_rng), source[1])
        reader.close()
        state, start_step, elapsed = snapshot.state, snapshot.step, snapshot.elapsed
        train_rng = jax.numpy.asarray(snapshot.rng)
        log.info("resuming from %s at step %d", source[0], start_step)
    if start_step > trainer["steps"]:
        raise ConfigError(
            f"the checkpoint is at step {start_step}, beyond trainer.steps={trainer['steps']}: "
            "raise trainer.steps or start a new run dir"
        )
    described = run_log.describe(container, start_step, speed.steps_per_dispatch)
    if trials is not None:
        described += f"; {len(trials)} trials in one program ({', '.join(t.name for t in trials)})"
    parameters = sum(np.size(x) for x in jax.tree_util.tree_leaves(algorithm.eval_params(state)))
    log.info(f"{described}; {parameters:,} parameters; writing to {out}")

    # From here on the run writes files; every exit path records how it ended.
    save_hydra_files(out, cfg)
    hc = run_log.hydra_config()
    run_record.write(out, container, list(hc.overrides.task) if hc is not None else [])
    clock = loop.Clock(elapsed)
    members = _open_members(container, out, trials, start_step, source is not None, clock)
    batch_size = int(trainer["eval_batch_size"])
    evaluator = Evaluator(
        model,
        eval_splits,
        batch_size,
        dict(trainer["eval_batches"]),
        algorithm.periodic_eval_batches(eval_splits, batch_size, container["seed"]),
    )
    checkpointer, step, outcome, error = None, start_step, "failed", None
    ctrl_c = contextlib.ExitStack()
    stop_requested = ctrl_c.enter_context(_ctrl_c_between_steps())

    def on_step(done: int) -> None:
        nonlocal step
        step = done
        if stop_requested:
            raise KeyboardInterrupt

    try:
        checkpointer = Checkpointer(own_checkpoints, keep=int(trainer["keep_checkpoints"]))
        every = ("steps", "log_every", "eval_every", "checkpoint_every")
        settings = loop.LoopSettings(
            **{k: int(trainer[k]) for k in every},
            progress_bar=bool(trainer["progress_bar"]),
            steps_per_dispatch=speed.steps_per_dispatch,
        )
        state, step, diverged = loop.train(
            algorithm,
            state,
            start_step=start_step,
            seed=int(container["seed"]),
            rng=train_rng,
            settings=settings,
            writers=[m.writer for m in members],
            evaluator=evaluator,
            checkpointer=checkpointer,
            clock=clock,
            on_step=on_step,
        )
        ctrl_c.close()  # The final evaluation stops at the first Ctrl-C.
        for index, m in enumerate(members):
            params = algorithm.eval_params(state, index)
            for split in ("test", "validation") if "validation" in eval_splits else ("test",):
                m.final.update(evaluator.final(params, split))
            if trainer.get("per_client_eval"):
                limit = trainer.get("per_client_max_clients")
                summary, values = evaluator.per_client(params, "test", limit)
                m.final.update(summary)
                m.writer.write_histogram(step, "final/per_client/test/histogram", values.tolist())
            m.writer.write_scalars(step, m.final)
            m.writer.write_summary(m.final)
            m.error = f"Diverged: {diverged[index]}" if index in diverged else None
            label = f"trial {trials[index].name}: " if trials is not None else ""
            ended = f" ({m.error})" if m.error else ""
            reached = f"{run_log.step_name(container)} {step} after {clock():.1f} s of training"
            log.info(f"finished {reached}: {label}{run_log.format_metrics(m.final)}{ended}")
        outcome = "completed"
    except BaseException as e:
        kept = checkpointer.latest_step() if checkpointer is not None else None
        if isinstance(e, loop.Diverged) and checkpointer is not None:
            where = f"step {kept} in {own_checkpoints}" if kept is not None else "none"
            e.args = (f"{e}; last good checkpoint: {where}",)
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if isinstance(e, KeyboardInterrupt):
            outcome = "interrupted"
            error = f"interrupted at step {step} of {trainer['steps']} (SIGINT); " + (
                f"last checkpoint: step {kept}" if kept is not None else "no checkpoint yet"
            )
        run_log.note_in_log_file(error if outcome == "interrupted" else f"failed: {error}")
        for m in members:
            m.error = m.error or error
            m.jsonl.write_event(step, status=outcome, error=m.error)
        if outcome == "interrupted":
            raise RunInterrupted(error, kept) from None
        raise
    finally:
        ctrl_c.close()
        _finish(members, trials, out, step, outcome, error, checkpointer)
    return _optimized_metric(container, members)


def _end_run(actions: list[Callable[[], None]], failed: bool) -> None:
    """Runs every clean-up action, even when one fails; a clean-up error is logged when the
    run failed (it must not hide why), else the first is raised after the others ran."""
    first: Exception | None = None
    for action in actions:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - the remaining actions must still run.
            if failed or first is not None:
                log.warning("clean-up failed (%s: %s)", type(e).__name__, e)
            first = first or e
    if first is not None and not failed:
        raise first


def _finish(members, trials, out, step, outcome, error, checkpointer) -> None:
    """Writes each run's status.json (and a sweep's own), then closes everything."""
    from fedjax_exp.experiment.writers import write_status

    ok = outcome == "completed"
    status = functools.partial(write_status, step=step)
    actions = [
        functools.partial(
            status,
            m.directory,
            status="failed" if ok and m.error else outcome,
            error=m.error,
            final=m.final,
        )
        for m in members
    ]
    if trials is not None:
        listed = [
            {**dataclasses.asdict(t), "dir": str(m.directory.relative_to(out)), "error": m.error}
            for t, m in zip(trials, members, strict=True)
        ]
        actions.append(functools.partial(status, out, status=outcome, error=error, trials=listed))
    actions += [checkpointer.close] if checkpointer is not None else []
    actions += [
        functools.partial(m.writer.close, int(not ok or m.error is not None)) for m in members
    ]
    _end_run(actions, failed=not ok)


def _optimized_metric(container: dict[str, Any], runs: list[_Member]) -> float:
    """``optimized_metric`` of the run, or the best over a sweep's trials that completed."""
    key = container.get("optimized_metric")
    if key is None:
        return float("nan")
    if all(key not in m.final for m in runs):
        raise ConfigError(f"optimized_metric={key!r} was not computed; got {sorted(runs[0].final)}")
    values = [m.final[key] for m in runs if m.error is None and key in m.final]
    values = [v for v in values if v == v] or [float("nan")]
    return min(values) if run_files.lower_is_better(str(key)) else max(values)
