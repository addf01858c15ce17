"""Federated averaging (FedAvg) with a server optimizer (``fedjax.algorithms.fed_avg``).

Each sampled client starts from the server params, runs its client optimizer over its shuffled,
repeated batches and reports ``delta = server_params - client_params``. The server averages the
deltas weighted by the clients' example counts and hands the mean to the server optimizer as a
pseudo-gradient (SGD with learning rate 1 recovers plain FedAvg; Adam, Yogi... give FedOpt).

References:
    McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data,
    AISTATS 2017. https://arxiv.org/abs/1602.05629
    Reddi et al., Adaptive Federated Optimization, ICLR 2021. https://arxiv.org/abs/2003.00295
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from fedjax_exp.algorithms._aggregation import (
    RunningWeightedMean,
    client_num_examples,
    params_delta,
)
from fedjax_exp.core import client_datasets, for_each_client, optimizers, tree_util
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import BatchExample, ClientId, Params, PRNGKey

__all__ = ["ServerState", "create_train_for_each_client", "federated_averaging"]

Grads = Params
GradFn = Callable[[Params, BatchExample, PRNGKey], Grads]


def create_train_for_each_client(grad_fn: GradFn, client_optimizer: optimizers.Optimizer):
    """``for_each_client`` that trains each client from the shared server params.

    Shared input: the server params. Client input: the client's rng. Output per client: the
    delta ``server_params - trained_params``.
    """

    def client_init(server_params: Params, client_rng: PRNGKey) -> dict[str, Any]:
        return {
            "params": server_params,
            "opt_state": client_optimizer.init(server_params),
            "rng": client_rng,
        }

    def client_step(state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        # One key per step for the model's stochastic forward pass; the rest carries on.
        rng, step_rng = jax.random.split(state["rng"])
        grads = grad_fn(state["params"], batch, step_rng)
        opt_state, params = client_optimizer.apply(grads, state["opt_state"], state["params"])
        return {"params": params, "opt_state": opt_state, "rng": rng}

    def client_final(server_params: Params, state: dict[str, Any]) -> Params:
        return params_delta(server_params, state["params"])

    return for_each_client.for_each_client(client_init, client_step, client_final)


@dataclass
class ServerState:
    """FedAvg's state between rounds.

    Attributes:
        params: the server model params.
        opt_state: the server optimizer's state.
    """

    params: Params
    opt_state: optimizers.OptState


def federated_averaging(
    grad_fn: GradFn,
    client_optimizer: optimizers.Optimizer,
    server_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
) -> FederatedAlgorithm:
    """Builds FedAvg.

    Args:
        grad_fn: ``(params, batch, rng) -> grads``, e.g. :func:`fedjax_exp.core.models.model_grad`.
        client_optimizer: the optimizer of local client training.
        server_optimizer: applies the mean client delta to the server params.
        client_batch_hparams: how each client's data is shuffled, repeated and batched.

    Returns:
        A :class:`FederatedAlgorithm` whose ``init(params)`` gives a :class:`ServerState` and whose
        ``apply`` reports ``{'delta_l2_norm': ...}`` for each client.
    """
    return averaging_algorithm(
        create_train_for_each_client(grad_fn, client_optimizer),
        server_optimizer,
        client_batch_hparams,
    )


def averaging_algorithm(
    train_for_each_client: Callable[..., Any],
    server_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
) -> FederatedAlgorithm:
    """FedAvg's round around a client trainer: each client's delta (from
    ``train_for_each_client(server_params, clients)``) averaged weighted by its example count
    and applied by ``server_optimizer``; ``delta_l2_norm`` per client. FedProx shares it.
    """

    def init(params: Params) -> ServerState:
        return ServerState(params, server_optimizer.init(params))

    def apply(
        server_state: ServerState, clients: Sequence[tuple[ClientId, Any, PRNGKey]]
    ) -> tuple[ServerState, Mapping[ClientId, Any]]:
        num_examples = client_num_examples(clients)
        batched = [
            (cid, dataset.shuffle_repeat_batch(client_batch_hparams), rng)
            for cid, dataset, rng in clients
        ]
        mean_delta = RunningWeightedMean(server_state.params)
        diagnostics = {}
        for cid, delta in train_for_each_client(server_state.params, batched):
            mean_delta.add(cid, delta, num_examples[cid])
            diagnostics[cid] = {"delta_l2_norm": tree_util.tree_l2_norm(delta)}
        opt_state, params = server_optimizer.apply(
            mean_delta.result(), server_state.opt_state, server_state.params
        )
        return ServerState(params, opt_state), diagnostics

    return FederatedAlgorithm(init, apply)
