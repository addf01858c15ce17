"""The training loop: steps an :class:`~fedjax_exp.experiment.algorithms.Algorithm` and runs
the periodic actions (log, evaluate, checkpoint) around it.

Per-step work is dispatch only: step outputs stay on the device and are read back (one host
sync) when they are logged, when the state is checkpointed, and at the end.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    # Steps per dispatch (one lax.scan over that many batches when > 1) and chunks of inputs
    # prepared ahead on a background thread (0: in the loop's thread). Used when the algorithm
    # offers the fast path (``prepare`` + ``run_steps``).
    steps_per_dispatch: int = 1
    prefetch: int = 2


def due(step: int, every: int) -> bool:
    """Whether a periodic action with interval ``every`` (0 = never) runs after ``step``."""
    return every > 0 and step % every == 0


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


class _PendingScalars:
    """Device-side step scalars since the last read-back."""

    def __init__(self) -> None:
        self._values: dict[str, list[jax.Array]] = {}

    def add(self, scalars: Mapping[str, jax.Array]) -> None:
        for key, value in scalars.items():
            self._values.setdefault(key, []).append(value)

    def pop_means(self) -> dict[str, float]:
        """Means over the pending steps (the host sync), then forgets them."""
        # Values are per-step scalars or, from a multi-step dispatch, vectors of them. One
        # transfer, then NumPy: eager jnp ops here would compile a program per count of
        # pending values and cost a dispatch each, at every logging step.
        pending = jax.device_get({k: v for k, v in self._values.items() if v})
        self._values = {}
        return {
            k: float(np.mean(np.concatenate([np.ravel(x) for x in v]), dtype=np.float64))
            for k, v in pending.items()
        }


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return True
    # One compiled program for the whole state (eagerly: several per leaf shape).
    return bool(_leaves_finite(leaves))


def train(
    algorithm: Any,
    state: Any,
    *,
    start_step: int,
    seed: int,
    rng: jax.Array,
    settings: LoopSettings,
    writer: MetricWriter,
    evaluator: Evaluator | None,
    checkpointer: Checkpointer | None,
    clock: Clock,
    on_step: Callable[[int], None] | None = None,
) -> tuple[Any, int]:
    """Runs steps ``start_step + 1 .. settings.steps``; returns (final state, last step).

    ``rng`` is the run's base key (raw ``uint32`` key data); step ``k`` uses
    ``fold_in(rng, k)``, so a resumed run draws the same randomness as an uninterrupted one.
    The data stream starts at position ``start_step`` (one input per step). Raises
    :class:`Diverged` on a non-finite training loss or parameters, leaving the last
    checkpoint that was still finite.
    """
    from tqdm.auto import tqdm

    from fedjax_exp.experiment.pipeline import Prefetcher, chunk_sizes, prepared_chunks

    pending = _PendingScalars()
    step = start_step
    last_logged = start_step
    stream = algorithm.data_stream(seed, start_step) if settings.steps > start_step else iter(())
    fast = callable(getattr(algorithm, "run_steps", None)) and callable(
        getattr(algorithm, "prepare", None)
    )
    intervals = [settings.log_every]
    if evaluator is not None:
        intervals.append(settings.eval_every)
    if checkpointer is not None:
        intervals.append(settings.checkpoint_every)
    if fast:
        prepare, run_steps = algorithm.prepare, algorithm.run_steps
        per_dispatch, depth = settings.steps_per_dispatch, settings.prefetch
    else:
        # Protocol-only algorithms: one step per dispatch, keys derived by one small jitted
        # call, presented to the loop as chunks of one step.
        step_keys = jax.jit(lambda k: jax.random.fold_in(rng, k))

        def prepare(items: list[Any]) -> Any:
            return items[0]

        def run_steps(state: Any, inputs: Any, base_rng: jax.Array, first: int) -> Any:
            return algorithm.step(state, inputs, step_keys(first))

        per_dispatch, depth = 1, 0
    sizes = chunk_sizes(start_step, settings.steps, per_dispatch, intervals)
    chunks = Prefetcher(prepared_chunks(stream, sizes, prepare), depth=depth)

    def log_pending() -> None:
        nonlocal last_logged
        if step == last_logged:
            return
        means = {f"train/{k}": v for k, v in pending.pop_means().items()}
        first, last_logged = last_logged + 1, step
        writer.write_scalars(step, means)
        if "train/loss" in means:
            progress.set_postfix(loss=f"{means['train/loss']:.4f}", refresh=False)
        bad = {k: v for k, v in means.items() if not math.isfinite(v)}
        if bad:
            values = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise Diverged(
                f"training diverged: non-finite {values} (mean over steps {first}..{step}); "
                "lower optimizer.learning_rate or check the data",
                step,
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
            state, scalars = run_steps(state, next(chunks), rng, step + 1)
            step += size
            pending.add(scalars)
            progress.update(size)
            if on_step is not None:
                on_step(step)
            at_end = step == settings.steps
            if due(step, settings.log_every) or at_end:
                log_pending()
            if due(step, settings.eval_every) and evaluator is not None:
                writer.write_scalars(step, evaluator.periodic(algorithm.eval_params(state)))
            if checkpointer is not None and (due(step, settings.checkpoint_every) or at_end):
                # Never save a diverged state: the last checkpoint must be a good one.
                log_pending()
                if not _all_finite(algorithm.eval_params(state)):
                    raise Diverged(
                        f"training diverged: non-finite parameters after step {step}; "
                        "lower optimizer.learning_rate or check the data",
                        step,
                    )
                checkpointer.save(
                    Snapshot(
                        state=state,
                        step=step,
                        rng=np.asarray(rng),
                        data_position=step,
                        elapsed=clock(),
                    )
                )
        log_pending()
    finally:
        chunks.close()
        progress.close()
    return state, step
