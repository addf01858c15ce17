"""APFL: adaptive personalized federated learning (``fedjax.algorithms.apfl``).

Each client keeps, across rounds, its own params ``v`` and one interpolation coefficient per
params leaf ``a`` (clipped to ``[0, 1]``); its personalized model is ``a * v + (1 - a) * w``.
In each local step a client trains a copy of the global params ``w`` on its own loss, ``v`` on
the loss of the personalized model, and ``a`` by the gradient of that loss with respect to
``a`` (``<v - w, grad>`` per leaf), all with the client optimizer. The server averages the
``w`` deltas weighted by example counts and applies the server optimizer; the client states
live in the server state, keyed by client id.

Reference:
    Deng, Kamani, Mahdavi, Adaptive Personalized Federated Learning, 2020.
    https://arxiv.org/abs/2003.13461
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.algorithms._aggregation import (
    RunningWeightedMean,
    client_num_examples,
    params_delta,
)
from fedjax_exp.core import (
    client_datasets,
    for_each_client,
    metrics,
    models,
    optimizers,
    tree_util,
)
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, BatchExample, ClientId, Params, PRNGKey

__all__ = [
    "ClientState",
    "ServerState",
    "adaptive_personalized_federated_learning",
    "create_eval_for_each_client",
    "create_train_for_each_client",
    "eval_adaptive_personalized_federated_learning",
    "interpolate_params",
    "interpolation_grad_fn",
]

Grads = Params
GradFn = Callable[[Params, BatchExample, PRNGKey], Grads]


@dataclass
class ClientState:
    """What a client keeps between rounds.

    Attributes:
        params: the client's own params ``v``.
        interpolation_coefficients: one coefficient ``a`` in ``[0, 1]`` per params leaf.
    """

    params: Params
    interpolation_coefficients: Params


@dataclass
class ServerState:
    """APFL's state between rounds.

    Attributes:
        params: the global params ``w``.
        opt_state: the server optimizer's state.
        client_states: the :class:`ClientState` of every client trained so far, by client id.
    """

    params: Params
    opt_state: optimizers.OptState
    client_states: Mapping[ClientId, ClientState]

    def per_client_templates(self) -> dict[str, ClientState]:
        """One client's entry of each per-client field: what a checkpoint restores each stored
        client state into (:mod:`fedjax_exp.training.checkpoint`; the stored shapes and dtypes
        are kept, so the per-leaf coefficients need no template of their own shape)."""
        template = jax.tree_util.tree_map(jnp.asarray, self.params)
        return {"client_states": ClientState(template, template)}


@jax.jit
def interpolate_params(
    interpolation_coefficients: Params, client_params: Params, server_params: Params
) -> Params:
    """The personalized params ``a * v + (1 - a) * w``, leaf by leaf."""
    return jax.tree_util.tree_map(
        lambda a, v, w: a * v + (1 - a) * w,
        interpolation_coefficients,
        client_params,
        server_params,
    )


@jax.jit
def interpolation_grad_fn(grads: Grads, client_params: Params, server_params: Params) -> Params:
    """The gradient with respect to each leaf's coefficient: ``<v - w, grads>`` per leaf."""
    return jax.tree_util.tree_map(
        lambda v, w, g: jnp.tensordot(v - w, g, axes=jnp.ndim(v)),
        client_params,
        server_params,
        grads,
    )


def create_train_for_each_client(grad_fn: GradFn, client_optimizer: optimizers.Optimizer):
    """``for_each_client`` of APFL's local training.

    Shared input: the server params. Client input: ``{'rng', 'state'}`` (a :class:`ClientState`).
    Output per client: ``{'state': updated ClientState, 'delta_params': w_server - w_trained}``.
    """

    def client_init(server_params: Params, client_input: dict[str, Any]) -> dict[str, Any]:
        state = client_input["state"]
        return {
            "server_params": server_params,
            "server_opt_state": client_optimizer.init(server_params),
            "client_opt_state": client_optimizer.init(state.params),
            "interpolation_opt_state": client_optimizer.init(state.interpolation_coefficients),
            "rng": client_input["rng"],
            "state": state,
        }

    def client_step(step_state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        rng, server_rng, client_rng = jax.random.split(step_state["rng"], 3)
        state = step_state["state"]
        server_params = step_state["server_params"]
        personalized = interpolate_params(
            state.interpolation_coefficients, state.params, server_params
        )
        server_grads = grad_fn(server_params, batch, server_rng)
        client_grads = grad_fn(personalized, batch, client_rng)
        coefficient_grads = interpolation_grad_fn(client_grads, state.params, server_params)

        server_opt_state, server_params = client_optimizer.apply(
            server_grads, step_state["server_opt_state"], server_params
        )
        client_opt_state, client_params = client_optimizer.apply(
            client_grads, step_state["client_opt_state"], state.params
        )
        interpolation_opt_state, coefficients = client_optimizer.apply(
            coefficient_grads,
            step_state["interpolation_opt_state"],
            state.interpolation_coefficients,
        )
        coefficients = jax.tree_util.tree_map(lambda a: jnp.clip(a, 0, 1), coefficients)
        return {
            "server_params": server_params,
            "server_opt_state": server_opt_state,
            "client_opt_state": client_opt_state,
            "interpolation_opt_state": interpolation_opt_state,
            "rng": rng,
            "state": ClientState(client_params, coefficients),
        }

    def client_final(server_params: Params, step_state: dict[str, Any]) -> dict[str, Any]:
        delta = params_delta(server_params, step_state["server_params"])
        return {"state": step_state["state"], "delta_params": delta}

    return for_each_client.for_each_client(client_init, client_step, client_final)


def adaptive_personalized_federated_learning(
    grad_fn: GradFn,
    client_optimizer: optimizers.Optimizer,
    server_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    client_coefficient: float,
) -> FederatedAlgorithm:
    """Builds APFL.

    Args:
        grad_fn: ``(params, batch, rng) -> grads``, e.g. :func:`fedjax_exp.core.models.model_grad`.
        client_optimizer: trains ``w``, ``v`` and ``a`` locally (three separate states).
        server_optimizer: applies the mean client delta of ``w``.
        client_batch_hparams: batching of client training.
        client_coefficient: the interpolation coefficient of a client's first round.

    Returns:
        A :class:`FederatedAlgorithm` with :class:`ServerState` and ``delta_l2_norm``
        diagnostics. A client seen for the first time starts with ``v = w`` and every
        coefficient ``client_coefficient``.
    """
    train_for_each_client = create_train_for_each_client(grad_fn, client_optimizer)

    def init(params: Params) -> ServerState:
        return ServerState(params, server_optimizer.init(params), {})

    def apply(
        server_state: ServerState, clients: Sequence[tuple[ClientId, Any, PRNGKey]]
    ) -> tuple[ServerState, Mapping[ClientId, Any]]:
        num_examples = client_num_examples(clients)
        for cid, _, _ in clients:
            if cid in server_state.client_states:
                tree_util.check_tree_matches(
                    server_state.client_states[cid].params,
                    server_state.params,
                    f"the stored params of client {cid!r}",
                    "the server params",
                )
        new_client = ClientState(
            server_state.params,
            jax.tree_util.tree_map(lambda _: client_coefficient, server_state.params),
        )
        batched = [
            (
                cid,
                dataset.shuffle_repeat_batch(client_batch_hparams),
                {"rng": rng, "state": server_state.client_states.get(cid, new_client)},
            )
            for cid, dataset, rng in clients
        ]
        # A new mapping: the input state stays as it was (FedJAX updates it in place).
        client_states = dict(server_state.client_states)
        mean_delta = RunningWeightedMean(server_state.params)
        diagnostics = {}
        for cid, output in train_for_each_client(server_state.params, batched):
            client_states[cid] = output["state"]
            mean_delta.add(cid, output["delta_params"], num_examples[cid])
            diagnostics[cid] = {"delta_l2_norm": tree_util.tree_l2_norm(output["delta_params"])}
        opt_state, params = server_optimizer.apply(
            mean_delta.result(), server_state.opt_state, server_state.params
        )
        return ServerState(params, opt_state, client_states), diagnostics

    return FederatedAlgorithm(init, apply)


def _batch_stats(model: models.Model, params: Params, batch: BatchExample) -> dict[str, Any]:
    mask = batch.get(EXAMPLE_MASK_KEY)
    if mask is None:
        mask = jnp.ones([len(next(iter(batch.values())))], dtype=jnp.bool_)
    prediction = model.apply_for_eval(params, batch)
    return {
        name: metrics.evaluate_batch(metric, batch, prediction, mask.astype(jnp.bool_))
        for name, metric in model.eval_metrics.items()
    }


def create_eval_for_each_client(model: models.Model):
    """``for_each_client`` evaluating each client's personalized model.

    Shared input: the server params; client input: the client's :class:`ClientState`. Output
    per client: ``{metric name: Stat}``, merged over its batches.
    """

    def client_init(server_params: Params, client_state: ClientState) -> dict[str, Any]:
        params = interpolate_params(
            client_state.interpolation_coefficients, client_state.params, server_params
        )
        return {
            "params": params,
            "stat": {name: metric.zero() for name, metric in model.eval_metrics.items()},
        }

    def client_step(step_state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        batch_stat = _batch_stats(model, step_state["params"], batch)
        stat = {name: step_state["stat"][name].merge(batch_stat[name]) for name in batch_stat}
        return {"params": step_state["params"], "stat": stat}

    def client_final(server_params: Params, step_state: dict[str, Any]) -> dict[str, Any]:
        del server_params
        return step_state["stat"]

    return for_each_client.for_each_client(client_init, client_step, client_final)


def eval_adaptive_personalized_federated_learning(
    model: models.Model, client_batch_hparams: client_datasets.PaddedBatchHParams
) -> Callable[[ServerState, Iterable[tuple[ClientId, Any]]], Iterator[tuple[ClientId, Any]]]:
    """Builds the evaluation of each client's personalized model.

    Returns:
        ``(server_state, [(client_id, dataset)]) -> iterator of (client_id, {name: Stat})``. A
        client without a stored state is evaluated with the global params (coefficients 0).
    """
    eval_for_each_client = create_eval_for_each_client(model)

    def evaluate(
        server_state: ServerState, clients: Iterable[tuple[ClientId, Any]]
    ) -> Iterator[tuple[ClientId, Any]]:
        global_only = ClientState(
            server_state.params, tree_util.tree_zeros_like(server_state.params)
        )
        batched = (
            (
                cid,
                dataset.padded_batch(client_batch_hparams),
                server_state.client_states.get(cid, global_only),
            )
            for cid, dataset in clients
        )
        return eval_for_each_client(server_state.params, batched)

    return evaluate
