"""Vectorized sweeps: several trials (learning rates x seeds) trained as ONE compiled program.

A sweep of ``T`` trials that differ only in learning rate and/or seed has the same shapes in
every trial, so instead of ``T`` runs (``T`` compilations, ``T`` dispatches per step) the
train step is ``jax.vmap`` ped over a leading trial axis of the state:

- the learning rate lives in the optimizer state (:func:`learning_rate_in_state`, the same
  idea as ``optax.inject_hyperparams``), so it is an ordinary vmapped array;
- each trial's initial state comes from its own seed, exactly as a lone run would make it;
- trials with different seeds draw their own shuffled batches: the host stacks one batch per
  distinct seed and each trial picks its own inside the step (trials sharing a seed share
  the batch, which a learning-rate sweep then transfers once per step, not ``T`` times);
- step ``k`` of trial ``t`` uses ``fold_in(train_key[t], k)``, derived inside the step.

Each trial is logged as its own run under ``<run dir>/trials/<name>/`` (``metrics.jsonl``,
``status.json``, ``.hydra/config.yaml`` with that trial's learning rate and seed), so the
comparison report and W&B see ``T`` ordinary runs. Results equal those of running each trial
alone up to floating-point reassociation of the batched arithmetic (see the tests).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.typing import Params, PRNGKey
from fedjax_exp.experiment import algorithms, pipeline, run_log, run_record
from fedjax_exp.experiment.errors import ConfigError

log = logging.getLogger(__name__)

TRIALS_DIR = "trials"


# ---------------------------------------------------------------------------------------------
# The learning rate as optimizer state


@dataclass
class LearningRateState:
    """Optimizer state carrying its own learning rate (a float32 scalar, vmappable)."""

    learning_rate: jax.Array
    inner: Any


def learning_rate_in_state(make_optimizer: Callable[[Any], Any], learning_rate: float) -> Any:
    """An :class:`~fedjax_exp.core.optimizers.Optimizer` whose learning rate is in its state.

    ``make_optimizer(lr)`` builds the underlying optimizer (e.g. ``lambda lr: adam(lr)``); it
    is called again inside ``apply`` with the learning rate read from the state, which may be
    a traced (vmapped) array. The arithmetic is that of ``make_optimizer(learning_rate)``.
    """
    from fedjax_exp.core.optimizers import Optimizer

    def init(params: Params) -> LearningRateState:
        lr = jnp.asarray(learning_rate, jnp.float32)
        return LearningRateState(learning_rate=lr, inner=make_optimizer(learning_rate).init(params))

    def apply(grads: Params, state: LearningRateState, params: Params) -> tuple[Any, Params]:
        inner, params = make_optimizer(state.learning_rate).apply(grads, state.inner, params)
        return LearningRateState(learning_rate=state.learning_rate, inner=inner), params

    return Optimizer(init=init, apply=apply)


# ---------------------------------------------------------------------------------------------
# Trials


@dataclasses.dataclass(frozen=True)
class Trial:
    """One member of a vectorized sweep."""

    learning_rate: float
    seed: int
    name: str  # Its directory under trials/, e.g. "lr=0.001,seed=0".


def _check_list(key: str, values: Any) -> list[Any] | None:
    if values is None:
        return None
    if not isinstance(values, Sequence) or isinstance(values, str) or not values:
        raise ConfigError(f"{key} must be a non-empty list, got {values!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{key} has duplicates: {list(values)}; list each value once")
    return list(values)


def expand_trials(
    learning_rates: Sequence[float] | None,
    seeds: Sequence[int] | None,
    default_learning_rate: float | None,
    default_seed: int,
) -> list[Trial]:
    """The trials of a sweep: every learning rate with every seed (defaults where omitted).

    Raises:
      ConfigError: empty or duplicated lists, non-positive learning rates, negative or
        non-integer seeds, or learning rates given while the optimizer has none.
    """
    lrs = _check_list("trainer.vectorize.learning_rates", learning_rates)
    seed_list = _check_list("trainer.vectorize.seeds", seeds)
    if lrs is None and seed_list is None:
        raise ConfigError(
            "trainer.vectorize needs learning_rates and/or seeds, e.g. "
            "trainer.vectorize.learning_rates=[1e-3,3e-3]"
        )
    for lr in lrs or []:
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
            raise ConfigError(
                f"trainer.vectorize.learning_rates must be positive numbers, got {lr!r}"
            )
    for s in seed_list or []:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"trainer.vectorize.seeds must be non-negative integers, got {s!r}")
    if lrs is None:
        if default_learning_rate is None:
            raise ConfigError("the optimizer has no learning_rate to sweep over")
        lrs = [default_learning_rate]
    seed_list = seed_list if seed_list is not None else [default_seed]
    trials = []
    for lr, seed in itertools.product(lrs, seed_list):
        parts = []
        if learning_rates is not None:
            parts.append(f"lr={float(lr):g}")
        if seeds is not None:
            parts.append(f"seed={seed}")
        trials.append(Trial(learning_rate=float(lr), seed=int(seed), name=",".join(parts)))
    return trials


def trial_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init key, train key) of a run with ``seed``: the runner's own derivation."""
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    return init_rng, train_rng


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks equally shaped pytrees along a new leading (trial) axis (on the device).

    The stacking runs on the host: ``jnp.stack`` would compile one program per leaf shape
    (0.3 s of a logistic sweep's start-up on the 2-core CPU) to copy a few arrays once.
    """
    host = jax.device_get(trees)
    return jax.device_put(jax.tree_util.tree_map(lambda *xs: np.stack(xs), *host))


def unstack_tree(tree: Any, index: int) -> Any:
    """Trial ``index`` of a stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[index], tree)


# ---------------------------------------------------------------------------------------------
# The vectorized step and data


def vectorized_steps(
    update: Callable[[Any, Any, PRNGKey], tuple[Any, Mapping[str, jax.Array]]],
    num_steps: int = 1,
    shared_batch: bool = False,
    gather: Callable[[Any, Any], Any] | None = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """``num_steps`` vectorized steps as one jitted dispatch.

    The result is ``run(states, block, seed_index, train_keys, first_step, columns) ->
    (states, {name: (num_steps, T)})``. ``block`` stacks one input per step; each input holds
    one batch (or, with ``gather``, one row-index array into the device-resident ``columns``)
    per distinct seed along its leading axis. Trial ``t`` trains on input ``seed_index[t]``
    with key ``fold_in(train_keys[t], step)``. With ``shared_batch`` (a single seed) every
    trial takes input 0 unbatched, so XLA sees one batch against T parameter sets (one wide
    matmul) instead of T gathered copies. ``num_steps > 1`` runs a ``lax.scan``; the states
    are donated.
    """

    def one_trial(state: Any, batch: Any, key: jax.Array, step: jax.Array):
        return update(state, batch, jax.random.fold_in(key, step))

    def step_all(
        states: Any, inputs: Any, seed_index: jax.Array, keys: jax.Array, step: Any, columns: Any
    ):
        if shared_batch:
            inputs = jax.tree_util.tree_map(lambda x: x[0], inputs)
        batches = inputs if gather is None else gather(columns, inputs)
        if shared_batch:
            return jax.vmap(one_trial, in_axes=(0, None, 0, None))(states, batches, keys, step)
        batch = jax.tree_util.tree_map(lambda x: x[seed_index], batches)
        return jax.vmap(one_trial, in_axes=(0, 0, 0, None))(states, batch, keys, step)

    def run(
        states: Any,
        block: Any,
        seed_index: jax.Array,
        keys: jax.Array,
        first_step: Any,
        columns: Any,
    ):
        if num_steps == 1:
            inputs = jax.tree_util.tree_map(lambda x: x[0], block)
            states, scalars = step_all(states, inputs, seed_index, keys, first_step, columns)
            return states, jax.tree_util.tree_map(lambda x: x[None], dict(scalars))

        def body(states: Any, xs: tuple[Any, jax.Array]) -> Any:
            return step_all(states, xs[0], seed_index, keys, xs[1], columns)

        steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
        return jax.lax.scan(body, states, (block, steps))

    return jax.jit(run, donate_argnums=0)


def stacked_batches(
    streams: Sequence[Iterator[Mapping[str, np.ndarray]]],
) -> Iterator[dict[str, np.ndarray]]:
    """One batch from each stream per step, stacked along a new leading axis."""
    for batches in zip(*streams, strict=False):
        yield {k: np.stack([b[k] for b in batches]) for k in batches[0]}


class VectorizedTraining:
    """Trains ``trials`` of ``make_algorithm(optimizer)`` in lockstep.

    ``make_algorithm(optimizer)`` builds the run's algorithm (it must expose the pure
    ``update(state, batch, rng)`` and the :class:`~fedjax_exp.experiment.algorithms.Algorithm`
    methods); ``make_optimizer(lr)`` the run's optimizer at a learning rate.
    """

    def __init__(
        self,
        make_algorithm: Callable[[Any], Any],
        make_optimizer: Callable[[Any], Any],
        trials: Sequence[Trial],
    ):
        if not trials:
            raise ValueError("a vectorized sweep needs at least one trial")
        self.trials = list(trials)
        self.algorithms = [
            make_algorithm(learning_rate_in_state(make_optimizer, t.learning_rate)) for t in trials
        ]
        if not callable(getattr(self.algorithms[0], "update", None)):
            raise ConfigError(
                f"{type(self.algorithms[0]).__name__} has no pure update(state, batch, rng); "
                "trainer.vectorize supports algorithm=centralized"
            )
        self.seeds = sorted({t.seed for t in trials})
        self.seed_index = jnp.asarray([self.seeds.index(t.seed) for t in trials], jnp.int32)
        self.train_keys = jnp.stack([trial_keys(t.seed)[1] for t in trials])
        self.device_columns: dict[str, jax.Array] | None = None
        self._runs: dict[int, Callable[..., Any]] = {}

    # ---- what the engine's speed settings look at (parallel.resolve_for_algorithm) ----

    @property
    def train_data(self) -> Any:
        return self.algorithms[0].train_data

    def device_data_supported(self) -> bool:
        return self.algorithms[0].device_data_supported()

    def uses_convolution(self) -> bool | None:
        return self.algorithms[0].uses_convolution()

    def enable_device_data(self) -> None:
        """Puts the train columns on the device once, shared by all trials; the stream then
        yields row indices (one array per distinct seed), gathered inside the step.

        Raises:
          ValueError: the train data is not an in-memory column store.
        """
        first = self.algorithms[0]
        first.enable_device_data()
        self.device_columns = first.device_columns
        self._runs = {}

    def init(self) -> Any:
        """The stacked initial states, each made exactly as a lone run makes it."""
        return stack_trees(
            [
                alg.init(trial_keys(t.seed)[0])
                for alg, t in zip(self.algorithms, self.trials, strict=True)
            ]
        )

    def data_stream(self, start: int) -> Iterator[Any]:
        """Per step: one batch (or, with device data, one row-index array) per distinct seed,
        stacked (leading axis = ``self.seeds``)."""
        streams = [self.algorithms[0].data_stream(seed, start) for seed in self.seeds]
        if self.device_columns is not None:
            return (np.stack(indices) for indices in zip(*streams, strict=False))
        return stacked_batches(streams)

    def run_steps(
        self, states: Any, items: Sequence[Any], first_step: int
    ) -> tuple[Any, dict[str, jax.Array]]:
        """Steps ``first_step, first_step + 1, ...``, one per item of :meth:`data_stream`, as
        one dispatch; returns the states and ``{name: (len(items), T)}`` step scalars."""
        run = self._runs.get(len(items))
        if run is None:
            gather = algorithms.gather_rows if self.device_columns is not None else None
            run = self._runs[len(items)] = vectorized_steps(
                self.algorithms[0].update, len(items), len(self.seeds) == 1, gather
            )
        block = jax.device_put(algorithms.stack_inputs(items))
        first = np.int32(first_step)
        return run(states, block, self.seed_index, self.train_keys, first, self.device_columns)

    def step(self, states: Any, inputs: Any, step: int) -> tuple[Any, dict[str, jax.Array]]:
        """One step: ``(states, {name: (T,)})``."""
        states, scalars = self.run_steps(states, [inputs], step)
        return states, {k: v[0] for k, v in scalars.items()}

    def eval_params(self, states: Any, index: int) -> Params:
        return self.algorithms[index].eval_params(unstack_tree(states, index))


def _pop_trial_means(pending: dict[str, list[jax.Array]]) -> dict[str, np.ndarray]:
    """Per-trial means ``{name: (T,)}`` of the pending ``(steps, T)`` step scalars (the host
    sync); empties ``pending``."""
    # One transfer, then NumPy (eager jnp ops would compile per count of pending values).
    host = jax.device_get({k: v for k, v in pending.items() if v})
    pending.clear()
    return {k: np.mean(np.concatenate(v), axis=0, dtype=np.float64) for k, v in host.items()}


def train_steps(
    training: VectorizedTraining,
    states: Any,
    start_step: int,
    num_steps: int,
    on_log: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    log_every: int = 0,
    steps_per_dispatch: int = 1,
) -> Any:
    """Runs steps ``start_step + 1 .. num_steps``, ``steps_per_dispatch`` per dispatch;
    ``on_log(step, {name: (T,) means})``."""
    stream = training.data_stream(start_step)
    pending: dict[str, list[jax.Array]] = {}
    step = start_step
    for size in pipeline.chunk_sizes(start_step, num_steps, steps_per_dispatch, (log_every,)):
        items = list(itertools.islice(stream, size))
        states, scalars = training.run_steps(states, items, step + 1)
        for key, value in scalars.items():
            pending.setdefault(key, []).append(value)
        step += size
        if on_log is not None and ((log_every > 0 and step % log_every == 0) or step == num_steps):
            on_log(step, _pop_trial_means(pending))
    return states


# ---------------------------------------------------------------------------------------------
# The runner's sweep mode


def make_optimizer_factory(cfg: Any) -> Callable[[Any], Any]:
    """``lr -> Optimizer`` from ``cfg.optimizer`` (its ``_target_`` with the other settings).

    Raises:
      ConfigError: the optimizer follows a schedule (its rate is not one number to sweep).
    """
    from omegaconf import OmegaConf

    from fedjax_exp.experiment.validation import locate

    settings = OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert isinstance(settings, dict)
    schedule = settings.pop("schedule", None) or {}
    if schedule.get("_target_"):
        raise ConfigError(
            "trainer.vectorize.learning_rates needs a constant learning rate, but the optimizer "
            "follows a schedule: use optimizer/schedule=constant"
        )
    target = locate(str(settings.pop("_target_")))
    settings.pop("learning_rate", None)

    def make(learning_rate: Any) -> Any:
        return target(learning_rate=learning_rate, **settings)

    return make


def trial_config(container: Mapping[str, Any], trial: Trial) -> dict[str, Any]:
    """The config of a lone run equivalent to ``trial`` (no ``trainer.vectorize``)."""
    config = json.loads(json.dumps(container))  # A deep copy of plain data.
    config["seed"] = trial.seed
    config.setdefault("optimizer", {})["learning_rate"] = trial.learning_rate
    config["trainer"].pop("vectorize", None)
    return config


def _check_seed_independent(cfg: Any, trials: Sequence[Trial]) -> None:
    """Seeds may only change training randomness: data that depends on ``seed`` would make a
    trial differ from a lone run with that seed."""
    from omegaconf import OmegaConf

    seeds = sorted({t.seed for t in trials})
    if len(seeds) < 2:
        return
    resolved = []
    for seed in seeds:
        copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        copy.seed = seed
        resolved.append(
            json.dumps(OmegaConf.to_container(copy.dataset, resolve=True), sort_keys=True)
        )
    if len(set(resolved)) > 1:
        raise ConfigError(
            "trainer.vectorize.seeds: the dataset config depends on seed (e.g. "
            "dataset.loader.seed=${seed}), so trials would need different data; fix it, "
            "e.g. dataset.loader.seed=0, or sweep seeds with -m instead"
        )


class _RecordingWriter:
    """Remembers writer calls to replay them into a W&B run after training.

    The W&B writer finishes the previous run whenever a new one starts in the same process,
    so T concurrent W&B runs are not possible; each trial's run is written in turn at the end.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.calls.append(("write_scalars", (step, dict(scalars))))

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        self.calls.append(("write_histogram", (step, name, list(values))))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        self.calls.append(("write_summary", (dict(summary),)))

    def close(self, exit_code: int) -> None:
        pass

    def replay(self, writer: Any) -> None:
        for method, args in self.calls:
            getattr(writer, method)(*args)


def _write_trial_config(directory: pathlib.Path, config: Mapping[str, Any], trial: Trial) -> None:
    import yaml

    from fedjax_exp.experiment.writers import atomic_write_text

    hydra_dir = directory / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(hydra_dir / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False))
    overrides = [f"optimizer.learning_rate={trial.learning_rate!r}", f"seed={trial.seed}"]
    atomic_write_text(hydra_dir / "overrides.yaml", yaml.safe_dump(overrides))


def _best(values: Sequence[float], key: str) -> float:
    from fedjax_exp.experiment.compare import lower_is_better

    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan")
    return min(finite) if lower_is_better(key) else max(finite)


def run_sweep(
    cfg: Any,
    container: Mapping[str, Any],
    out: pathlib.Path,
    source: tuple[pathlib.Path, int | None] | None,
    run_name: str = "train",
    overrides: Sequence[str] = (),
) -> float:
    """The runner's ``trainer.vectorize`` mode: trains every trial in one program.

    Writes ``<out>/trials/<trial>/{metrics.jsonl,status.json,.hydra/}`` per trial (and a W&B
    run per trial when W&B logging is on), ``<out>/checkpoints/`` (all trials stacked, so the
    sweep resumes as a whole) and ``<out>/status.json`` listing the trials. Returns the best
    trial's ``optimized_metric``. A trial whose loss becomes non-finite is marked failed in
    its own status; the other trials carry on.
    """
    from fedjax_exp.experiment import builders, loop, parallel, writers
    from fedjax_exp.experiment.checkpoints import Checkpointer, Snapshot
    from fedjax_exp.experiment.evaluation import Evaluator

    trainer = container["trainer"]
    spec = trainer.get("vectorize") or {}
    base_lr = (container.get("optimizer") or {}).get("learning_rate")
    trials = expand_trials(
        spec.get("learning_rates"), spec.get("seeds"), base_lr, int(container["seed"])
    )
    _check_seed_independent(cfg, trials)
    make_optimizer = make_optimizer_factory(cfg)

    model, train_model, train_data, test_data = builders.build_model_and_data(cfg)
    training = VectorizedTraining(
        lambda optimizer: builders.build_algorithm(cfg, train_model, optimizer, train_data),
        make_optimizer,
        trials,
    )
    # The engine's speed settings, on one device (a sweep is not data-parallel). No prefetch
    # thread: with device data (the default where it fits) the host only draws indices.
    speed = parallel.resolve_for_algorithm(training, trainer, num_devices=1)
    if speed.device_data:
        try:
            training.enable_device_data()
        except ValueError as e:
            raise ConfigError(str(e)) from e
    states = training.init()
    start_step, elapsed = 0, 0.0
    checkpoints_dir = out / "checkpoints"
    if source is not None:
        reader = Checkpointer(source[0], keep=int(trainer["keep_checkpoints"]))
        snapshot = reader.restore(states, np.asarray(training.train_keys), source[1])
        reader.close()
        states, start_step, elapsed = snapshot.state, snapshot.step, snapshot.elapsed
        states = jax.tree_util.tree_map(jnp.asarray, states)
        log.info("resuming the sweep from %s at step %d", source[0], start_step)
    steps = int(trainer["steps"])
    if start_step > steps:
        raise ConfigError(
            f"the checkpoint is at step {start_step}, beyond trainer.steps={steps}: "
            "raise trainer.steps or start a new run dir"
        )
    evaluator = Evaluator(
        model,
        {"train": train_data, "test": test_data},
        batch_size=int(trainer["eval_batch_size"]),
        num_batches=dict(trainer["eval_batches"]),
    )

    log.info(
        "%s; %d trials in one program (%s); writing to %s",
        run_log.describe(container, start_step, speed.steps_per_dispatch),
        len(trials),
        ", ".join(t.name for t in trials),
        out,
    )
    run_record.write(out, container, overrides)
    clock = loop.Clock(elapsed)
    trial_dirs = [out / TRIALS_DIR / t.name for t in trials]
    jsonls = []
    for trial, directory in zip(trials, trial_dirs, strict=True):
        directory.mkdir(parents=True, exist_ok=True)
        _write_trial_config(directory, trial_config(container, trial), trial)
        jsonls.append(
            writers.JsonlWriter(directory, clock, resume_step=start_step if source else None)
        )
    wandb_settings = (container.get("logger") or {}).get("wandb")
    recorders = [_RecordingWriter() for _ in trials] if wandb_settings else None
    trial_writers = [
        writers.MultiWriter([j] + ([recorders[i]] if recorders else []))
        for i, j in enumerate(jsonls)
    ]
    checkpointer = Checkpointer(checkpoints_dir, keep=int(trainer["keep_checkpoints"]))
    diverged: dict[int, int] = {}
    finals: list[dict[str, float]] = [{} for _ in trials]
    step, exit_code, error = start_step, 1, None
    log_every, eval_every = int(trainer["log_every"]), int(trainer["eval_every"])
    checkpoint_every = int(trainer["checkpoint_every"])

    def on_log(at: int, means: dict[str, np.ndarray]) -> None:
        for i, w in enumerate(trial_writers):
            values = {f"train/{k}": float(v[i]) for k, v in means.items()}
            w.write_scalars(at, values)
            if i not in diverged and not all(math.isfinite(v) for v in values.values()):
                diverged[i] = at

    try:
        stream = training.data_stream(start_step) if steps > start_step else iter(())
        pending: dict[str, list[jax.Array]] = {}
        intervals = (log_every, eval_every, checkpoint_every)
        for size in pipeline.chunk_sizes(step, steps, speed.steps_per_dispatch, intervals):
            items = list(itertools.islice(stream, size))
            states, scalars = training.run_steps(states, items, step + 1)
            for key, value in scalars.items():
                pending.setdefault(key, []).append(value)
            step += size
            at_end = step == steps
            if loop.due(step, log_every) or at_end:
                on_log(step, _pop_trial_means(pending))
            if loop.due(step, eval_every):
                for i, w in enumerate(trial_writers):
                    w.write_scalars(step, evaluator.periodic(training.eval_params(states, i)))
            if loop.due(step, checkpoint_every) or at_end:
                checkpointer.save(
                    Snapshot(
                        state=states,
                        step=step,
                        rng=np.asarray(training.train_keys),
                        data_position=step,
                        elapsed=clock(),
                    )
                )
        for i, w in enumerate(trial_writers):
            finals[i] = evaluator.final(training.eval_params(states, i), "test")
            w.write_scalars(step, finals[i])
            w.write_summary(finals[i])
        exit_code = 0
        log.info("finished step %d after %.1f s of training", step, clock())
        for i, trial in enumerate(trials):
            ended = f" (diverged by step {diverged[i]})" if i in diverged else ""
            log.info("  trial %s%s: %s", trial.name, ended, run_log.format_metrics(finals[i]))
    except BaseException as e:
        error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        for j in jsonls:
            j.write_event(step, status="failed", error=error)
        raise
    finally:
        checkpointer.close()
        for i, directory in enumerate(trial_dirs):
            failed = exit_code != 0 or i in diverged
            trial_error = error
            if i in diverged and trial_error is None:
                trial_error = (
                    f"Diverged: non-finite training loss by step {diverged[i]}; "
                    "lower the learning rate"
                )
            writers.write_status(
                directory,
                status="failed" if failed else "completed",
                step=step,
                error=trial_error,
                final=finals[i],
            )
            trial_writers[i].close(1 if failed else 0)
        _write_sweep_status(out, trials, trial_dirs, exit_code, step, error, diverged)
        if recorders is not None:
            _replay_to_wandb(
                wandb_settings,
                recorders,
                container,
                trials,
                trial_dirs,
                run_name,
                diverged,
                exit_code,
            )
    key = container.get("optimized_metric")
    if key is None:
        return float("nan")
    missing = [t.name for t, f in zip(trials, finals, strict=True) if key not in f]
    if len(missing) == len(trials):
        raise ConfigError(f"optimized_metric={key!r} was not computed; got {sorted(finals[0])}")
    return _best([f.get(key, float("nan")) for f in finals], str(key))


def _write_sweep_status(
    out: pathlib.Path,
    trials: Sequence[Trial],
    trial_dirs: Sequence[pathlib.Path],
    exit_code: int,
    step: int,
    error: str | None,
    diverged: Mapping[int, int],
) -> None:
    from fedjax_exp.experiment.writers import write_status

    write_status(
        out,
        status="completed" if exit_code == 0 else "failed",
        step=step,
        error=error,
        trials=[
            {
                "name": t.name,
                "learning_rate": t.learning_rate,
                "seed": t.seed,
                "dir": str(d.relative_to(out)),
                "diverged_at": diverged.get(i),
            }
            for i, (t, d) in enumerate(zip(trials, trial_dirs, strict=True))
        ],
    )


def _replay_to_wandb(
    settings: Mapping[str, Any],
    recorders: Sequence[_RecordingWriter],
    container: Mapping[str, Any],
    trials: Sequence[Trial],
    trial_dirs: Sequence[pathlib.Path],
    run_name: str,
    diverged: Mapping[int, int],
    exit_code: int,
) -> None:
    """One W&B run per trial (grouped under the sweep's name), written in turn."""
    from fedjax_exp.experiment import writers

    for i, (trial, directory) in enumerate(zip(trials, trial_dirs, strict=True)):
        trial_settings = dict(settings)
        trial_settings["group"] = settings.get("group") or run_name
        trial_settings["name"] = f"{settings.get('name') or run_name}/{trial.name}"
        writer = writers.create_wandb_writer(
            trial_settings,
            directory=directory,
            config=trial_config(container, trial),
            default_name=trial_settings["name"],
            default_group=trial_settings["group"],
        )
        if writer is None:
            return
        try:
            recorders[i].replay(writer)
        finally:
            writer.close(1 if exit_code != 0 or i in diverged else 0)
