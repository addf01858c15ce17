"""``run(cfg)``: one experiment from a composed config, start to finish.

Order matters for "nothing half-written": every check that can reject the config runs before
the first file of the run (metrics, status, checkpoints, W&B) is created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from omegaconf import DictConfig

from fedjax_exp.experiment import run_log, run_record
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.validation import check_writable_dir, validate_config

log = logging.getLogger(__name__)


def _hydra_job_info(cfg_task_name: str) -> tuple[str, str]:
    """(run name, W&B group) from Hydra's runtime config, or ``cfg_task_name`` for both.

    The name is the job's overrides; in a multirun the group names the sweep dir, so that the
    jobs of one sweep are grouped together.
    """
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return cfg_task_name, cfg_task_name
    name = hc.job.override_dirname or cfg_task_name
    if hc.mode == RunMode.MULTIRUN:
        return name, f"{cfg_task_name}:{hc.sweep.dir}"
    return name, cfg_task_name


def _hydra_overrides() -> list[str]:
    """The job's command-line overrides (none outside a Hydra app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def _default_output_dir() -> str:
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.output_dir
    except ValueError as e:
        raise ConfigError(
            "no output dir: call run(cfg, output_dir=DIR) when not running under Hydra"
        ) from e


def _resume_source(resume: Any, own_dir: pathlib.Path) -> tuple[pathlib.Path, int | None] | None:
    """Where to resume from: (checkpoints dir, step or None for latest), or None for fresh."""
    from fedjax_exp.experiment.checkpoints import find_checkpoint_dir

    def has_checkpoints(d: pathlib.Path) -> bool:
        return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())

    if resume is True:
        return (own_dir, None) if has_checkpoints(own_dir) else None
    if resume is False or resume is None:
        if has_checkpoints(own_dir):
            raise ConfigError(
                f"{own_dir} already holds checkpoints and trainer.resume=false: resume with "
                "trainer.resume=true or pick a new hydra.run.dir"
            )
        return None
    directory, step = find_checkpoint_dir(resume)
    if not has_checkpoints(directory):
        raise ConfigError(
            f"trainer.resume={resume!r} holds no checkpoints: give a run dir with a checkpoints/ "
            "dir (or that dir, or one of its step dirs), or set trainer.resume=true to start "
            "fresh (and resume this run dir later)"
        )
    return directory, step


def _vectorize_spec(trainer: dict[str, Any]) -> dict[str, Any] | None:
    """``trainer.vectorize`` when it asks for a sweep (learning_rates or seeds set), else None."""
    spec = trainer.get("vectorize") or {}
    if not isinstance(spec, dict):
        raise ConfigError(
            f"trainer.vectorize must be a mapping with learning_rates and/or seeds, got {spec!r}"
        )
    unknown = sorted(set(spec) - {"learning_rates", "seeds"})
    if unknown:
        raise ConfigError(
            f"trainer.vectorize has unknown keys {unknown}; it takes learning_rates and seeds"
        )
    if spec.get("learning_rates") is None and spec.get("seeds") is None:
        return None
    return spec


def _check_speed_settings(trainer: dict[str, Any]) -> None:
    """The performance options of ``trainer`` (they never change what is computed)."""

    def bad(key: str, allowed: str) -> ConfigError:
        return ConfigError(f"trainer.{key} must be {allowed}, got {trainer.get(key)!r}")

    spd = trainer.get("steps_per_dispatch", "auto")
    if spd != "auto" and (isinstance(spd, bool) or not isinstance(spd, int) or spd < 1):
        raise bad("steps_per_dispatch", "a positive integer or auto")
    prefetch = trainer.get("prefetch", "auto")
    if prefetch != "auto" and (
        isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0
    ):
        raise bad("prefetch", "a non-negative integer (0: no background thread) or auto")
    for key in ("device_data", "data_parallel", "reuse_host_memory"):
        value = trainer.get(key, "auto")
        if value is not None and value != "auto" and not isinstance(value, bool):
            raise bad(key, "true, false or auto")
    cache = trainer.get("compilation_cache")
    if cache is not None and (not isinstance(cache, str) or not cache.strip()):
        raise bad("compilation_cache", "a directory path or null (no cache)")
    dtype = trainer.get("compute_dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise bad("compute_dtype", "float32, bfloat16 or float16")
    if trainer.get("data_parallel") is True and _vectorize_spec(trainer) is not None:
        raise ConfigError(
            "trainer.data_parallel=true and trainer.vectorize cannot be combined: a vectorized "
            "sweep runs on one device; set trainer.data_parallel=auto"
        )


def _end_run(actions: Sequence[tuple[str, Callable[[], None]]], failed: bool) -> None:
    """Runs every clean-up action of a run, even when one fails.

    When the run already failed, a clean-up error is logged as one line and the run's own
    error propagates (a clean-up error must not hide why the run failed); otherwise the first
    clean-up error is raised after the others ran.
    """
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


def run(cfg: DictConfig, output_dir: str | os.PathLike[str] | None = None) -> float:
    """Trains and evaluates the experiment ``cfg``; returns ``cfg.optimized_metric``.

    Writes into ``output_dir`` (default: Hydra's job dir): ``metrics.jsonl``, ``status.json``,
    ``run_config.json``, ``checkpoints/`` and ``wandb/``. Rerunning with the same output dir
    resumes from its checkpoints (when the config defines the same training, see
    :mod:`~fedjax_exp.experiment.run_record`). Raises :class:`ConfigError` (before writing
    anything) for a bad config, for a dir another run is using, and :class:`RunFailed` when
    training fails.
    """
    out = pathlib.Path(output_dir if output_dir is not None else _default_output_dir())
    problem = check_writable_dir(out)
    if problem is not None:
        raise ConfigError(f"cannot write the output dir {str(out)!r} ({problem}): choose another")
    container = validate_config(cfg)
    with _run_dir_lock(out):
        return _run_validated(cfg, container, out)


@contextlib.contextmanager
def _run_dir_lock(out: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive lock on the run dir itself (flock on the directory: no file is
    written, and the OS drops the lock when the process ends, even by SIGKILL), so that a
    second run started in the same dir stops at once instead of interleaving its checkpoints
    and metrics with the first one's. Without ``fcntl`` (Windows) there is no lock."""
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
            raise ConfigError(
                f"another run is using {out}: wait for it to end or use a new hydra.run.dir"
            ) from None
        except OSError as e:  # A file system without flock: run unlocked rather than not.
            log.warning("cannot lock the run dir %s (%s); running without the lock", out, e)
        yield
    finally:
        os.close(fd)  # Releases the lock.


def _run_validated(cfg: DictConfig, container: dict[str, Any], out: pathlib.Path) -> float:
    """:func:`run` once the config is validated and the run dir is this process's."""
    trainer = container["trainer"]
    _check_speed_settings(trainer)
    vectorize = _vectorize_spec(trainer)
    own_checkpoints = out / "checkpoints"
    source = _resume_source(trainer["resume"], own_checkpoints)
    if source is not None and source[0].resolve() == own_checkpoints.resolve():
        run_record.check_resumable(out, container)
    wandb_settings = (container.get("logger") or {}).get("wandb")
    use_wandb = bool(wandb_settings) and wandb_settings.get("mode", "offline") != "disabled"
    if use_wandb:
        from fedjax_exp.experiment.writers import import_in_background

        # Importing W&B takes ~1 s of the start-up; it overlaps JAX's import and data loading
        # here (importing writes nothing, so a config error found later leaves no W&B files).
        import_in_background("wandb")

    # Only now import JAX and the library (Hydra's parent process never gets here).
    import jax

    # JAX reports at INFO that it found no TPU; Hydra's job logging would print that.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    import numpy as np

    from fedjax_exp.experiment import (
        builders,
        compilation_cache,
        loop,
        parallel,
        writers,
    )
    from fedjax_exp.experiment.checkpoints import Checkpointer
    from fedjax_exp.experiment.evaluation import Evaluator

    # Before anything large is allocated: data loading reuses freed blocks too.
    parallel.configure_host_memory(trainer, jax.default_backend())
    # Before anything is compiled: JAX sets its cache up at the first compilation.
    compilation_cache.enable(trainer.get("compilation_cache"))
    name, group = _hydra_job_info(str(container.get("task_name", "train")))
    if vectorize is not None:
        from fedjax_exp.experiment import vectorized

        return vectorized.run_sweep(
            cfg, container, out, source, run_name=name, overrides=_hydra_overrides()
        )

    model, train_model, train_data, test_data = builders.build_model_and_data(cfg)
    optimizer = builders.build_optimizer(cfg)
    algorithm = builders.build_algorithm(cfg, train_model, optimizer, train_data)
    try:
        algorithm, speed = parallel.speed_up(algorithm, trainer)
    except ValueError as e:
        raise ConfigError(str(e)) from e

    seed = int(container["seed"])
    rng = jax.random.PRNGKey(seed)
    init_rng, train_rng = jax.random.split(rng)
    state = algorithm.init(init_rng)
    start_step, elapsed = 0, 0.0
    if source is not None:
        source_dir, source_step = source
        reader = Checkpointer(source_dir, keep=int(trainer["keep_checkpoints"]))
        snapshot = reader.restore(state, np.asarray(train_rng), source_step)
        reader.close()
        state, start_step, elapsed = snapshot.state, snapshot.step, snapshot.elapsed
        train_rng = jax.numpy.asarray(snapshot.rng)
        log.info("resuming from %s at step %d", source_dir, start_step)
    if start_step > trainer["steps"]:
        raise ConfigError(
            f"the checkpoint is at step {start_step}, beyond trainer.steps={trainer['steps']}: "
            "raise trainer.steps or start a new run dir"
        )

    log.info(
        "%s; %s parameters; writing to %s",
        run_log.describe(container, start_step, speed.steps_per_dispatch),
        f"{run_log.count_parameters(algorithm.eval_params(state)):,}",
        out,
    )
    # From here on the run writes files; every exit path records how it ended.
    run_record.write(out, container, _hydra_overrides())
    clock = loop.Clock(elapsed)
    jsonl = writers.JsonlWriter(out, clock, resume_step=start_step if source else None)
    all_writers: list[Any] = [jsonl]
    if use_wandb:
        # W&B starts (its service, its files) on a background thread while the step compiles
        # and trains; its writer buffers until then and falls back to local logging with a
        # warning if the start fails.
        all_writers.append(
            writers.BackgroundWandbWriter(
                wandb_settings,
                directory=out,
                config=container,
                default_name=name,
                default_group=group,
            )
        )
    writer = writers.MultiWriter(all_writers)
    evaluator = Evaluator(
        model,
        {"train": train_data, "test": test_data},
        batch_size=int(trainer["eval_batch_size"]),
        num_batches=dict(trainer["eval_batches"]),
    )
    try:
        checkpointer = Checkpointer(own_checkpoints, keep=int(trainer["keep_checkpoints"]))
    except BaseException:
        writer.close(1)
        raise

    settings = loop.LoopSettings(
        steps=int(trainer["steps"]),
        log_every=int(trainer["log_every"]),
        eval_every=int(trainer["eval_every"]),
        checkpoint_every=int(trainer["checkpoint_every"]),
        progress_bar=bool(trainer["progress_bar"]),
        steps_per_dispatch=speed.steps_per_dispatch,
        prefetch=speed.prefetch,
    )
    step, final, exit_code, error = start_step, {}, 1, None

    def on_step(done: int) -> None:
        nonlocal step
        step = done

    try:
        state, step = loop.train(
            algorithm,
            state,
            start_step=start_step,
            seed=seed,
            rng=train_rng,
            settings=settings,
            writer=writer,
            evaluator=evaluator,
            checkpointer=checkpointer,
            clock=clock,
            on_step=on_step,
        )
        params = algorithm.eval_params(state)
        final = evaluator.final(params, "test")
        if trainer.get("per_client_eval"):
            summary, values = evaluator.per_client(
                params, "test", trainer.get("per_client_max_clients")
            )
            final.update(summary)
            writer.write_histogram(step, "final/per_client/test/histogram", values.tolist())
        writer.write_scalars(step, final)
        writer.write_summary(final)
        exit_code = 0
        log.info(
            "finished step %d after %.1f s of training: %s",
            step,
            clock(),
            run_log.format_metrics(final),
        )
    except BaseException as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if isinstance(e, loop.Diverged):
            kept = checkpointer.latest_step()
            where = f"step {kept} in {own_checkpoints}" if kept is not None else "none"
            e.args = (f"{e}; last good checkpoint: {where}",)
            error = f"{type(e).__name__}: {e}"
        jsonl.write_event(step, status="failed", error=error)
        raise
    finally:
        _end_run(
            [
                (
                    "writing status.json",
                    lambda: writers.write_status(
                        out,
                        status="completed" if exit_code == 0 else "failed",
                        step=step,
                        error=error,
                        final=final,
                    ),
                ),
                ("closing the checkpointer", checkpointer.close),
                ("closing the metric writers", lambda: writer.close(exit_code)),
            ],
            failed=exit_code != 0,
        )
    key = container.get("optimized_metric")
    if key is None:
        return float("nan")
    if key not in final:
        raise ConfigError(f"optimized_metric={key!r} was not computed; got {sorted(final)}")
    return float(final[key])
