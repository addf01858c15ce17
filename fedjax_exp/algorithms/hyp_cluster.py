"""HypCluster: federated hypothesis-based clustering (``fedjax.algorithms.hyp_cluster``).

The server keeps ``k`` cluster models. Each round alternates two steps over the sampled
clients, like k-means with models for centers:

- maximization: every client is assigned the cluster whose params give it the lowest average
  loss (on its padded batches);
- expectation: every client trains from its cluster's params; each cluster's params take a
  server-optimizer step on the example-weighted mean delta of its clients (a cluster with no
  client this round is left as it was).

``init`` takes the list of cluster params: from :func:`random_init`, :func:`kmeans_init` or
:class:`ModelKMeansInitializer`.

Reference:
    Mansour, Mohri, Ro, Suresh, Three Approaches for Personalization with Applications to
    Federated Learning, 2020. https://arxiv.org/abs/2002.10619
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.algorithms._aggregation import (
    RunningWeightedMean,
    client_num_examples,
    params_delta,
)
from fedjax_exp.core import client_datasets, for_each_client, models, optimizers
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import BatchExample, ClientId, OptState, Params, PRNGKey

__all__ = [
    "ClientDeltaTrainer",
    "ClientParamsTrainer",
    "HypClusterEvaluator",
    "ModelKMeansInitializer",
    "ServerState",
    "expectation_step",
    "hyp_cluster",
    "kmeans_init",
    "maximization_step",
    "random_init",
]

PerExampleLoss = Callable[[Params, BatchExample, PRNGKey], jax.Array]
Regularizer = Callable[[Params], jax.Array]
SampledClients = Sequence[tuple[ClientId, client_datasets.ClientDataset, PRNGKey]]


@dataclass
class ServerState:
    """HypCluster's state between rounds.

    Attributes:
        cluster_params: the params of each cluster.
        opt_states: the server optimizer's state of each cluster.
    """

    cluster_params: list[Params]
    opt_states: list[OptState]


class _BaseClientTrainer:
    """Trains each client from shared params or from its own params."""

    def __init__(
        self,
        grad_fn: Callable[[Params, BatchExample, PRNGKey], Params],
        client_optimizer: optimizers.Optimizer,
        return_delta: bool,
    ):
        # Shared input: the params every client starts from, or None when each client brings
        # its own (then its client input is (rng, params) instead of rng).
        def client_init(shared_params: Params | None, client_input: Any) -> tuple:
            if shared_params is not None:
                rng, params = client_input, shared_params
            else:
                rng, params = client_input
            return rng, params, client_optimizer.init(params), params

        def client_step(state: tuple, batch: BatchExample) -> tuple:
            rng, params, opt_state, start_params = state
            rng, step_rng = jax.random.split(rng)
            grads = grad_fn(params, batch, step_rng)
            opt_state, params = client_optimizer.apply(grads, opt_state, params)
            return rng, params, opt_state, start_params

        def client_final(shared_params: Params | None, state: tuple) -> Params:
            del shared_params
            _, params, _, start_params = state
            if return_delta:
                return params_delta(start_params, params)
            return params

        self._train_each_client = for_each_client.for_each_client(
            client_init, client_step, client_final
        )
        self._return_delta = return_delta

    def returns_delta(self) -> bool:
        """Whether the trainer yields deltas (True) or final params (False)."""
        return self._return_delta

    def train_global_params(
        self, params: Params, clients: Iterable[tuple[ClientId, Iterable[BatchExample], PRNGKey]]
    ) -> Iterator[tuple[ClientId, Params]]:
        """Trains every ``(client_id, batches, rng)`` from ``params``."""
        yield from self._train_each_client(params, clients)

    def train_per_client_params(
        self, clients: Iterable[tuple[ClientId, Iterable[BatchExample], PRNGKey, Params]]
    ) -> Iterator[tuple[ClientId, Params]]:
        """Trains every ``(client_id, batches, rng, params)`` from its own ``params``."""
        yield from self._train_each_client(
            None, [(cid, batches, (rng, params)) for cid, batches, rng, params in clients]
        )


class ClientDeltaTrainer(_BaseClientTrainer):
    """Trains clients; yields each client's delta ``start_params - trained_params``."""

    def __init__(
        self,
        grad_fn: Callable[[Params, BatchExample, PRNGKey], Params],
        client_optimizer: optimizers.Optimizer,
    ):
        super().__init__(grad_fn, client_optimizer, return_delta=True)


class ClientParamsTrainer(_BaseClientTrainer):
    """Trains clients; yields each client's trained params."""

    def __init__(
        self,
        grad_fn: Callable[[Params, BatchExample, PRNGKey], Params],
        client_optimizer: optimizers.Optimizer,
    ):
        super().__init__(grad_fn, client_optimizer, return_delta=False)


@jax.jit
def _cluster_assignment(cluster_losses: dict[ClientId, list[jax.Array]]) -> dict:
    return {cid: jnp.argmin(jnp.stack(losses)) for cid, losses in cluster_losses.items()}


def _cluster_losses(
    evaluator: models.AverageLossEvaluator,
    cluster_params: list[Params],
    clients: SampledClients,
    batch_hparams: client_datasets.PaddedBatchHParams,
) -> dict[ClientId, list[jax.Array]]:
    """Every client's average loss under every cluster's params (one rng per cluster)."""
    losses: dict[ClientId, list[jax.Array]] = {cid: [] for cid, _, _ in clients}
    cluster_rngs = [jax.random.split(rng, len(cluster_params)) for _, _, rng in clients]
    for i, params in enumerate(cluster_params):
        evaluated = evaluator.evaluate_global_params(
            params,
            [
                (cid, dataset.padded_batch(batch_hparams), rngs[i])
                for (cid, dataset, _), rngs in zip(clients, cluster_rngs, strict=True)
            ],
        )
        for cid, loss in evaluated:
            losses[cid].append(loss)
    return losses


def maximization_step(
    evaluator: models.AverageLossEvaluator,
    cluster_params: list[Params],
    clients: SampledClients,
    batch_hparams: client_datasets.PaddedBatchHParams,
) -> dict[ClientId, int]:
    """Assigns each client the cluster under which its average loss is lowest."""
    losses = _cluster_losses(evaluator, cluster_params, clients, batch_hparams)
    return jax.device_get(_cluster_assignment(losses))


def expectation_step(
    trainer: ClientDeltaTrainer,
    cluster_params: list[Params],
    client_cluster_ids: Mapping[ClientId, int],
    clients: SampledClients,
    batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
) -> list[Params | None]:
    """Each cluster's example-weighted mean client delta; None for a cluster without clients."""
    num_examples = client_num_examples(clients)
    means = [RunningWeightedMean(params) for params in cluster_params]
    trained = trainer.train_per_client_params(
        [
            (
                cid,
                dataset.shuffle_repeat_batch(batch_hparams),
                rng,
                cluster_params[client_cluster_ids[cid]],
            )
            for cid, dataset, rng in clients
        ]
    )
    for cid, delta in trained:
        means[client_cluster_ids[cid]].add(cid, delta, num_examples[cid])
    return [mean.result() if mean.weight_sum > 0 else None for mean in means]


def hyp_cluster(
    per_example_loss: PerExampleLoss,
    client_optimizer: optimizers.Optimizer,
    server_optimizer: optimizers.Optimizer,
    maximization_batch_hparams: client_datasets.PaddedBatchHParams,
    expectation_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    regularizer: Regularizer | None = None,
) -> FederatedAlgorithm:
    """Builds HypCluster.

    Args:
        per_example_loss: ``(params, batch, rng) -> [batch]``.
        client_optimizer: the optimizer of local client training.
        server_optimizer: applies each cluster's mean delta to its params.
        maximization_batch_hparams: batching of the cluster-assignment losses.
        expectation_batch_hparams: batching of client training.
        regularizer: optional ``params -> scalar`` added to the losses.

    Returns:
        A :class:`FederatedAlgorithm` whose ``init`` takes the *list* of cluster params.
        Diagnostics per client: ``{'cluster_id': ...}``.
    """
    evaluator = models.AverageLossEvaluator(per_example_loss, regularizer)
    trainer = ClientDeltaTrainer(models.grad(per_example_loss, regularizer), client_optimizer)

    def init(cluster_params: list[Params]) -> ServerState:
        return ServerState(
            list(cluster_params), [server_optimizer.init(params) for params in cluster_params]
        )

    def apply(
        server_state: ServerState, clients: SampledClients
    ) -> tuple[ServerState, Mapping[ClientId, Any]]:
        client_num_examples(clients)
        # One key for the assignment losses and one for training, per client.
        split_rngs = [jax.random.split(rng) for _, _, rng in clients]
        cluster_ids = maximization_step(
            evaluator,
            server_state.cluster_params,
            [(cid, ds, rngs[0]) for (cid, ds, _), rngs in zip(clients, split_rngs, strict=True)],
            maximization_batch_hparams,
        )
        cluster_deltas = expectation_step(
            trainer,
            server_state.cluster_params,
            cluster_ids,
            [(cid, ds, rngs[1]) for (cid, ds, _), rngs in zip(clients, split_rngs, strict=True)],
            expectation_batch_hparams,
        )
        cluster_params, opt_states = [], []
        for delta, opt_state, params in zip(
            cluster_deltas, server_state.opt_states, server_state.cluster_params, strict=True
        ):
            if delta is not None:
                opt_state, params = server_optimizer.apply(delta, opt_state, params)
            cluster_params.append(params)
            opt_states.append(opt_state)
        diagnostics = {cid: {"cluster_id": cluster_id} for cid, cluster_id in cluster_ids.items()}
        return ServerState(cluster_params, opt_states), diagnostics

    return FederatedAlgorithm(init, apply)


@functools.partial(jax.jit, static_argnums=(0, 1))
def random_init(num_clusters: int, init: Callable[[PRNGKey], Params], rng: PRNGKey) -> list[Params]:
    """``num_clusters`` params from ``init``, each with its own key split from ``rng``."""
    return [init(key) for key in jax.random.split(rng, num_clusters)]


def kmeans_init(
    num_clusters: int,
    init_params: Params,
    clients: SampledClients,
    trainer: ClientParamsTrainer,
    train_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    evaluator: models.AverageLossEvaluator,
    eval_batch_hparams: client_datasets.PaddedBatchHParams,
    rng: PRNGKey,
) -> list[Params]:
    """Cluster params chosen among trained client params, k-means++ style.

    Every client is trained from ``init_params``. The first center is a random client's
    params (``rng`` picks it among the client ids in sorted order); each further center is the
    params of the client whose best loss under the centers chosen so far is the worst.

    Raises:
        ValueError: ``num_clusters`` is not positive.
    """
    if num_clusters <= 0:
        raise ValueError(f"num_clusters must be > 0, got {num_clusters}.")
    first_center = jax.random.choice(rng, len(clients))
    # Per client: one key for training, then one per further center's loss evaluation.
    client_rngs = [jax.random.split(client_rng, num_clusters) for _, _, client_rng in clients]
    client_params = dict(
        trainer.train_global_params(
            init_params,
            [
                (cid, dataset.shuffle_repeat_batch(train_batch_hparams), rngs[0])
                for (cid, dataset, _), rngs in zip(clients, client_rngs, strict=True)
            ],
        )
    )
    centers = [client_params[sorted(client_params)[first_center]]]
    best_losses = {cid: jnp.inf for cid in client_params}
    for i in range(1, num_clusters):
        evaluated = evaluator.evaluate_global_params(
            centers[-1],
            [
                (cid, dataset.padded_batch(eval_batch_hparams), rngs[i])
                for (cid, dataset, _), rngs in zip(clients, client_rngs, strict=True)
            ],
        )
        new_losses = jax.device_get(dict(evaluated))
        best_losses = {cid: min(best_losses[cid], new_losses[cid]) for cid in best_losses}
        worst_client = max(best_losses, key=lambda cid: best_losses[cid])
        centers.append(client_params[worst_client])
    return centers


class ModelKMeansInitializer:
    """:func:`kmeans_init` for a :class:`~fedjax_exp.core.models.Model`."""

    def __init__(
        self,
        model: models.Model,
        client_optimizer: optimizers.Optimizer,
        regularizer: Regularizer | None = None,
    ):
        self._model = model
        self._trainer = ClientParamsTrainer(models.model_grad(model, regularizer), client_optimizer)
        self._evaluator = models.AverageLossEvaluator(
            models.model_per_example_loss(model), regularizer
        )

    def cluster_params(
        self,
        num_clusters: int,
        rng: PRNGKey,
        clients: SampledClients,
        train_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
        eval_batch_hparams: client_datasets.PaddedBatchHParams,
    ) -> list[Params]:
        """Initial params from ``model.init``, then :func:`kmeans_init` (keys split from rng)."""
        init_rng, center_rng = jax.random.split(rng)
        return kmeans_init(
            num_clusters=num_clusters,
            init_params=self._model.init(init_rng),
            clients=clients,
            trainer=self._trainer,
            train_batch_hparams=train_batch_hparams,
            evaluator=self._evaluator,
            eval_batch_hparams=eval_batch_hparams,
            rng=center_rng,
        )


class HypClusterEvaluator:
    """Evaluates each client with the cluster that fits its training data best."""

    def __init__(self, model: models.Model, regularizer: Regularizer | None = None):
        self._assignment_evaluator = models.AverageLossEvaluator(
            models.model_per_example_loss(model), regularizer
        )
        self._model_evaluator = models.ModelEvaluator(model)

    def evaluate_clients(
        self,
        cluster_params: list[Params],
        train_clients: SampledClients,
        test_clients: Sequence[tuple[ClientId, client_datasets.ClientDataset]],
        batch_hparams: client_datasets.PaddedBatchHParams,
    ) -> Iterator[tuple[ClientId, dict[str, Any]]]:
        """Assigns clusters on ``train_clients``; yields each test client's metrics."""
        cluster_ids = maximization_step(
            self._assignment_evaluator, cluster_params, train_clients, batch_hparams
        )
        yield from self._model_evaluator.evaluate_per_client_params(
            [
                (cid, dataset.padded_batch(batch_hparams), cluster_params[cluster_ids[cid]])
                for cid, dataset in test_clients
            ]
        )
