"""Vectorized sweeps: trials (learning rates x seeds) trained side by side in ONE program.

Trials that differ only in learning rate and/or seed have the same shapes, so instead of ``T``
runs (``T`` compilations, ``T`` dispatches per step) :class:`VectorizedTraining` is the run's
algorithm ``jax.vmap`` ped over a leading trials axis of the state. The loop and the runner
treat it as any other algorithm (its step scalars carry a trials axis):

- the learning rate lives in the optimizer state (:func:`learning_rate_in_state`, the idea of
  ``optax.inject_hyperparams``), so it is an ordinary vmapped array;
- each trial's initial state and keys come from its own seed, as a lone run makes them;
- trials with different seeds draw their own shuffled batches (one per distinct seed per step,
  each trial picks its own inside the step); trials sharing a seed share one batch.

A federated run (:class:`VectorizedFederatedTraining`) sweeps server learning rates
(``learning_rates``: the top-level optimizer is the server's) x client learning rates
(``client_learning_rates``) x seeds: the rounds of all trials are one program, vmapped over the
trials; trials sharing a seed share the round's clients and batches. The client optimizer's
state is made inside the round, so its rate cannot live in a state: it is read, while the
program is traced, from the trial being traced (``learning_rate_in_scope``).

The runner logs each trial as its own run under ``<run dir>/trials/<name>/``. Results equal
those of each trial run alone up to floating-point reassociation of the batched arithmetic.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.injected_learning_rate import (  # noqa: F401 - re-exported
    LearningRateState,
    learning_rate_in_scope,
    learning_rate_in_state,
    learning_rate_scope,
)
from fedjax_exp.core.typing import Params, PRNGKey
from fedjax_exp.experiment import algorithms
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_files import HYDRA_DIR, TRIALS_DIR  # noqa: F401 - re-exported


@dataclasses.dataclass(frozen=True)
class Trial:
    """One member of a vectorized sweep."""

    learning_rate: float
    seed: int
    name: str  # Its directory under trials/, e.g. "lr=0.001,seed=0".
    client_learning_rate: float | None = None  # Federated runs.


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
    client_learning_rates: Sequence[float] | None = None,
    default_client_learning_rate: float | None = None,
) -> list[Trial]:
    """Every learning rate with every client learning rate and every seed (the defaults
    where a list is omitted).

    Raises:
      ConfigError: empty or duplicated lists, non-positive learning rates, negative or
        non-integer seeds, or learning rates given while the optimizer has none.
    """
    lrs = _check_list("trainer.vectorize.learning_rates", learning_rates)
    client_lrs = _check_list("trainer.vectorize.client_learning_rates", client_learning_rates)
    seed_list = _check_list("trainer.vectorize.seeds", seeds)
    if lrs is None and seed_list is None and client_lrs is None:
        raise ConfigError(
            "trainer.vectorize needs learning_rates and/or seeds, e.g. "
            "trainer.vectorize.learning_rates=[1e-3,3e-3]"
        )
    for key, values in (("learning_rates", lrs), ("client_learning_rates", client_lrs)):
        for lr in values or []:
            if isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0:
                raise ConfigError(f"trainer.vectorize.{key} must be positive numbers, got {lr!r}")
    for s in seed_list or []:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"trainer.vectorize.seeds must be non-negative integers, got {s!r}")
    if lrs is None:
        if default_learning_rate is None:
            raise ConfigError("the optimizer has no learning_rate to sweep over")
        lrs = [default_learning_rate]
    trials = []
    for lr, client_lr, seed in itertools.product(
        lrs, client_lrs or [default_client_learning_rate], seed_list or [default_seed]
    ):
        parts = [f"lr={float(lr):g}"] if learning_rates is not None else []
        parts += [f"client_lr={float(client_lr):g}"] if client_learning_rates is not None else []
        parts += [f"seed={seed}"] if seeds is not None else []
        trials.append(
            Trial(
                learning_rate=float(lr),
                seed=int(seed),
                name=",".join(parts),
                client_learning_rate=None if client_lr is None else float(client_lr),
            )
        )
    return trials


def trials_of(cfg: Any, container: Mapping[str, Any]) -> list[Trial] | None:
    """The trials ``trainer.vectorize`` asks for, or None when it asks for none.

    Raises:
      ConfigError: bad lists, a scheduled learning rate, seeds with seed-dependent data, or
        client learning rates without a federated algorithm.
    """
    spec = container["trainer"].get("vectorize") or {}
    keys = ("learning_rates", "client_learning_rates", "seeds")
    if all(spec.get(key) is None for key in keys):
        return None
    base_lr = (container.get("optimizer") or {}).get("learning_rate")
    client = (container.get("algorithm") or {}).get("client_optimizer")
    if spec.get("client_learning_rates") is not None and not client:
        raise ConfigError(
            "trainer.vectorize.client_learning_rates needs a federated algorithm with a "
            "client optimizer, e.g. algorithm=fed_avg"
        )
    trials = expand_trials(
        spec.get("learning_rates"),
        spec.get("seeds"),
        base_lr,
        int(container["seed"]),
        spec.get("client_learning_rates"),
        client.get("learning_rate") if client else None,
    )
    make_optimizer_factory(cfg)  # Raises for a schedule.
    if client:
        make_optimizer_factory(cfg, "algorithm.client_optimizer")
        if len({t.seed for t in trials}) > 1 and (container.get("algorithm") or {}).get(
            "eval_clients"
        ):
            raise ConfigError(
                "trainer.vectorize.seeds with algorithm.eval_clients: the evaluation clients "
                "are drawn from the run's seed; set algorithm.eval_clients=null or sweep seeds "
                "with -m"
            )
    check_seed_independent(cfg, trials)
    return trials


def trial_keys(trials: Sequence[Trial]) -> tuple[jax.Array, jax.Array]:
    """(init keys, train keys), stacked over ``trials``: each a lone run's from its seed."""
    keys = [jax.random.split(jax.random.PRNGKey(t.seed)) for t in trials]
    return jnp.stack([k[0] for k in keys]), jnp.stack([k[1] for k in keys])


def stack_trees(trees: Sequence[Any]) -> Any:
    """Equally shaped pytrees stacked along a new leading axis (on the host, then put on the
    device once: ``jnp.stack`` would compile one program per leaf shape)."""
    return jax.device_put(algorithms.stack_inputs(jax.device_get(trees)))


class VectorizedTraining:
    """``make_algorithm(optimizer)``'s training, vmapped over ``trials``.

    ``make_algorithm`` builds the run's :class:`~fedjax_exp.experiment.algorithms.
    CentralizedTraining`; ``make_optimizer(lr)`` the run's optimizer at a learning rate.
    ``init`` and ``run_steps`` take keys stacked over the trials (:func:`trial_keys`).
    """

    def __init__(
        self,
        make_algorithm: Callable[[Any], algorithms.CentralizedTraining],
        make_optimizer: Callable[[Any], Any],
        trials: Sequence[Trial],
    ):
        if not trials:
            raise ValueError("a vectorized sweep needs at least one trial")
        self.trials = list(trials)
        self.num_trials = len(self.trials)
        self.algorithms = [
            make_algorithm(learning_rate_in_state(make_optimizer, t.learning_rate)) for t in trials
        ]
        if not isinstance(self.algorithms[0], algorithms.CentralizedTraining):
            raise ConfigError("trainer.vectorize supports centralized and federated algorithms")
        self.base = self.algorithms[0]
        self.seeds = sorted({t.seed for t in trials})
        self.seed_index = np.asarray([self.seeds.index(t.seed) for t in trials], np.int32)
        self._runs: dict[int, Callable[..., Any]] = {}

    def update(self, states: Any, inputs: Any, keys: jax.Array) -> tuple[Any, Any]:
        """One step of every trial; ``inputs`` stacks one batch per distinct seed."""
        one = self.base.update
        if len(self.seeds) == 1:
            # One batch against T parameter sets: XLA sees one wide matmul, not T copies.
            batch = jax.tree_util.tree_map(lambda x: x[0], inputs)
            return jax.vmap(one, in_axes=(0, None, 0))(states, batch, keys)
        batch = jax.tree_util.tree_map(lambda x: x[self.seed_index], inputs)
        return jax.vmap(one)(states, batch, keys)

    def init(self, rng: PRNGKey) -> Any:
        """The stacked initial states; ``rng[t]`` is trial ``t``'s init key."""
        return stack_trees([alg.init(rng[i]) for i, alg in enumerate(self.algorithms)])

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        """Per step one input per distinct trial seed, stacked (``seed`` is not used)."""
        streams = [self.base.data_stream(s, start) for s in self.seeds]
        return (algorithms.stack_inputs(items) for items in zip(*streams, strict=False))

    def prepare(self, items: Sequence[Any]) -> Any:
        return jax.device_put(algorithms.stack_inputs(items))

    def run_steps(
        self, states: Any, block: Any, base_rng: PRNGKey, first_step: int
    ) -> tuple[Any, dict[str, jax.Array]]:
        """Like the plain run's; scalars are ``(steps, trials)``."""
        num_steps = int(jax.tree_util.tree_leaves(block)[0].shape[0])
        if num_steps not in self._runs:
            self._runs[num_steps] = algorithms.multi_step(self.update, num_steps)
        return self._runs[num_steps](states, block, base_rng, first_step)

    def eval_params(self, state: Any, trial: int = 0) -> Params:
        return self.base.eval_params(jax.tree_util.tree_map(lambda x: x[trial], state))

    def uses_convolution(self) -> bool | None:
        return self.base.uses_convolution()

    def use_mesh(self, mesh: Any) -> None:
        raise ValueError(
            "trainer.data_parallel=true and trainer.vectorize cannot be combined: a vectorized "
            "sweep runs on one device; set trainer.data_parallel=auto"
        )


@dataclass
class FederatedTrialState:
    """A federated trial's server state and its client learning rate."""

    server: Any
    client_learning_rate: jax.Array


class VectorizedFederatedTraining(VectorizedTraining):
    """The rounds of a federated run (``base``, a :class:`~fedjax_exp.experiment.federated.
    FederatedTraining` built with :func:`learning_rate_in_state` as server optimizer and
    :func:`learning_rate_in_scope` as client optimizer), vmapped over ``trials``.

    Every round of every trial is one program (the cohort engine's scan path, whichever
    engine a lone run would pick: the arithmetic is the same).
    """

    def __init__(self, base: Any, trials: Sequence[Trial]):
        self.trials, self.num_trials, self.base = list(trials), len(trials), base
        self.seeds = sorted({t.seed for t in trials})
        self.seed_index = np.asarray([self.seeds.index(t.seed) for t in trials], np.int32)
        self._rounds = jax.jit(self._run, donate_argnums=0)

    def init(self, rng: PRNGKey) -> Any:
        def with_rate(node: Any, rate: float) -> Any:
            if isinstance(node, LearningRateState):
                return LearningRateState(learning_rate=np.float32(rate), inner=node.inner)
            return node

        states = []
        for i, trial in enumerate(self.trials):
            server = jax.tree_util.tree_map(
                lambda n, t=trial: with_rate(n, t.learning_rate),
                self.base.init(rng[i]),
                is_leaf=lambda n: isinstance(n, LearningRateState),
            )
            states.append(FederatedTrialState(server, np.float32(trial.client_learning_rate)))
        return stack_trees(states)

    def _round(self, state: FederatedTrialState, inputs: Any, columns: Any) -> Any:
        from fedjax_exp.core import cohort

        with learning_rate_scope(state.client_learning_rate):
            server, scalars = self.base.algorithm.round(
                state.server, inputs, columns, cohort.train_cohort
            )
        return FederatedTrialState(server, state.client_learning_rate), scalars

    def _run(self, states: Any, block: Any, columns: Any) -> Any:
        def body(states: Any, inputs: Any) -> Any:
            if len(self.seeds) == 1:  # One round's clients for all trials.
                one = jax.tree_util.tree_map(lambda x: x[0], inputs)
                return jax.vmap(self._round, in_axes=(0, None, None))(states, one, columns)
            picked = jax.tree_util.tree_map(lambda x: x[self.seed_index], inputs)
            return jax.vmap(self._round, in_axes=(0, 0, None))(states, picked, columns)

        return jax.lax.scan(body, states, block)

    def run_steps(self, states: Any, block: Any, base_rng: PRNGKey, first_step: int) -> Any:
        del base_rng, first_step  # Client keys follow the round number, as in a lone run.
        return self._rounds(states, block, self.base.columns)

    def eval_params(self, state: Any, trial: int = 0) -> Params:
        return jax.tree_util.tree_map(lambda x: x[trial], state.server.params)

    def periodic_eval_batches(self, splits: dict[str, Any], batch_size: int, seed: int) -> dict:
        return self.base.periodic_eval_batches(splits, batch_size, seed)

    def logged_scalars(self, step: int) -> dict[str, float]:
        return self.base.logged_scalars(step)


def make_optimizer_factory(cfg: Any, key: str = "optimizer") -> Callable[[Any], Any]:
    """``lr -> Optimizer`` from the optimizer config at ``key`` (its ``_target_`` with the
    other settings).

    Raises:
      ConfigError: the optimizer follows a schedule (its rate is not one number to sweep).
    """
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
    assert isinstance(settings, dict)
    schedule = settings.pop("schedule", None) or {}
    if schedule.get("_target_"):
        raise ConfigError(
            f"trainer.vectorize needs a constant learning rate, but {key} follows a schedule: "
            "use optimizer/schedule=constant"
        )
    target = get_object(str(settings.pop("_target_")))
    settings.pop("learning_rate", None)
    return lambda learning_rate: target(learning_rate=learning_rate, **settings)


def build(cfg: Any, make_algorithm: Callable[..., Any], trials: Sequence[Trial]) -> Any:
    """The run's algorithm vectorized over ``trials``. ``make_algorithm(optimizer,
    **overrides)`` builds the run's algorithm (overrides replace its config's arguments)."""
    from omegaconf import OmegaConf

    make_optimizer = make_optimizer_factory(cfg)
    if OmegaConf.select(cfg, "algorithm.client_optimizer") is None:
        return VectorizedTraining(make_algorithm, make_optimizer, trials)
    make_client = make_optimizer_factory(cfg, "algorithm.client_optimizer")
    first = trials[0]
    base = make_algorithm(
        learning_rate_in_state(make_optimizer, first.learning_rate),
        client_optimizer=learning_rate_in_scope(make_client, first.client_learning_rate),
    )
    return VectorizedFederatedTraining(base, trials)


def trial_config(container: Mapping[str, Any], trial: Trial) -> dict[str, Any]:
    """The config of a lone run equivalent to ``trial`` (no ``trainer.vectorize``)."""
    config = json.loads(json.dumps(container))  # A deep copy of plain data.
    config["seed"] = trial.seed
    config.setdefault("optimizer", {})["learning_rate"] = trial.learning_rate
    if trial.client_learning_rate is not None:
        config["algorithm"]["client_optimizer"]["learning_rate"] = trial.client_learning_rate
    config["trainer"].pop("vectorize", None)
    return config


def check_seed_independent(cfg: Any, trials: Sequence[Trial]) -> None:
    """Seeds may only change training randomness: data that depends on ``seed`` would make a
    trial differ from a lone run with that seed."""
    from omegaconf import OmegaConf

    seeds = sorted({t.seed for t in trials})
    resolved = set()
    for seed in seeds:
        copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        copy.seed = seed
        resolved.add(json.dumps(OmegaConf.to_container(copy.dataset, resolve=True), sort_keys=True))
    if len(resolved) > 1:
        raise ConfigError(
            "trainer.vectorize.seeds: the dataset config depends on seed (e.g. "
            "dataset.loader.seed=${seed}), so trials would need different data; fix it, "
            "e.g. dataset.loader.seed=0, or sweep seeds with -m instead"
        )


def write_trial_hydra_files(
    directory: pathlib.Path, config: Mapping[str, Any], trial: Trial
) -> None:
    """``.hydra/config.yaml`` and ``overrides.yaml`` of the lone run equal to ``trial``."""
    import yaml

    from fedjax_exp.core.atomic_file import atomic_write_text

    hydra_dir = directory / HYDRA_DIR
    hydra_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(hydra_dir / "config.yaml", yaml.safe_dump(dict(config), sort_keys=False))
    overrides = [f"optimizer.learning_rate={trial.learning_rate!r}", f"seed={trial.seed}"]
    if trial.client_learning_rate is not None:
        overrides += [f"algorithm.client_optimizer.learning_rate={trial.client_learning_rate!r}"]
    atomic_write_text(hydra_dir / "overrides.yaml", yaml.safe_dump(overrides))
