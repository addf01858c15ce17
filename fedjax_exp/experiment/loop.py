"""The training loop: steps an :class:`~fedjax_exp.experiment.algorithms.Algorithm` and runs
the periodic actions (log, evaluate, checkpoint) around it. Step outputs stay on the device
until logged or checkpointed. Each trial of a sweep has its own writer, evaluation and
divergence; the run stops when every trial has diverged."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.experiment.algorithms import Algorithm
from fedjax_exp.experiment.checkpoints import Checkpointer, Snapshot
from fedjax_exp.experiment.errors import RunFailed
from fedjax_exp.experiment.evaluation import Evaluator
from fedjax_exp.experiment.writers import MetricWriter
from fedjax_exp.training import console

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """When things happen; intervals of 0 mean never (checkpoints: only at the end)."""

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    progress_bar: bool = True
    steps_per_dispatch: int = 1  # > 1: that many steps as one lax.scan program.


def due(step: int, every: int) -> bool:
    """Whether a periodic action with interval ``every`` (0 = never) runs after ``step``."""
    return every > 0 and step % every == 0


def chunk_sizes(start: int, stop: int, per_dispatch: int, intervals: Iterable[int]) -> list[int]:
    """Sizes of the dispatches covering steps ``start + 1 .. stop``: each at most
    ``per_dispatch``, ending at every multiple of the positive ``intervals``."""
    if per_dispatch < 1:
        raise ValueError(f"trainer.steps_per_dispatch must be a positive integer: {per_dispatch}")
    every = [i for i in intervals if i and i > 0]
    sizes, step = [], start
    while step < stop:
        end = min([stop, step + per_dispatch] + [(step // i + 1) * i for i in every])
        sizes.append(end - step)
        step = end
    return sizes


def parallel_job_label() -> str | None:
    """``job 3 (seed=1)`` in a sweep job running beside others (a launcher other than Hydra's
    basic one), else None."""
    from hydra.types import RunMode

    from fedjax_exp.experiment.run_log import hydra_config

    hc = hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    if "BasicLauncher" in str(hc.launcher.get("_target_")):
        return None
    return f"job {hc.job.num} ({hc.job.override_dirname})"  # A swept job has overrides.


class Clock:
    """Seconds of training so far, including time before a resume."""

    def __init__(self, elapsed: float = 0.0):
        self._offset = elapsed
        self._start = time.monotonic()

    def __call__(self) -> float:
        return self._offset + time.monotonic() - self._start


class Diverged(RunFailed):
    """The loss or the parameters became NaN or infinite (at ``step``); picklable with its
    step for the parallel launchers that send a failed job's exception back."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.step)


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
    """Whether every floating leaf of ``tree`` is finite (one compiled program, one sync)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return not leaves or bool(_leaves_finite(leaves))


def _pop_means(pending: dict[str, list[jax.Array]], trials: int) -> list[dict[str, float]]:
    """Per trial, the means of the pending step scalars (the host sync); empties ``pending``."""
    # One transfer, then NumPy: eager jnp ops would compile a program per count of values.
    host = jax.device_get(pending)
    pending.clear()
    means = {
        k: np.mean(np.concatenate(v), axis=0, dtype=np.float64).reshape(trials)
        for k, v in host.items()
    }
    return [{f"train/{k}": float(v[t]) for k, v in means.items()} for t in range(trials)]


def train(
    algorithm: Algorithm,
    state: Any,
    *,
    start_step: int,
    seed: int,
    rng: jax.Array,
    settings: LoopSettings,
    writers: Sequence[MetricWriter],
    evaluator: Evaluator | None,
    checkpointer: Checkpointer | None,
    clock: Clock,
    on_step: Callable[[int], None] | None = None,
) -> tuple[Any, int, dict[int, str]]:
    """Runs steps ``start_step + 1 .. settings.steps`` (one writer per trial); returns (final
    state, last step, {trial: why it diverged}). Step ``k`` uses ``fold_in(rng, k)`` and the
    data from position ``start_step``, so a resumed run equals an uninterrupted one. When
    every trial has diverged, :class:`Diverged` is raised; no diverged state is saved."""
    from tqdm.auto import tqdm

    trials = algorithm.num_trials
    start_loss: list[float] = []  # Per trial: the loss of the first step (inf once warned).
    intervals = [settings.log_every]
    intervals += [settings.eval_every] if evaluator is not None else []
    intervals += [settings.checkpoint_every] if checkpointer is not None else []
    sizes = chunk_sizes(start_step, settings.steps, settings.steps_per_dispatch, intervals)
    stream = algorithm.data_stream(seed, start_step) if sizes else iter(())
    pending: dict[str, list[jax.Array]] = {}
    diverged: dict[int, str] = {}
    step = last_logged = start_step

    def diverge(trial: int, why: str) -> None:
        fix = "lower optimizer.learning_rate or check the data"
        diverged.setdefault(trial, f"training diverged: {why}; {fix}")
        if len(diverged) == trials:
            raise Diverged(diverged[trial], step)

    def log_pending() -> None:
        nonlocal last_logged
        if step == last_logged:
            return
        first, last_logged = last_logged + 1, step
        if not start_loss and "loss" in pending:  # Steps x trials values; one sync a run.
            start_loss.extend(np.asarray(pending["loss"][0]).reshape(-1, trials)[0].tolist())
        means_per_trial = _pop_means(pending, trials)
        host = algorithm.logged_scalars(step)  # Once for all trials: e.g. DP's accounting.
        for trial, (means, writer) in enumerate(zip(means_per_trial, writers, strict=True)):
            means.update(host)
            writer.write_scalars(step, means)
            loss = means.get("train/loss", math.nan)
            if trials == 1 and "train/loss" in means:
                progress.set_postfix(loss=console.format_loss(loss), refresh=False)
            start = (start_step + 1, start_loss[trial] if start_loss else math.nan)
            if warning := console.loss_growth_warning(start, step, loss):
                start_loss[trial] = math.inf  # One warning a run.
                log.warning("%s%s", f"trial {trial}: " if trials > 1 else "", warning)
            bad = ", ".join(f"{k}={v}" for k, v in means.items() if not math.isfinite(v))
            if bad and trial not in diverged:
                diverge(trial, f"non-finite {bad} (mean over steps {first}..{step})")

    def check_params() -> None:
        # Never save a diverged state: the last checkpoint must be a good one.
        for trial in range(trials):
            if trial not in diverged and not all_finite(algorithm.eval_params(state, trial)):
                diverge(trial, f"non-finite parameters after step {step}")

    progress = tqdm(
        total=settings.steps,
        initial=start_step,
        # Bars of jobs running side by side would overwrite each other on one terminal.
        disable=not settings.progress_bar or parallel_job_label() is not None,
        desc="train",
        dynamic_ncols=True,
    )
    with progress, console.logs_above(progress):
        for size in sizes:
            items = list(itertools.islice(stream, size))
            if len(items) != size:
                raise RuntimeError(f"the data stream ended early: wanted {size} inputs")
            state, scalars = algorithm.run_steps(state, algorithm.prepare(items), rng, step + 1)
            step += size
            for key, value in scalars.items():
                pending.setdefault(key, []).append(value)
            progress.update(size)
            if on_step is not None:
                on_step(step)
            at_end = step == settings.steps
            if due(step, settings.log_every) or at_end:
                log_pending()
            if evaluator is not None and due(step, settings.eval_every):
                for trial, writer in enumerate(writers):
                    params = algorithm.eval_params(state, trial)
                    writer.write_scalars(step, evaluator.periodic(params))
            if checkpointer is not None and (due(step, settings.checkpoint_every) or at_end):
                log_pending()
                check_params()
                checkpointer.save(Snapshot(state, step, np.asarray(rng), step, clock()))
        log_pending()
    return state, step, diverged
