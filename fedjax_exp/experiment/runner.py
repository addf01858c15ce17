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
import logging
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

from omegaconf import DictConfig

from fedjax_exp.experiment import run_log, run_record
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_files import CHECKPOINTS_DIR, HYDRA_DIR
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


def run(cfg: DictConfig, output_dir: str | os.PathLike[str] | None = None) -> float:
    """Trains and evaluates the experiment ``cfg``; returns ``cfg.optimized_metric`` (for a
    vectorized sweep: the best trial's).

    Writes into ``output_dir`` (default: Hydra's job dir): ``metrics.jsonl``, ``status.json``,
    ``run_config.json``, ``checkpoints/``, ``.hydra/`` and ``wandb/``. Rerunning with the same
    output dir resumes from its checkpoints when the config defines the same training. Raises
    :class:`ConfigError` (before writing anything) for a bad config or a dir another run is
    using, and :class:`~fedjax_exp.experiment.errors.RunFailed` when training fails.
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
        parts = [jsonl]
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

    # Only now import JAX and the library (Hydra's parent process never gets here).
    import jax
    import numpy as np

    # JAX reports at INFO that it found no TPU; Hydra's job logging would print that.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from fedjax_exp.experiment import builders, compilation_cache, loop, parallel
    from fedjax_exp.experiment.checkpoints import Checkpointer
    from fedjax_exp.experiment.evaluation import Evaluator

    # Before anything large is allocated / compiled (see docs/performance-notes.md).
    parallel.configure_host_memory(trainer, jax.default_backend())
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
        reader = Checkpointer(source[0], keep=int(trainer["keep_checkpoints"]))
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
    step, completed, error = start_step, False, None

    def on_step(done: int) -> None:
        nonlocal step
        step = done

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
        completed = True
    except BaseException as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if isinstance(e, loop.Diverged) and checkpointer is not None:
            kept = checkpointer.latest_step()
            where = f"step {kept} in {own_checkpoints}" if kept is not None else "none"
            e.args = (f"{e}; last good checkpoint: {where}",)
            error = f"{type(e).__name__}: {e}"
        for member in members:
            member.error = member.error or error
            member.jsonl.write_event(step, status="failed", error=member.error)
        raise
    finally:
        _finish(members, trials, out, step, completed, error, checkpointer)
    return _optimized_metric(container, members)


def _end_run(actions: list[tuple[str, Callable[[], None]]], failed: bool) -> None:
    """Runs every clean-up action of a run, even when one fails. When the run failed, a
    clean-up error is logged (it must not hide why the run failed); else the first one is
    raised after the others ran."""
    first: BaseException | None = None
    for what, action in actions:
        try:
            action()
        except Exception as e:  # noqa: BLE001 - the remaining actions must still run.
            if failed or first is not None:
                log.warning("%s failed (%s: %s)", what, type(e).__name__, e)
            else:
                first = e
    if first is not None:
        raise first


def _finish(members, trials, out, step, completed, error, checkpointer) -> None:
    """Writes each run's status.json (and a sweep's own), then closes everything."""
    from fedjax_exp.experiment import writers

    def status(ok: bool) -> str:
        return "completed" if ok else "failed"

    actions = []
    for m in members:
        ok = completed and m.error is None
        write = functools.partial(writers.write_status, m.directory, status=status(ok))
        actions.append(
            (
                "writing status.json",
                functools.partial(write, step=step, error=m.error, final=m.final),
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
        write = functools.partial(writers.write_status, out, status=status(completed), step=step)
        actions.append(
            (
                "writing the sweep's status.json",
                functools.partial(write, error=error, trials=listed),
            )
        )
    if checkpointer is not None:
        actions.append(("closing the checkpointer", checkpointer.close))
    for m in members:
        code = 0 if completed and m.error is None else 1
        actions.append(("closing the metric writers", functools.partial(m.writer.close, code)))
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
