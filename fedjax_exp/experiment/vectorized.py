"""Vectorized sweeps: trials (learning rates x seeds) trained side by side in ONE program.

:class:`VectorizedTraining` is the run's algorithm ``jax.vmap`` ped over a leading trials axis
of the state: the learning rate lives in the optimizer state (:func:`learning_rate_in_state`),
each trial's initial state and keys come from its own seed, and trials sharing a seed share
one batch per step. :class:`VectorizedFederatedTraining` sweeps server x client learning
rates x seeds of a federated run; the client rate is read while tracing from the trial being
traced (``learning_rate_in_scope``). Each trial is logged as its own run under
``<run dir>/trials/<name>/``; results equal lone runs up to floating-point reassociation.
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
from fedjax_exp.core.injected_learning_rate import (
    LearningRateState,
    learning_rate_in_scope,
    learning_rate_in_state,
    learning_rate_scope,
)
from fedjax_exp.core.typing import Params, PRNGKey
from fedjax_exp.experiment import algorithms
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_files import HYDRA_DIR


@dataclasses.dataclass(frozen=True)
class Trial:
    """One member of a vectorized sweep."""

    learning_rate: float
    seed: int
    name: str  # Its directory under trials/, e.g. "lr=0.001,seed=0".
    client_learning_rate: float | None = None  # Federated runs.


def expand_trials(
    learning_rates: Sequence[float] | None,
    seeds: Sequence[int] | None,
    default_learning_rate: float | None,
    default_seed: int,
    client_learning_rates: Sequence[float] | None = None,
    default_client_learning_rate: float | None = None,
) -> list[Trial]:
    """Every learning rate x client learning rate x seed (the default where a list is None).
    The config schema (``VectorizeConfig``) has checked the lists."""
    if learning_rates is None and default_learning_rate is None:
        raise ConfigError("the optimizer has no learning_rate to sweep over")
    trials = []
    for lr, client_lr, seed in itertools.product(
        learning_rates or [default_learning_rate],
        client_learning_rates or [default_client_learning_rate],
        seeds or [default_seed],
    ):
        parts = [f"lr={float(lr):g}"] if learning_rates is not None else []
        parts += [f"client_lr={float(client_lr):g}"] if client_learning_rates is not None else []
        parts += [f"seed={seed}"] if seeds is not None else []
        client_lr = None if client_lr is None else float(client_lr)
        trials.append(Trial(float(lr), int(seed), ",".join(parts), client_lr))
    return trials


def trials_of(cfg: Any, container: Mapping[str, Any]) -> list[Trial] | None:
    """The trials ``trainer.vectorize`` asks for (None: none); ConfigError for what cannot be
    swept in one program."""
    spec = container["trainer"].get("vectorize") or {}
    lrs, client_lrs, seeds = (spec.get(k) for k in VECTORIZED_KEYS)
    if lrs is None and client_lrs is None and seeds is None:
        return None
    algorithm = container.get("algorithm") or {}
    client = algorithm.get("client_optimizer")
    if client_lrs is not None and not client:
        raise ConfigError(
            "trainer.vectorize.client_learning_rates needs a federated algorithm with a "
            "client optimizer, e.g. algorithm=fed_avg"
        )
    base_lr = (container.get("optimizer") or {}).get("learning_rate")
    client_lr = client.get("learning_rate") if client else None
    trials = expand_trials(lrs, seeds, base_lr, int(container["seed"]), client_lrs, client_lr)
    make_optimizer_factory(cfg)  # Raises for a schedule.
    if client:
        make_optimizer_factory(cfg, "algorithm.client_optimizer")
        if len({t.seed for t in trials}) > 1 and algorithm.get("eval_clients"):
            raise ConfigError(
                "trainer.vectorize.seeds with algorithm.eval_clients: the evaluation clients "
                "are drawn from the run's seed; set algorithm.eval_clients=null or sweep seeds "
                "with -m"
            )
    check_seed_independent(cfg, trials)
    return trials


VECTORIZED_KEYS = ("learning_rates", "client_learning_rates", "seeds")


def trial_keys(trials: Sequence[Trial]) -> tuple[jax.Array, jax.Array]:
    """(init keys, train keys), stacked over ``trials``: each a lone run's from its seed."""
    keys = [jax.random.split(jax.random.PRNGKey(t.seed)) for t in trials]
    return jnp.stack([k[0] for k in keys]), jnp.stack([k[1] for k in keys])


def stack_trees(trees: Sequence[Any]) -> Any:
    """Pytrees stacked on a new leading axis on the host, put on the device once."""
    return jax.device_put(algorithms.stack_inputs(jax.device_get(trees)))


class VectorizedTraining(algorithms.Algorithm):
    """``make_algorithm(optimizer)`` (a CentralizedTraining), vmapped over ``trials``;
    ``make_optimizer(lr)`` is the run's optimizer at a learning rate."""

    def __init__(self, make_algorithm: Callable[[Any], Any], make_optimizer: Any, trials: Any):
        self._set_trials(trials)
        self.algorithms = [
            make_algorithm(learning_rate_in_state(make_optimizer, t.learning_rate)) for t in trials
        ]
        if not isinstance(self.algorithms[0], algorithms.CentralizedTraining):
            raise ConfigError("trainer.vectorize supports centralized and federated algorithms")
        self.base = self.algorithms[0]
        self._runs: dict[int, Callable[..., Any]] = {}

    def _set_trials(self, trials: Sequence[Trial]) -> None:
        self.trials, self.num_trials = list(trials), len(trials)
        self.seeds = sorted({t.seed for t in trials})
        self.seed_index = np.asarray([self.seeds.index(t.seed) for t in trials], np.int32)

    def _vmap(self, fn: Callable[..., Any], states: Any, inputs: Any, *rest: Any) -> Any:
        """``fn`` over the trials; ``inputs`` stacks one input per distinct seed (one seed:
        one input against every trial's state, which XLA runs as one wide matmul)."""
        if len(self.seeds) == 1:
            one = jax.tree_util.tree_map(lambda x: x[0], inputs)
            return jax.vmap(fn, in_axes=(0, None, *([0] * len(rest))))(states, one, *rest)
        picked = jax.tree_util.tree_map(lambda x: x[self.seed_index], inputs)
        return jax.vmap(fn)(states, picked, *rest)

    def update(self, states: Any, inputs: Any, keys: jax.Array) -> tuple[Any, Any]:
        return self._vmap(self.base.update, states, inputs, keys)

    def init(self, rng: PRNGKey) -> Any:
        return stack_trees([alg.init(rng[i]) for i, alg in enumerate(self.algorithms)])

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        streams = [self.base.data_stream(s, start) for s in self.seeds]  # Not ``seed``.
        return (algorithms.stack_inputs(items) for items in zip(*streams, strict=False))

    def prepare(self, items: Sequence[Any]) -> Any:
        return jax.device_put(algorithms.stack_inputs(items))

    def run_steps(self, states: Any, block: Any, base_rng: PRNGKey, first_step: int) -> Any:
        num_steps = int(jax.tree_util.tree_leaves(block)[0].shape[0])
        if num_steps not in self._runs:
            self._runs[num_steps] = algorithms.multi_step(self.update, num_steps)
        return self._runs[num_steps](states, block, base_rng, first_step)

    def eval_params(self, state: Any, trial: int = 0) -> Params:
        return self.base.eval_params(jax.tree_util.tree_map(lambda x: x[trial], state))

    def uses_convolution(self) -> bool | None:
        return self.base.uses_convolution()

    def logged_scalars(self, step: int) -> dict[str, float]:
        return self.base.logged_scalars(step)

    def periodic_eval_batches(self, splits: dict[str, Any], batch_size: int, seed: int) -> dict:
        return self.base.periodic_eval_batches(splits, batch_size, seed)

    def use_mesh(self, mesh: Any) -> None:
        raise ConfigError(
            "trainer.data_parallel=true and trainer.vectorize cannot be combined: a vectorized "
            "sweep runs on one device; set trainer.data_parallel=auto"
        )


@dataclass
class FederatedTrialState:
    server: Any
    client_learning_rate: jax.Array


class VectorizedFederatedTraining(VectorizedTraining):
    """The rounds of ``base`` (a FederatedTraining whose server optimizer is
    :func:`learning_rate_in_state` and client optimizer :func:`learning_rate_in_scope`),
    vmapped over ``trials``, every round of every trial one program (the scan engine)."""

    def __init__(self, base: Any, trials: Sequence[Trial]):
        self._set_trials(trials)
        self.base = base
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
            return self._vmap(lambda s, i: self._round(s, i, columns), states, inputs)

        return jax.lax.scan(body, states, block)

    def run_steps(self, states: Any, block: Any, base_rng: PRNGKey, first_step: int) -> Any:
        return self._rounds(states, block, self.base.columns)  # Keys follow the round.

    def eval_params(self, state: Any, trial: int = 0) -> Params:
        return jax.tree_util.tree_map(lambda x: x[trial], state.server.params)


def make_optimizer_factory(cfg: Any, key: str = "optimizer") -> Callable[[Any], Any]:
    """``lr -> Optimizer`` from the optimizer config at ``key``; ConfigError for a schedule."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    settings = OmegaConf.to_container(OmegaConf.select(cfg, key), resolve=True)
    assert isinstance(settings, dict)
    if (settings.pop("schedule", None) or {}).get("_target_"):
        raise ConfigError(
            f"trainer.vectorize needs a constant learning rate, but {key} follows a schedule: "
            "use optimizer/schedule=constant"
        )
    target = get_object(str(settings.pop("_target_")))
    settings.pop("learning_rate", None)
    return lambda learning_rate: target(learning_rate=learning_rate, **settings)


def build(cfg: Any, make_algorithm: Callable[..., Any], trials: Sequence[Trial]) -> Any:
    """The run's algorithm vectorized over ``trials``; ``make_algorithm(optimizer,
    **overrides)`` builds the run's algorithm."""
    from omegaconf import OmegaConf

    make_optimizer = make_optimizer_factory(cfg)
    if OmegaConf.select(cfg, "algorithm.client_optimizer") is None:
        return VectorizedTraining(make_algorithm, make_optimizer, trials)
    make_client = make_optimizer_factory(cfg, "algorithm.client_optimizer")
    base = make_algorithm(
        learning_rate_in_state(make_optimizer, trials[0].learning_rate),
        client_optimizer=learning_rate_in_scope(make_client, trials[0].client_learning_rate),
    )
    return VectorizedFederatedTraining(base, trials)


def check_seed_independent(cfg: Any, trials: Sequence[Trial]) -> None:
    """ConfigError when the dataset config depends on ``seed``: a trial would then differ
    from a lone run with its seed."""
    from omegaconf import OmegaConf

    resolved = set()
    for seed in {t.seed for t in trials}:
        copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
        copy.seed = seed
        resolved.add(json.dumps(OmegaConf.to_container(copy.dataset, resolve=True), sort_keys=True))
    if len(resolved) > 1:
        raise ConfigError(
            "trainer.vectorize.seeds: the dataset config depends on seed (e.g. "
            "dataset.loader.seed=${seed}), so trials would need different data; fix it, "
            "e.g. dataset.loader.seed=0, or sweep seeds with -m instead"
        )


def write_trial_files(directory: pathlib.Path, container: Mapping[str, Any], trial: Trial):
    """Writes ``.hydra/config.yaml`` and ``overrides.yaml`` of the lone run equal to ``trial``;
    returns its config (no ``trainer.vectorize``)."""
    import yaml

    from fedjax_exp.core.atomic_file import atomic_write_text

    config = json.loads(json.dumps(container))  # A deep copy of plain data.
    config["seed"] = trial.seed
    config.setdefault("optimizer", {})["learning_rate"] = trial.learning_rate
    overrides = [f"optimizer.learning_rate={trial.learning_rate!r}", f"seed={trial.seed}"]
    if trial.client_learning_rate is not None:
        config["algorithm"]["client_optimizer"]["learning_rate"] = trial.client_learning_rate
        overrides += [f"algorithm.client_optimizer.learning_rate={trial.client_learning_rate!r}"]
    config["trainer"].pop("vectorize", None)
    hydra_dir = directory / HYDRA_DIR
    hydra_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(hydra_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    atomic_write_text(hydra_dir / "overrides.yaml", yaml.safe_dump(overrides))
    return config
