"""FedProx: FedAvg whose clients add a proximal term to their loss (``fedjax.algorithms.fed_prox``).

The client objective is ``mean(per_example_loss + proximal_weight / 2 * ||w - w_server||^2)``,
which keeps local training near the round's server params on heterogeneous clients. A weight
of 0 is FedAvg. Aggregation and the server step are FedAvg's, and so is :class:`ServerState`.

Reference:
    Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020.
    https://arxiv.org/abs/1812.06127
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.algorithms import fed_avg
from fedjax_exp.algorithms._aggregation import (
    params_delta,
)
from fedjax_exp.core import client_datasets, for_each_client, optimizers, tree_util
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import BatchExample, Params, PRNGKey

__all__ = ["ServerState", "create_train_for_each_client", "fed_prox"]

Grads = Params
ServerState = fed_avg.ServerState
ProxGradFn = Callable[[Params, Params, BatchExample, PRNGKey], Grads]


def create_train_for_each_client(grad_fn: ProxGradFn, client_optimizer: optimizers.Optimizer):
    """``for_each_client`` training each client with ``grad_fn(params, server_params, batch, rng)``.

    Output per client: the delta ``server_params - trained_params``.
    """

    def client_init(server_params: Params, client_rng: PRNGKey) -> dict[str, Any]:
        return {
            "params": server_params,
            "opt_state": client_optimizer.init(server_params),
            "rng": client_rng,
            # The proximal term's anchor travels with the state: the step sees only the state.
            "server_params": server_params,
        }

    def client_step(state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        rng, step_rng = jax.random.split(state["rng"])
        grads = grad_fn(state["params"], state["server_params"], batch, step_rng)
        opt_state, params = client_optimizer.apply(grads, state["opt_state"], state["params"])
        return {**state, "params": params, "opt_state": opt_state, "rng": rng}

    def client_final(server_params: Params, state: dict[str, Any]) -> Params:
        return params_delta(server_params, state["params"])

    return for_each_client.for_each_client(client_init, client_step, client_final)


def fed_prox(
    per_example_loss: Callable[[Params, BatchExample, PRNGKey], jax.Array],
    client_optimizer: optimizers.Optimizer,
    server_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    proximal_weight: float,
) -> FederatedAlgorithm:
    """Builds FedProx.

    Args:
        per_example_loss: ``(params, batch, rng) -> [batch]`` losses; the proximal term is added
            to each example's loss before the mean.
        client_optimizer: the optimizer of local client training.
        server_optimizer: applies the mean client delta to the server params.
        client_batch_hparams: how each client's data is shuffled, repeated and batched.
        proximal_weight: the proximal term's weight (0 gives FedAvg).

    Returns:
        A :class:`FederatedAlgorithm` with FedAvg's state and ``delta_l2_norm`` diagnostics.
    """

    def proximal_loss(
        params: Params, server_params: Params, batch: BatchExample, rng: PRNGKey
    ) -> jax.Array:
        drift = jax.tree_util.tree_map(jnp.subtract, server_params, params)
        proximal = 0.5 * proximal_weight * tree_util.tree_l2_squared(drift)
        return jnp.mean(per_example_loss(params, batch, rng) + proximal)

    train_for_each_client = create_train_for_each_client(jax.grad(proximal_loss), client_optimizer)
    return fed_avg.averaging_algorithm(
        train_for_each_client, server_optimizer, client_batch_hparams
    )
