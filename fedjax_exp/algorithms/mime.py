"""Mime: clients mimic a centralized optimizer (``fedjax.algorithms.mime``).

Each round the server first gathers the full-batch gradient ``c`` of the sampled clients' data
at the server params. Clients then train with the *base* optimizer whose state is frozen at the
server's, on SVRG-style corrected gradients ``g(y) - g(x) + c`` (``g(x)`` on the same batch and
rng). The server moves its params by ``server_learning_rate`` times the example-weighted mean
delta and advances the base optimizer's state with ``c``.

Reference:
    Karimireddy et al., Mime: Mimicking Centralized Stochastic Algorithms in Federated
    Learning. https://arxiv.org/abs/2008.03606
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.algorithms._aggregation import (
    RunningWeightedMean,
    check_update_matches,
    client_num_examples,
    params_delta,
)
from fedjax_exp.core import client_datasets, for_each_client, models, optimizers, tree_util
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, BatchExample, ClientId, Params, PRNGKey

__all__ = [
    "ServerState",
    "apply_server_update",
    "create_grads_for_each_client",
    "create_train_for_each_client",
    "mime",
    "mime_family",
    "server_gradient",
]

Grads = Params
GradFn = Callable[[Params, BatchExample, PRNGKey], Grads]


def create_grads_for_each_client(grad_fn: GradFn):
    """``for_each_client`` summing example-weighted gradients at the shared params.

    Output per client: ``(sum_b n_b * grad_b, sum_b n_b)`` over its (padded) batches, ``n_b``
    the batch's real examples.
    """

    def client_init(params: Params, client_rng: PRNGKey) -> dict[str, Any]:
        return {
            "params": params,
            "rng": client_rng,
            "num_sum": 0.0,
            "grads_sum": jax.tree_util.tree_map(jnp.zeros_like, params),
        }

    def client_step(state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        rng, step_rng = jax.random.split(state["rng"])
        grads = grad_fn(state["params"], batch, step_rng)
        num = jnp.sum(batch[EXAMPLE_MASK_KEY])
        grads_sum = tree_util.tree_add(tree_util.tree_weight(grads, num), state["grads_sum"])
        return {
            "params": state["params"],
            "rng": rng,
            "num_sum": state["num_sum"] + num,
            "grads_sum": grads_sum,
        }

    def client_final(params: Params, state: dict[str, Any]) -> tuple[Grads, jax.Array]:
        del params
        return state["grads_sum"], state["num_sum"]

    return for_each_client.for_each_client(client_init, client_step, client_final)


def server_gradient(
    grads_for_each_client,
    params: Params,
    clients: Sequence[tuple[ClientId, Any, PRNGKey]],
    grads_batch_hparams: client_datasets.PaddedBatchHParams,
) -> Grads:
    """The mean gradient at ``params`` over all examples of ``clients`` (one full pass)."""
    batched = [
        (cid, dataset.padded_batch(grads_batch_hparams), rng) for cid, dataset, rng in clients
    ]
    outputs = []
    for cid, (grads_sum, num_sum) in grads_for_each_client(params, batched):
        check_update_matches(cid, grads_sum, params)
        outputs.append((grads_sum, num_sum))
    grads_sum_total, num_sum_total = tree_util.tree_sum(outputs)
    return tree_util.tree_inverse_weight(grads_sum_total, num_sum_total)


def create_train_for_each_client(grad_fn: GradFn, base_optimizer: optimizers.Optimizer):
    """``for_each_client`` of Mime's client training.

    Shared input: ``{'params', 'opt_state', 'control_variate'}`` (server params, base optimizer
    state, server gradient). Output per client: its delta ``server_params - trained_params``.
    """

    def client_init(shared: dict[str, Any], client_rng: PRNGKey) -> dict[str, Any]:
        return {
            "params": shared["params"],
            "opt_state": shared["opt_state"],
            "rng": client_rng,
            "init_params": shared["params"],
            "control_variate": shared["control_variate"],
        }

    def client_step(state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        rng, step_rng = jax.random.split(state["rng"])
        # The same batch and rng at the round's starting params: the variance-reduction term.
        start_grads = grad_fn(state["init_params"], batch, step_rng)
        grads = grad_fn(state["params"], batch, step_rng)
        corrected = jax.tree_util.tree_map(
            lambda g, g0, c: g - g0 + c, grads, start_grads, state["control_variate"]
        )
        # The optimizer state stays the server's: clients mimic its statistics, not update them.
        _, params = base_optimizer.apply(corrected, state["opt_state"], state["params"])
        return {**state, "params": params, "rng": rng}

    def client_final(shared: dict[str, Any], state: dict[str, Any]) -> Params:
        return params_delta(shared["params"], state["params"])

    return for_each_client.for_each_client(client_init, client_step, client_final)


@dataclass
class ServerState:
    """Mime's (and Mime Lite's) state between rounds.

    Attributes:
        params: the server model params.
        opt_state: the base optimizer's state, advanced by the server gradient each round.
    """

    params: Params
    opt_state: optimizers.OptState


def apply_server_update(
    base_optimizer: optimizers.Optimizer,
    server_learning_rate: float,
    server_state: ServerState,
    server_grads: Grads,
    mean_delta: Params,
) -> ServerState:
    """Mime's server step: params by the scaled mean delta, optimizer state by the gradient."""
    params = jax.tree_util.tree_map(
        lambda p, d: p - server_learning_rate * d, server_state.params, mean_delta
    )
    opt_state, _ = base_optimizer.apply(server_grads, server_state.opt_state, server_state.params)
    return ServerState(params, opt_state)


def _delta_diagnostics(
    delta: Params, clip_norm: float | None
) -> tuple[Params, dict[str, jax.Array]]:
    """A client's delta as it enters the mean (clipped to ``clip_norm`` if given), and its
    diagnostics: ``delta_l2_norm``, plus ``clipped_delta_l2_norm`` and ``clipped`` with a clip."""
    diagnostics = {"delta_l2_norm": tree_util.tree_l2_norm(delta)}
    if clip_norm is not None:
        delta = tree_util.tree_clip_by_global_norm(delta, clip_norm)
        diagnostics["clipped_delta_l2_norm"] = tree_util.tree_l2_norm(delta)
        diagnostics["clipped"] = jnp.not_equal(
            diagnostics["delta_l2_norm"], diagnostics["clipped_delta_l2_norm"]
        )
    return delta, diagnostics


def mime_family(
    per_example_loss: Callable[[Params, BatchExample, PRNGKey], jax.Array],
    base_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    grads_batch_hparams: client_datasets.PaddedBatchHParams,
    server_learning_rate: float,
    regularizer: Callable[[Params], jax.Array] | None,
    create_train: Callable[[GradFn, optimizers.Optimizer], Any],
    *,
    share_server_gradient: bool,
    client_delta_clip_norm: float | None = None,
) -> FederatedAlgorithm:
    """The round Mime and Mime Lite share, with their client training plugged in.

    Each round takes the server gradient over the round's clients (reusing their rngs, as
    FedJAX), trains the clients with ``create_train(grad_fn, base_optimizer)``'s
    ``for_each_client`` on shared input ``{'params', 'opt_state'}`` (plus ``'control_variate'``,
    the server gradient, when ``share_server_gradient``), averages the deltas weighted by example
    counts (each optionally clipped first) and applies :func:`apply_server_update`.

    The gradient ``for_each_client`` is built before the training one: code that captures the
    client functions a builder creates relies on that order.
    """
    grad_fn = models.grad(per_example_loss, regularizer)
    grads_for_each_client = create_grads_for_each_client(grad_fn)
    train_for_each_client = create_train(grad_fn, base_optimizer)

    def init(params: Params) -> ServerState:
        return ServerState(params, base_optimizer.init(params))

    def apply(
        server_state: ServerState, clients: Sequence[tuple[ClientId, Any, PRNGKey]]
    ) -> tuple[ServerState, Mapping[ClientId, Any]]:
        num_examples = client_num_examples(clients)
        server_grads = server_gradient(
            grads_for_each_client, server_state.params, clients, grads_batch_hparams
        )
        batched = [
            (cid, dataset.shuffle_repeat_batch(client_batch_hparams), rng)
            for cid, dataset, rng in clients
        ]
        shared = {"params": server_state.params, "opt_state": server_state.opt_state}
        if share_server_gradient:
            shared["control_variate"] = server_grads
        mean_delta = RunningWeightedMean(server_state.params)
        diagnostics = {}
        for cid, delta in train_for_each_client(shared, batched):
            delta, diagnostics[cid] = _delta_diagnostics(delta, client_delta_clip_norm)
            mean_delta.add(cid, delta, num_examples[cid])
        next_state = apply_server_update(
            base_optimizer, server_learning_rate, server_state, server_grads, mean_delta.result()
        )
        return next_state, diagnostics

    return FederatedAlgorithm(init, apply)


def mime(
    per_example_loss: Callable[[Params, BatchExample, PRNGKey], jax.Array],
    base_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    grads_batch_hparams: client_datasets.PaddedBatchHParams,
    server_learning_rate: float,
    regularizer: Callable[[Params], jax.Array] | None = None,
) -> FederatedAlgorithm:
    """Builds Mime.

    Args:
        per_example_loss: ``(params, batch, rng) -> [batch]``, used for both the server gradient
            and client training.
        base_optimizer: the centralized optimizer that clients mimic.
        client_batch_hparams: batching of client training.
        grads_batch_hparams: batching of the server-gradient pass.
        server_learning_rate: scale of the mean client delta applied to the server params.
        regularizer: optional ``params -> scalar`` added to the mean loss.

    Returns:
        A :class:`FederatedAlgorithm` with :class:`ServerState` and ``delta_l2_norm``
        diagnostics.
    """
    return mime_family(
        per_example_loss,
        base_optimizer,
        client_batch_hparams,
        grads_batch_hparams,
        server_learning_rate,
        regularizer,
        create_train_for_each_client,
        share_server_gradient=True,
    )
