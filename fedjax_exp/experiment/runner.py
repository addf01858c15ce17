"""``run(cfg)``: one experiment from a composed config, start to finish.

A run trains one algorithm with :func:`~fedjax_exp.experiment.loop.train`. A vectorized sweep
(``trainer.vectorize``) is the same run with an algorithm over a trials axis; each trial then
gets its own run dir under ``<run dir>/trials/<name>/`` (metrics, status, W&B run, ``.hydra/``)
so that the comparison report and W&B see ordinary runs.

Order matters for "nothing half-written": every check that can reject the run (bad config,
a dir another run holds, a dir holding another config) runs before its first file is written.
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

from fedjax_exp.experiment import run_log, run_record
from fedjax_exp.experiment.errors import ConfigError, RunInterrupted
from fedjax_exp.experiment.run_files import CHECKPOINTS_DIR, HYDRA_DIR, STATUS_FILE
from fedjax_exp.experiment.validation import check_writable_dir, validate_config

log = logging.getLogger(__name__)


class RunDirBusy(ConfigError):
    """Another run holds the run dir's lock."""


def _hydra_config() -> Any:
    """Hydra's runtime config, or None outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get()
    except ValueError:
        return None


def _job_name_and_group(task_name: str) -> tuple[str, str]:
    """(run name, W&B group): the job's overrides, and in a multirun the sweep dir."""
    hc = _hydra_config()
    if hc is None:
        return task_name, task_name
    from hydra.types import RunMode

    name = hc.job.override_dirname or task_name
    multirun = hc.mode == RunMode.MULTIRUN
    return name, f"{task_name}:{hc.sweep.dir}" if multirun else task_name


def save_hydra_files(out: pathlib.Path, cfg: DictConfig) -> None:
    """Hydra's ``.hydra/{config,hydra,overrides}.yaml`` for the job in ``out``.

    conf/config.yaml turns Hydra's own saving off (``hydra.output_subdir: null``): Hydra saves
    before the job starts, so a rejected run would overwrite the files of the run in its dir.
    """
    from omegaconf import OmegaConf

    hc = _hydra_config()
    if hc is None:
        return
    directory = out / HYDRA_DIR
    directory.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, directory / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), directory / "hydra.yaml")
    OmegaConf.save(hc.overrides.task, directory / "overrides.yaml")


@contextlib.contextmanager
def _run_dir_lock(out: pathlib.Path) -> Iterator[None]:
    """An exclusive flock on the run dir itself (no file is written; the OS drops it when the
    process ends, even by SIGKILL), so a second run in the same dir stops at once instead of
    interleaving its files with the first one's. Without ``fcntl`` (Windows): no lock."""
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
    """While training, a first Ctrl-C (SIGINT) only asks to stop (the list it yields is then
    non-empty) and the run stops after the step: stopping inside one could leave a checkpoint
    half-written, or surface as an XLA error in a host callback. A second one stops at once."""
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
    """Trains and evaluates the experiment ``cfg``; returns ``cfg.optimized_metric`` (for a
    vectorized sweep: the best trial's).

    Writes into ``output_dir`` (default: Hydra's job dir): ``metrics.jsonl``, ``status.json``,
    ``run_config.json``, ``checkpoints/``, ``.hydra/`` and ``wandb/``. Rerunning with the same
    output dir resumes from its checkpoints when the config defines the same training; a dir
    whose run completed ``trainer.steps`` is left as it is. Raises :class:`ConfigError` (before
    writing anything) for a bad config or a dir another run is using,
    :class:`~fedjax_exp.experiment.errors.RunFailed` when training fails and
    :class:`~fedjax_exp.experiment.errors.RunInterrupted` on Ctrl-C.
    """
    if output_dir is None:
        hc = _hydra_config()
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
    """The run's writers (metrics.jsonl, W&B), one set per trial of a sweep."""
    from fedjax_exp.experiment import vectorized, writers

    name, group = _job_name_and_group(str(container.get("task_name", "train")))
    wandb_settings = (container.get("logger") or {}).get("wandb")
    members = []
    for trial in trials or [None]:
        directory, config, run_name = out, container, name
        if trial is not None:  # Its own run dir and W&B run, grouped under the sweep's name.
            directory = out / vectorized.TRIALS_DIR / trial.name
            config = vectorized.trial_config(container, trial)
            run_name = (
                f"{wandb_settings.get('name') or name}/{trial.name}" if wandb_settings else ""
            )
            group = (wandb_settings or {}).get("group") or name
            vectorized.write_trial_hydra_files(directory, config, trial)
        directory.mkdir(parents=True, exist_ok=True)
        jsonl = writers.JsonlWriter(directory, clock, resume_step=start_step if resumed else None)
        parts = [jsonl, run_log.EvaluationLog(f"{trial.name}: " if trial is not None else "")]
        if wandb_settings:
            settings = {**wandb_settings, "name": None} if trial is not None else wandb_settings
            wandb_writer = writers.create_wandb_writer(
                settings,
                directory=directory,
                config=config,
                default_name=run_name,
                default_group=group,
            )
            parts += [wandb_writer] if wandb_writer is not None else []
        members.append(_Member(directory, writers.MultiWriter(parts), jsonl))
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
            reached = (
                f"; {run_log.format_metrics(completed_runs[0].final)}" if trials is None else ""
            )
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
    try:
        speed = parallel.speed_up(algorithm, trainer)
    except ValueError as e:
        raise ConfigError(str(e)) from e
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
        names = ", ".join(t.name for t in trials)
        described += f"; {len(trials)} trials in one program ({names})"
    parameters = run_log.count_parameters(algorithm.eval_params(state))
    log.info("%s; %s parameters; writing to %s", described, f"{parameters:,}", out)

    # From here on the run writes files; every exit path records how it ended.
    save_hydra_files(out, cfg)
    hc = _hydra_config()
    run_record.write(out, container, list(hc.overrides.task) if hc is not None else [])
    clock = loop.Clock(elapsed)
    members = _open_members(container, out, trials, start_step, source is not None, clock)
    sampled_eval = getattr(algorithm, "periodic_eval_batches", None)  # Federated runs.
    eval_batch_size = int(trainer["eval_batch_size"])
    evaluator = Evaluator(
        model,
        eval_splits,
        batch_size=eval_batch_size,
        num_batches=dict(trainer["eval_batches"]),
        periodic_batches=sampled_eval
        and sampled_eval(eval_splits, eval_batch_size, container["seed"]),
    )
    checkpointer = None
    step, outcome, error = start_step, "failed", None

    ctrl_c = contextlib.ExitStack()
    stop_requested = ctrl_c.enter_context(_ctrl_c_between_steps())

    def on_step(done: int) -> None:
        nonlocal step
        step = done
        if stop_requested:
            raise KeyboardInterrupt

    try:
        checkpointer = Checkpointer(own_checkpoints, keep=int(trainer["keep_checkpoints"]))
        settings = loop.LoopSettings(
            steps=int(trainer["steps"]),
            log_every=int(trainer["log_every"]),
            eval_every=int(trainer["eval_every"]),
            checkpoint_every=int(trainer["checkpoint_every"]),
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
        for index, member in enumerate(members):
            params = algorithm.eval_params(state, index)
            member.final = evaluator.final(params, "test")
            if "validation" in eval_splits:
                member.final.update(evaluator.final(params, "validation"))
            if trainer.get("per_client_eval"):
                limit = trainer.get("per_client_max_clients")
                summary, values = evaluator.per_client(params, "test", limit)
                member.final.update(summary)
                key = "final/per_client/test/histogram"
                member.writer.write_histogram(step, key, values.tolist())
            member.writer.write_scalars(step, member.final)
            member.writer.write_summary(member.final)
            member.error = f"Diverged: {diverged[index]}" if index in diverged else None
            label = f"trial {trials[index].name}: " if trials is not None else ""
            ended = f" ({member.error})" if member.error else ""
            metrics = run_log.format_metrics(member.final)
            log.info(
                "finished step %d after %.1f s of training: %s%s%s",
                step,
                clock(),
                label,
                metrics,
                ended,
            )
        outcome = "completed"
    except BaseException as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        kept = checkpointer.latest_step() if checkpointer is not None else None
        if isinstance(e, loop.Diverged) and checkpointer is not None:
            where = f"step {kept} in {own_checkpoints}" if kept is not None else "none"
            e.args = (f"{e}; last good checkpoint: {where}",)
            error = f"{type(e).__name__}: {e}"
        if isinstance(e, KeyboardInterrupt):
            outcome = "interrupted"
            error = f"interrupted at step {step} of {trainer['steps']} (SIGINT); " + (
                f"last checkpoint: step {kept}" if kept is not None else "no checkpoint yet"
            )
        run_log.note_in_log_file(error if outcome == "interrupted" else f"failed: {error}")
        for member in members:
            member.error = member.error or error
            member.jsonl.write_event(step, status=outcome, error=member.error)
        if outcome == "interrupted":
            raise RunInterrupted(error, kept) from None
        raise
    finally:
        ctrl_c.close()
        _finish(members, trials, out, step, outcome, error, checkpointer)
    return _optimized_metric(container, members)


def _end_run(actions: list[Callable[[], None]], failed: bool) -> None:
    """Runs every clean-up action, even when one fails. A clean-up error is logged when the run
    failed (it must not hide why), else the first one is raised after the others ran."""
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

    completed = outcome == "completed"
    actions = []
    for m in members:
        status = "failed" if completed and m.error is not None else outcome
        actions.append(
            functools.partial(
                write_status, m.directory, status=status, step=step, error=m.error, final=m.final
            )
        )
    if trials is not None:
        listed = [
            {
                "name": t.name,
                "learning_rate": t.learning_rate,
                "seed": t.seed,
                "dir": str(m.directory.relative_to(out)),
                "error": m.error,
            }
            for t, m in zip(trials, members, strict=True)
        ]
        actions.append(
            functools.partial(
                write_status, out, status=outcome, step=step, error=error, trials=listed
            )
        )
    if checkpointer is not None:
        actions.append(checkpointer.close)
    for m in members:
        actions.append(functools.partial(m.writer.close, 0 if completed and m.error is None else 1))
    _end_run(actions, failed=not completed)


def _optimized_metric(container: dict[str, Any], runs: list[_Member]) -> float:
    """``optimized_metric`` of the run, or the best over a sweep's trials that completed."""
    from fedjax_exp.experiment.compare import lower_is_better

    key = container.get("optimized_metric")
    if key is None:
        return float("nan")
    if all(key not in m.final for m in runs):
        raise ConfigError(f"optimized_metric={key!r} was not computed; got {sorted(runs[0].final)}")
    values = [m.final[key] for m in runs if m.error is None and key in m.final]
    values = [v for v in values if v == v] or [float("nan")]
    return min(values) if lower_is_better(str(key)) else max(values)
