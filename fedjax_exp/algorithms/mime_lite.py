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

from collections.abc import Callable
from typing import Any

import jax

from fedjax_exp.algorithms import mime
from fedjax_exp.algorithms._aggregation import params_delta
from fedjax_exp.core import client_datasets, for_each_client, optimizers
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import BatchExample, Params, PRNGKey

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
        per_example_loss, base_optimizer, client_batch_hparams, grads_batch_hparams,
        server_learning_rate, regularizer: as for :func:`fedjax_exp.algorithms.mime.mime`.
        client_delta_clip_norm: clip each client delta to this global L2 norm (None: no clip).

    Returns:
        A :class:`FederatedAlgorithm` with Mime's ``ServerState``. Diagnostics per client:
        ``delta_l2_norm``, and with clipping also ``clipped_delta_l2_norm`` and ``clipped``.
    """
    return mime.mime_family(
        per_example_loss,
        base_optimizer,
        client_batch_hparams,
        grads_batch_hparams,
        server_learning_rate,
        regularizer,
        create_train_for_each_client,
        share_server_gradient=False,  # Lite: plain gradients, no server-gradient correction.
        client_delta_clip_norm=client_delta_clip_norm,
    )
