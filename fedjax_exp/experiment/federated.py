"""Federated training in the experiment loop: one loop step is one round of a
``cohort_rounds`` algorithm on the cohort engine. A round's clients and batches follow from
``(seed, round)`` alone, so a resumed run replays the uninterrupted one exactly."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_exp.algorithms import cohort_rounds
from fedjax_exp.core import cohort, models
from fedjax_exp.core.client_datasets import ShuffleRepeatBatchHParams
from fedjax_exp.core.parallel_for_each_client import default_lanes
from fedjax_exp.core.typing import PRNGKey
from fedjax_exp.experiment.algorithms import DATA_AXIS, Algorithm, stack_inputs
from fedjax_exp.experiment.config_schema import integer
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.training.steps import model_uses_convolution

ENGINES = ("auto", "scan", "stepwise")


class FederatedTraining(Algorithm):
    """Rounds of ``cohort_rounds.ALGORITHMS[name]``; ``optimizer`` is the server's (Mime: the
    base optimizer clients mimic), further ``settings`` go to the algorithm's builder.
    ``engine``: ``scan`` (rounds as one program), ``stepwise`` (a dispatch per local step,
    faster for convolutions on XLA:CPU) or ``auto``; ``lanes``: clients vmapped together."""

    num_trials = 1

    def __init__(
        self,
        model: Any,
        optimizer: Any,
        train_data: Any,
        *,
        name: str,
        clients_per_round: int,
        client_batch_size: int,
        client_optimizer: Any = None,
        client_epochs: int | None = 1,
        client_steps: int | None = None,
        eval_clients: int | None = None,
        engine: str = "auto",
        lanes: int | str = "auto",
        **settings: Any,
    ):
        if name not in cohort_rounds.ALGORITHMS:
            raise ConfigError(
                f"algorithm.name={name!r} is not one of {sorted(cohort_rounds.ALGORITHMS)}"
            )
        if engine not in ENGINES:
            raise ConfigError(
                f"algorithm.engine must be one of {', '.join(ENGINES)}, got {engine!r}"
            )
        self.model, self.train_data, self.eval_clients = model, train_data, eval_clients
        columns, offsets = cohort.federated_columns(train_data)
        sizes = np.diff(offsets)
        if len(sizes) and sizes.min() == 0:
            raise ConfigError(
                "a train client has zero examples and cannot train: set "
                "dataset.loader.empty_clients=drop (or drop such clients from the data)"
            )
        if not 0 < clients_per_round <= len(sizes):
            raise ConfigError(
                f"algorithm.clients_per_round={clients_per_round} but the train data has "
                f"{len(sizes)} clients: set algorithm.clients_per_round between 1 and {len(sizes)}"
            )
        batch_size = integer("algorithm.client_batch_size", client_batch_size, 1)
        self.batch_hparams = ShuffleRepeatBatchHParams(batch_size, client_epochs, client_steps)
        context = {
            "model": model,
            "loss": models.model_per_example_loss(model),
            "client_optimizer": client_optimizer,
            "server_optimizer": optimizer,
            "batch_hparams": self.batch_hparams,
            "num_clients": len(sizes),
            "clients_per_round": clients_per_round,
        }
        try:
            self.algorithm = cohort_rounds.ALGORITHMS[name](context, **settings)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"algorithm={name}: {e}") from None
        self.host_columns, self.offsets = columns, offsets
        self.clients_per_round, self.engine, self.lanes = clients_per_round, engine, lanes
        self.privacy = settings if name == "dp_fed_avg" else None  # For the epsilon spent.
        self.mesh: Mesh | None = None
        self._configure()

    def _configure(self) -> None:
        platform = jax.default_backend()
        devices = 1 if self.mesh is None else self.mesh.size
        engine = self.engine
        if engine == "auto":
            engine = "stepwise" if platform == "cpu" and self.uses_convolution() else "scan"
        self.stepwise = engine == "stepwise"
        lanes = self.lanes
        if lanes == "auto" and platform == "cpu":
            # Stepwise (convolutions): one client at a time; scan: the whole cohort in one
            # block. Measured in docs/performance-notes.md ("Federated rounds").
            lanes = 1 if self.stepwise else min(self.clients_per_round, 10)
        elif lanes == "auto":
            lanes = default_lanes(platform)
        lanes = int(lanes)
        lanes = -(-max(lanes, devices) // devices) * devices  # Whole lanes per device.
        self.planner = cohort.CohortPlanner(
            self.offsets,
            self.clients_per_round,
            self.batch_hparams,
            lanes,
            grads_batch_size=self.algorithm.grads_batch_size,
        )
        self.replicated = None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())
        self.columns = jax.device_put(self.host_columns, self.replicated)
        engine = cohort.StepwiseCohort() if self.stepwise else cohort.train_cohort
        if self.mesh is not None:  # Every lanes-leading tree split over the devices.
            sharded = NamedSharding(self.mesh, PartitionSpec(DATA_AXIS))
            constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=sharded)
            engine = functools.partial(engine, constrain=constrain)
        self._engine = engine

        def rounds(state, block, columns):
            def body(state, inputs):
                return self.algorithm.round(state, inputs, columns, self._engine)

            return jax.lax.scan(body, state, block)

        self._rounds = jax.jit(rounds, donate_argnums=0)

    def init(self, rng: PRNGKey) -> Any:
        state = self.algorithm.init(self.model.init(rng))
        return jax.device_put(state, self.replicated)

    def data_stream(self, seed: int, start: int) -> Iterator[Any]:
        # Item k is loop step start + k + 1, i.e. the sampler's round start + k (0-based).
        return (self.planner.plan(seed, r) for r in itertools.count(start))

    def prepare(self, items: Sequence[Any]) -> Any:
        block = stack_inputs(items)
        return block if self.stepwise else jax.device_put(block, self.replicated)

    def run_steps(self, state: Any, block: Any, base_rng: PRNGKey, first_step: int):
        # Client keys come from the round number (the samplers' convention), not base_rng.
        del base_rng, first_step
        if not self.stepwise:
            return self._rounds(state, block, self.columns)
        scalars = []
        for r in range(len(block["round"])):
            inputs = jax.tree_util.tree_map(lambda x, r=r: x[r], block)
            state, out = self.algorithm.round(state, inputs, self.columns, self._engine)
            scalars.append(out)
        return state, jax.tree_util.tree_map(lambda *xs: jax.numpy.stack(xs), *scalars)

    def eval_params(self, state: Any, trial: int = 0) -> Any:
        return state.params

    def uses_convolution(self) -> bool | None:
        return model_uses_convolution(self.model, {k: v[:2] for k, v in self.host_columns.items()})

    def use_mesh(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self._configure()

    def logged_scalars(self, step: int) -> dict[str, float]:
        """DP's privacy spent, logged with the train scalars."""
        if self.privacy is None:
            return {}
        from fedjax_exp.algorithms.dp_fed_avg import epsilon_spent

        dp, q = self.privacy, self.clients_per_round / self.planner.num_clients
        noise, accountant = dp.get("noise_multiplier", 0.0), dp.get("accountant", "rdp")
        return {"privacy/epsilon": epsilon_spent(noise, q, step, dp["target_delta"], accountant)}

    def periodic_eval_batches(self, splits: dict[str, Any], batch_size: int, seed: int) -> dict:
        """With ``eval_clients``: per split, the batches of that many clients drawn once."""
        if not self.eval_clients:
            return {}
        from fedjax_exp.core.client_samplers import UniformGetClientSampler

        chosen = {}
        for split, fd in splits.items():
            count = min(int(self.eval_clients), fd.num_clients())
            clients = UniformGetClientSampler(fd, count, seed).sample()
            chosen[split] = [
                b for _, ds, _ in clients for b in ds.padded_batch(batch_size=batch_size)
            ]
        return chosen
