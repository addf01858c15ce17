"""Mime Lite: Mime without the per-step control variate (``fedjax.algorithms.mime_lite``).

Clients train with the base optimizer on plain gradients, its state frozen at the server's.
The server moves its params by ``server_learning_rate`` times the example-weighted mean delta
(each delta optionally clipped to a global L2 norm first) and advances the base optimizer's
state with the full-batch gradient of the round's clients at the old server params. The state
is Mime's :class:`~fedjax_exp.algorithms.mime.ServerState`.

Reference:
    Karimireddy et al., Mime: Mimicking Centralized Stochastic Algorithms in Federated
    Learning. https://arxiv.org/abs/2008.03606
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.algorithms import mime
from fedjax_exp.algorithms._aggregation import (
    RunningWeightedMean,
    client_num_examples,
    params_delta,
)
from fedjax_exp.core import client_datasets, for_each_client, models, optimizers, tree_util
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import BatchExample, ClientId, Params, PRNGKey

__all__ = ["create_train_for_each_client", "mime_lite"]

Grads = Params
GradFn = Callable[[Params, BatchExample, PRNGKey], Grads]


def create_train_for_each_client(grad_fn: GradFn, base_optimizer: optimizers.Optimizer):
    """``for_each_client`` of Mime Lite's client training.

    Shared input: ``{'params', 'opt_state'}``. Output per client: its delta
    ``server_params - trained_params``.
    """

    def client_init(shared: dict[str, Any], client_rng: PRNGKey) -> dict[str, Any]:
        return {"params": shared["params"], "opt_state": shared["opt_state"], "rng": client_rng}

    def client_step(state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        rng, step_rng = jax.random.split(state["rng"])
        grads = grad_fn(state["params"], batch, step_rng)
        _, params = base_optimizer.apply(grads, state["opt_state"], state["params"])
        return {"params": params, "opt_state": state["opt_state"], "rng": rng}

    def client_final(shared: dict[str, Any], state: dict[str, Any]) -> Params:
        return params_delta(shared["params"], state["params"])

    return for_each_client.for_each_client(client_init, client_step, client_final)


def mime_lite(
    per_example_loss: Callable[[Params, BatchExample, PRNGKey], jax.Array],
    base_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    grads_batch_hparams: client_datasets.PaddedBatchHParams,
    server_learning_rate: float,
    regularizer: Callable[[Params], jax.Array] | None = None,
    client_delta_clip_norm: float | None = None,
) -> FederatedAlgorithm:
    """Builds Mime Lite.

    Args:
        per_example_loss: ``(params, batch, rng) -> [batch]``, used for both the server gradient
            and client training.
        base_optimizer: the centralized optimizer that clients mimic.
        client_batch_hparams: batching of client training.
        grads_batch_hparams: batching of the server-gradient pass.
        server_learning_rate: scale of the mean client delta applied to the server params.
        regularizer: optional ``params -> scalar`` added to the mean loss.
        client_delta_clip_norm: clip each client delta to this global L2 norm (None: no clip).

    Returns:
        A :class:`FederatedAlgorithm` with Mime's ``ServerState``. Diagnostics per client:
        ``delta_l2_norm``, and with clipping also ``clipped_delta_l2_norm`` and ``clipped``.
    """
    grad_fn = models.grad(per_example_loss, regularizer)
    grads_for_each_client = mime.create_grads_for_each_client(grad_fn)
    train_for_each_client = create_train_for_each_client(grad_fn, base_optimizer)

    def init(params: Params) -> mime.ServerState:
        return mime.ServerState(params, base_optimizer.init(params))

    def apply(
        server_state: mime.ServerState, clients: Sequence[tuple[ClientId, Any, PRNGKey]]
    ) -> tuple[mime.ServerState, Mapping[ClientId, Any]]:
        num_examples = client_num_examples(clients)
        batched = [
            (cid, dataset.shuffle_repeat_batch(client_batch_hparams), rng)
            for cid, dataset, rng in clients
        ]
        shared = {"params": server_state.params, "opt_state": server_state.opt_state}
        mean_delta = RunningWeightedMean(server_state.params)
        diagnostics: dict[ClientId, dict[str, Any]] = {}
        for cid, delta in train_for_each_client(shared, batched):
            diagnostics[cid] = {"delta_l2_norm": tree_util.tree_l2_norm(delta)}
            if client_delta_clip_norm is not None:
                delta = tree_util.tree_clip_by_global_norm(delta, client_delta_clip_norm)
                clipped_norm = tree_util.tree_l2_norm(delta)
                diagnostics[cid]["clipped_delta_l2_norm"] = clipped_norm
                diagnostics[cid]["clipped"] = jnp.not_equal(
                    diagnostics[cid]["delta_l2_norm"], clipped_norm
                )
            mean_delta.add(cid, delta, num_examples[cid])
        # The server gradient is taken after training, at the round's starting params (the
        # clients' rngs are reused for it, as in FedJAX).
        server_grads = mime.server_gradient(
            grads_for_each_client, server_state.params, clients, grads_batch_hparams
        )
        next_state = mime.apply_server_update(
            base_optimizer, server_learning_rate, server_state, server_grads, mean_delta.result()
        )
        return next_state, diagnostics

    return FederatedAlgorithm(init, apply)
