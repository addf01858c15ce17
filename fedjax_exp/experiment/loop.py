"""The training loop: steps an :class:`~fedjax_exp.experiment.algorithms.Algorithm` and runs
the periodic actions (log, evaluate, checkpoint) around it.

Per-step work is dispatch only: step outputs stay on the device and are read back (one host
sync) when they are logged, when the state is checkpointed, and at the end. An algorithm may
train several trials side by side (a vectorized sweep): each trial has its own writer, its own
evaluation and its own divergence; the run stops when every trial has diverged.
"""

from __future__ import annotations

import dataclasses
import itertools
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
    ``per_dispatch``, ending at every multiple of the positive ``intervals`` (so the loop
    observes the state exactly at those steps)."""
    if per_dispatch < 1:
        raise ValueError(
            f"trainer.steps_per_dispatch must be a positive integer, got {per_dispatch}"
        )
    every = [i for i in intervals if i and i > 0]
    sizes, step = [], start
    while step < stop:
        end = min([stop, step + per_dispatch] + [(step // i + 1) * i for i in every])
        sizes.append(end - step)
        step = end
    return sizes


class Clock:
    """Seconds of training so far, including time before a resume."""

    def __init__(self, elapsed: float = 0.0):
        self._offset = elapsed
        self._start = time.monotonic()

    def __call__(self) -> float:
        return self._offset + time.monotonic() - self._start


class Diverged(RunFailed):
    """The loss or the parameters became NaN or infinite (at ``step``)."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step

    def __reduce__(self) -> tuple[Any, ...]:
        # Parallel launchers (joblib, submitit) pickle a failed job's exception back to the
        # sweep; the default reduction would call __init__ with the message only.
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
    """Runs steps ``start_step + 1 .. settings.steps``.

    Returns (final state, last step, {trial: why it diverged}). ``writers`` has one writer
    per trial. ``rng`` is the run's base key (per trial, stacked, for several); step ``k``
    uses ``fold_in(rng, k)`` and the data stream starts at position ``start_step``, so a
    resumed run equals an uninterrupted one. A trial diverges on a non-finite training loss
    or parameters; when all have, :class:`Diverged` is raised (the last checkpoint is then
    one that was still finite).
    """
    from tqdm.auto import tqdm

    trials = algorithm.num_trials
    if len(writers) != trials:
        raise ValueError(f"{trials} trials need {trials} writers, got {len(writers)}")
    intervals = [settings.log_every]
    intervals += [settings.eval_every] if evaluator is not None else []
    intervals += [settings.checkpoint_every] if checkpointer is not None else []
    sizes = chunk_sizes(start_step, settings.steps, settings.steps_per_dispatch, intervals)
    stream = algorithm.data_stream(seed, start_step) if sizes else iter(())
    pending: dict[str, list[jax.Array]] = {}
    diverged: dict[int, str] = {}
    step = last_logged = start_step

    def diverge(trial: int, why: str) -> None:
        diverged.setdefault(trial, f"training diverged: {why}")
        if len(diverged) == trials:
            raise Diverged(diverged[trial], step)

    def log_pending() -> None:
        nonlocal last_logged
        if step == last_logged:
            return
        first, last_logged = last_logged + 1, step
        means_per_trial = _pop_means(pending, trials)
        host = getattr(algorithm, "logged_scalars", None)  # e.g. DP's privacy spent so far.
        for trial, (means, writer) in enumerate(zip(means_per_trial, writers, strict=True)):
            means.update(host(step) if host is not None else {})
            writer.write_scalars(step, means)
            if trials == 1 and "train/loss" in means:
                progress.set_postfix(loss=f"{means['train/loss']:.4f}", refresh=False)
            bad = ", ".join(f"{k}={v}" for k, v in means.items() if not math.isfinite(v))
            if bad and trial not in diverged:
                diverge(
                    trial,
                    f"non-finite {bad} (mean over steps {first}..{step}); "
                    "lower optimizer.learning_rate or check the data",
                )

    def check_params() -> None:
        # Never save a diverged state: the last checkpoint must be a good one.
        for trial in range(trials):
            if trial not in diverged and not all_finite(algorithm.eval_params(state, trial)):
                diverge(
                    trial,
                    f"non-finite parameters after step {step}; "
                    "lower optimizer.learning_rate or check the data",
                )

    progress = tqdm(
        total=settings.steps,
        initial=start_step,
        disable=not settings.progress_bar,
        desc="train",
        dynamic_ncols=True,
    )
    try:
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
                snapshot = Snapshot(
                    state=state, step=step, rng=np.asarray(rng), data_position=step, elapsed=clock()
                )
                checkpointer.save(snapshot)
        log_pending()
    finally:
        progress.close()
    return state, step, diverged
