"""SCAFFOLD: federated averaging with control variates against client drift.

The server keeps a control variate ``c`` (an estimate of the full gradient) and one ``c_i``
per client (an estimate of client ``i``'s gradient; zeros for a client not seen yet). Each
round, every sampled client starts from the server params ``x`` and takes ``K_i`` local SGD
steps on corrected gradients::

    y <- y - lr_local * (g_i(y) - c_i + c)

then updates its control variate with *option II* of the paper::

    c_i+ = c_i - c + (x - y) / (K_i * lr_local)

The server averages, uniformly over the round's ``|S|`` clients, the deltas ``x - y`` (applied
by the server optimizer as a pseudo-gradient, like every algorithm here; SGD with learning rate
``lr_global`` is the paper's ``x <- x + lr_global * mean(y - x)``) and the control-variate
changes ``c_i+ - c_i``, and moves ``c <- c + |S| / N * mean(c_i+ - c_i)`` with ``N`` the number
of clients in the population, so that ``c`` stays the mean of all ``N`` client variates.

The averages are uniform (the paper's), not weighted by example counts as FedAvg's: ``c`` is the
plain mean of the ``c_i``, so the model step uses the same weighting. The per-client variates
live in :class:`ServerState` as a mapping from client id to params-shaped arrays, so they are
saved and restored with the rest of the state.

Reference:
    Karimireddy et al., SCAFFOLD: Stochastic Controlled Averaging for Federated Learning,
    ICML 2020. https://arxiv.org/abs/1910.06378
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.algorithms._aggregation import (
    RunningWeightedMean,
    client_num_examples,
    params_delta,
)
from fedjax_exp.core import client_datasets, for_each_client, optimizers, tree_util
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import BatchExample, ClientId, Params, PRNGKey

__all__ = ["ServerState", "create_train_for_each_client", "scaffold"]

Grads = Params
GradFn = Callable[[Params, BatchExample, PRNGKey], Grads]


def create_train_for_each_client(grad_fn: GradFn, client_learning_rate: float):
    """``for_each_client`` of SCAFFOLD's local training.

    Shared input: ``{'params': x, 'control_variate': c}``. Client input: ``{'rng',
    'control_variate': c_i}``. Output per client: ``{'delta': x - y, 'control_variate': c_i+,
    'control_variate_delta': c_i+ - c_i}``.
    """

    def client_init(shared: dict[str, Any], client_input: dict[str, Any]) -> dict[str, Any]:
        return {
            "params": shared["params"],
            "rng": client_input["rng"],
            "server_control_variate": shared["control_variate"],
            "client_control_variate": client_input["control_variate"],
            "num_steps": jnp.zeros((), jnp.int32),
        }

    def client_step(state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        rng, step_rng = jax.random.split(state["rng"])
        grads = grad_fn(state["params"], batch, step_rng)
        params = jax.tree_util.tree_map(
            lambda y, g, ci, c: y - client_learning_rate * (g - ci + c),
            state["params"],
            grads,
            state["client_control_variate"],
            state["server_control_variate"],
        )
        return {**state, "params": params, "rng": rng, "num_steps": state["num_steps"] + 1}

    def client_final(shared: dict[str, Any], state: dict[str, Any]) -> dict[str, Params]:
        delta = params_delta(shared["params"], state["params"])
        # for_each_client rejects clients without batches, so num_steps >= 1 here.
        step_scale = state["num_steps"] * client_learning_rate
        new_control_variate = jax.tree_util.tree_map(
            lambda ci, c, d: ci - c + d / step_scale,
            state["client_control_variate"],
            state["server_control_variate"],
            delta,
        )
        return {
            "delta": delta,
            "control_variate": new_control_variate,
            "control_variate_delta": jax.tree_util.tree_map(
                jnp.subtract, new_control_variate, state["client_control_variate"]
            ),
        }

    return for_each_client.for_each_client(client_init, client_step, client_final)


@dataclass
class ServerState:
    """SCAFFOLD's state between rounds.

    Attributes:
        params: the server model params ``x``.
        opt_state: the server optimizer's state.
        control_variate: the server control variate ``c`` (params-shaped).
        client_control_variates: ``c_i`` of every client trained so far, by client id.
    """

    params: Params
    opt_state: optimizers.OptState
    control_variate: Params
    client_control_variates: Mapping[ClientId, Params]

    def per_client_templates(self) -> dict[str, Params]:
        """One client's entry of each per-client field: what a checkpoint restores each stored
        control variate into (:mod:`fedjax_exp.training.checkpoint`)."""
        return {"client_control_variates": self.control_variate}


def scaffold(
    grad_fn: GradFn,
    client_learning_rate: float,
    server_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    num_clients: int,
) -> FederatedAlgorithm:
    """Builds SCAFFOLD (option II control variates).

    Args:
        grad_fn: ``(params, batch, rng) -> grads``, e.g. :func:`fedjax_exp.core.models.model_grad`.
        client_learning_rate: ``lr_local`` of the clients' corrected SGD steps.
        server_optimizer: applies the mean client delta (``sgd(lr_global)`` is the paper's).
        client_batch_hparams: batching of client training; each batch is one local step, so a
            client's ``K_i`` is its number of batches.
        num_clients: ``N``, the number of clients in the population.

    Returns:
        A :class:`FederatedAlgorithm` with :class:`ServerState`. Diagnostics per client:
        ``delta_l2_norm`` and ``control_variate_delta_l2_norm``.

    Raises:
        ValueError: a non-positive learning rate or population size; at ``apply``, more
            clients in a round than ``num_clients``.
    """
    if not client_learning_rate > 0:
        raise ValueError(f"client_learning_rate must be > 0, got {client_learning_rate}.")
    if not (isinstance(num_clients, int) and num_clients > 0):
        raise ValueError(f"num_clients must be a positive int, got {num_clients!r}.")
    train_for_each_client = create_train_for_each_client(grad_fn, client_learning_rate)

    def init(params: Params) -> ServerState:
        zeros = tree_util.tree_zeros_like(params)
        return ServerState(params, server_optimizer.init(params), zeros, {})

    def apply(
        server_state: ServerState, clients: Sequence[tuple[ClientId, Any, PRNGKey]]
    ) -> tuple[ServerState, Mapping[ClientId, Any]]:
        client_num_examples(clients)
        if len(clients) > num_clients:
            raise ValueError(
                f"a round has {len(clients)} clients but the population was declared with "
                f"num_clients={num_clients}; pass the population size to scaffold()."
            )
        zeros = tree_util.tree_zeros_like(server_state.params)
        known = server_state.client_control_variates
        for cid, _, _ in clients:
            if cid in known:
                tree_util.check_tree_matches(
                    known[cid],
                    server_state.params,
                    f"the stored control variate of client {cid!r}",
                    "the server params",
                )
        batched = [
            (
                cid,
                dataset.shuffle_repeat_batch(client_batch_hparams),
                {"rng": rng, "control_variate": known.get(cid, zeros)},
            )
            for cid, dataset, rng in clients
        ]
        shared = {"params": server_state.params, "control_variate": server_state.control_variate}
        client_control_variates = dict(known)
        mean_delta = RunningWeightedMean(server_state.params)
        mean_control_delta = RunningWeightedMean(server_state.params)
        diagnostics = {}
        for cid, output in train_for_each_client(shared, batched):
            mean_delta.add(cid, output["delta"], 1.0)
            mean_control_delta.add(cid, output["control_variate_delta"], 1.0)
            client_control_variates[cid] = output["control_variate"]
            diagnostics[cid] = {
                "delta_l2_norm": tree_util.tree_l2_norm(output["delta"]),
                "control_variate_delta_l2_norm": tree_util.tree_l2_norm(
                    output["control_variate_delta"]
                ),
            }
        opt_state, params = server_optimizer.apply(
            mean_delta.result(), server_state.opt_state, server_state.params
        )
        fraction = mean_delta.weight_sum / num_clients
        control_variate = jax.tree_util.tree_map(
            lambda c, d: c + fraction * d,
            server_state.control_variate,
            mean_control_delta.result(),
        )
        next_state = ServerState(params, opt_state, control_variate, client_control_variates)
        return next_state, diagnostics

    return FederatedAlgorithm(init, apply)
