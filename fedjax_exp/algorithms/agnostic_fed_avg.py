"""AgnosticFedAvg: FedAvg against the worst mixture of domains (``fedjax...agnostic_fed_avg``).

Every example carries an integer ``domain_id`` in ``[0, num_domains)``. The server keeps domain
weights ``lambda`` (a point of the simplex) and a sliding window of recent per-domain example
counts ``N``. Each round:

1. A pass over each client's data at the server params gives its per-domain loss sums ``L^k``,
   example counts ``N^k`` and scale ``beta^k = sum_d alpha_d N^k_d`` with
   ``alpha = lambda / mean(window)``.
2. Each client trains on ``sum_d alpha_d * (sum of its batch's domain-d losses) / beta^k``.
3. The server averages the deltas weighted by ``beta^k``, applies the server optimizer, moves
   ``lambda`` by exponentiated gradient on the round's mean per-domain loss (``'eg'``; or keeps
   it, ``'none'``) and pushes the round's domain counts into the window.

Reference:
    Ro et al., Communication-Efficient Agnostic Federated Averaging, Interspeech 2021.
    https://arxiv.org/abs/2104.02748
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
from fedjax_exp.core import client_datasets, for_each_client, optimizers, tree_util, util
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, BatchExample, ClientId, Params, PRNGKey

__all__ = [
    "ServerState",
    "agnostic_federated_averaging",
    "create_domain_metrics_for_each_client",
    "create_scaled_loss",
    "create_train_for_each_client",
    "update_domain_weights",
]

PerExampleLoss = Callable[[Params, BatchExample, PRNGKey], jax.Array]
Regularizer = Callable[[Params], jax.Array]
DOMAIN_ID_KEY = "domain_id"


def create_domain_metrics_for_each_client(
    per_example_loss: PerExampleLoss, num_domains: int, regularizer: Regularizer | None = None
):
    """``for_each_client`` of the per-domain loss sums and example counts at shared params.

    Shared input: ``{'params', 'alpha'}``; client input: its rng; batches: padded. Output per
    client: ``{'domain_loss', 'domain_num', 'beta'}`` (``beta = sum(alpha * domain_num)``).
    With a regularizer, its value is added to every domain's loss once per batch.
    """

    def client_init(shared: dict[str, Any], client_rng: PRNGKey) -> dict[str, Any]:
        return {
            "params": shared["params"],
            "rng": client_rng,
            "domain_loss": jnp.zeros(num_domains),
            "domain_num": jnp.zeros(num_domains),
        }

    def client_step(state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        rng, step_rng = jax.random.split(state["rng"])
        mask = batch[EXAMPLE_MASK_KEY]
        losses = per_example_loss(state["params"], batch, step_rng) * mask
        domain_loss = jax.ops.segment_sum(losses, batch[DOMAIN_ID_KEY], num_domains)
        if regularizer is not None:
            domain_loss += regularizer(state["params"])
        domain_num = jax.ops.segment_sum(
            mask.astype(jnp.float32), batch[DOMAIN_ID_KEY], num_domains
        )
        return {
            "params": state["params"],
            "rng": rng,
            "domain_loss": state["domain_loss"] + domain_loss,
            "domain_num": state["domain_num"] + domain_num,
        }

    def client_final(shared: dict[str, Any], state: dict[str, Any]) -> dict[str, jax.Array]:
        return {
            "domain_loss": state["domain_loss"],
            "domain_num": state["domain_num"],
            "beta": jnp.sum(shared["alpha"] * state["domain_num"]),
        }

    return for_each_client.for_each_client(client_init, client_step, client_final)


def create_scaled_loss(
    per_example_loss: PerExampleLoss, num_domains: int, regularizer: Regularizer | None = None
) -> Callable[[Params, BatchExample, PRNGKey, jax.Array, jax.Array], jax.Array]:
    """``(params, batch, rng, alpha, beta) -> sum_d alpha_d * domain_loss_sum_d / beta (+ reg)``.

    Training batches (``shuffle_repeat_batch``) are never padded, so no mask is applied.
    """

    def scaled_loss(
        params: Params, batch: BatchExample, rng: PRNGKey, alpha: jax.Array, beta: jax.Array
    ) -> jax.Array:
        losses = per_example_loss(params, batch, rng)
        domain_loss = jax.ops.segment_sum(losses, batch[DOMAIN_ID_KEY], num_domains)
        loss = jnp.sum(alpha * domain_loss) / beta
        if regularizer is not None:
            loss += regularizer(params)
        return loss

    return scaled_loss


def create_train_for_each_client(
    per_example_loss: PerExampleLoss,
    client_optimizer: optimizers.Optimizer,
    num_domains: int,
    regularizer: Regularizer | None = None,
):
    """``for_each_client`` of client training on the domain-scaled loss.

    Shared input: ``{'params', 'alpha'}``; client input: ``{'rng', 'beta'}``. Output per
    client: its delta ``server_params - trained_params``.
    """
    grad_fn = jax.grad(create_scaled_loss(per_example_loss, num_domains, regularizer))

    def client_init(shared: dict[str, Any], client_input: dict[str, Any]) -> dict[str, Any]:
        return {
            "params": shared["params"],
            "alpha": shared["alpha"],
            "opt_state": client_optimizer.init(shared["params"]),
            "rng": client_input["rng"],
            "beta": client_input["beta"],
        }

    def client_step(state: dict[str, Any], batch: BatchExample) -> dict[str, Any]:
        rng, step_rng = jax.random.split(state["rng"])
        grads = grad_fn(state["params"], batch, step_rng, state["alpha"], state["beta"])
        opt_state, params = client_optimizer.apply(grads, state["opt_state"], state["params"])
        return {**state, "params": params, "opt_state": opt_state, "rng": rng}

    def client_final(shared: dict[str, Any], state: dict[str, Any]) -> Params:
        return params_delta(shared["params"], state["params"])

    return for_each_client.for_each_client(client_init, client_step, client_final)


def update_domain_weights(
    domain_weights: jax.Array,
    domain_loss: jax.Array,
    domain_learning_rate: float,
    domain_algorithm: str,
) -> jax.Array:
    """One step of the domain weights: ``'eg'`` (exponentiated gradient ascent) or ``'none'``.

    Raises:
        ValueError: an unknown ``domain_algorithm``.
    """
    if domain_algorithm == "eg":
        scaled = domain_weights * jnp.exp(domain_learning_rate * domain_loss)
        scaled = jnp.maximum(scaled, jnp.zeros_like(scaled))
        return scaled / jnp.sum(scaled)
    if domain_algorithm == "none":
        return domain_weights
    raise ValueError(f"Unsupported domain algorithm {domain_algorithm!r}: use 'eg' or 'none'.")


@dataclass
class ServerState:
    """AgnosticFedAvg's state between rounds.

    Attributes:
        params: the server model params.
        opt_state: the server optimizer's state.
        domain_weights: the weight of each domain in the objective (sums to 1).
        domain_window: per-domain example counts of the last ``domain_window_size`` rounds.
    """

    params: Params
    opt_state: optimizers.OptState
    domain_weights: jax.Array
    domain_window: list[jax.Array]


def agnostic_federated_averaging(
    per_example_loss: PerExampleLoss,
    client_optimizer: optimizers.Optimizer,
    server_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    domain_batch_hparams: client_datasets.PaddedBatchHParams,
    init_domain_weights: Sequence[float],
    domain_learning_rate: float,
    domain_algorithm: str = "eg",
    domain_window_size: int = 1,
    init_domain_window: Sequence[float] | None = None,
    regularizer: Regularizer | None = None,
) -> FederatedAlgorithm:
    """Builds AgnosticFedAvg. Client examples need an integer ``'domain_id'`` feature.

    Args:
        per_example_loss: ``(params, batch, rng) -> [batch]``, for domain losses and training.
        client_optimizer: the optimizer of local client training.
        server_optimizer: applies the ``beta``-weighted mean client delta.
        client_batch_hparams: batching of client training.
        domain_batch_hparams: batching of the domain-loss pass.
        init_domain_weights: the initial domain weights; they must sum to 1.
        domain_learning_rate: step size of the domain weights.
        domain_algorithm: ``'eg'`` or ``'none'``.
        domain_window_size: how many rounds of domain counts the window keeps.
        init_domain_window: the window's initial counts (default ones).
        regularizer: optional ``params -> scalar`` added to the training loss. (The domain
            losses that drive the weights are data losses alone, as in FedJAX.)

    Returns:
        A :class:`FederatedAlgorithm` with :class:`ServerState` and ``delta_l2_norm``
        diagnostics.

    Raises:
        ValueError: the initial weights do not sum to 1, or the weights and window differ in
            length.
    """
    if abs(sum(init_domain_weights) - 1) > 1e-6:
        raise ValueError(
            f"init_domain_weights must sum to 1 (within 1e-6), got {sum(init_domain_weights)}."
        )
    if init_domain_window is None:
        init_domain_window = jnp.ones_like(jnp.asarray(init_domain_weights))
    if len(init_domain_weights) != len(init_domain_window):
        raise ValueError(
            "init_domain_weights and init_domain_window must have one entry per domain, got "
            f"{len(init_domain_weights)} and {len(init_domain_window)} entries."
        )
    num_domains = len(init_domain_weights)
    domain_metrics_for_each_client = create_domain_metrics_for_each_client(
        per_example_loss, num_domains
    )
    train_for_each_client = create_train_for_each_client(
        per_example_loss, client_optimizer, num_domains, regularizer
    )

    def init(params: Params) -> ServerState:
        window = [jnp.array(init_domain_window)] * domain_window_size
        return ServerState(
            params, server_optimizer.init(params), jnp.array(init_domain_weights), window
        )

    def apply(
        server_state: ServerState, clients: Sequence[tuple[ClientId, Any, PRNGKey]]
    ) -> tuple[ServerState, Mapping[ClientId, Any]]:
        client_num_examples(clients)
        alpha = server_state.domain_weights / jnp.mean(
            jnp.asarray(server_state.domain_window), axis=0
        )
        shared = {"params": server_state.params, "alpha": alpha}
        domain_batched = [
            (cid, dataset.padded_batch(domain_batch_hparams), rng) for cid, dataset, rng in clients
        ]
        domain_metrics = dict(domain_metrics_for_each_client(shared, domain_batched))
        batched = [
            (
                cid,
                dataset.shuffle_repeat_batch(client_batch_hparams),
                {"rng": rng, "beta": domain_metrics[cid]["beta"]},
            )
            for cid, dataset, rng in clients
        ]
        mean_delta = RunningWeightedMean(server_state.params)
        diagnostics = {}
        for cid, delta in train_for_each_client(shared, batched):
            mean_delta.add(cid, delta, domain_metrics[cid]["beta"])
            diagnostics[cid] = {"delta_l2_norm": tree_util.tree_l2_norm(delta)}
        sum_domain_loss = tree_util.tree_sum(m["domain_loss"] for m in domain_metrics.values())
        sum_domain_num = tree_util.tree_sum(m["domain_num"] for m in domain_metrics.values())

        opt_state, params = server_optimizer.apply(
            mean_delta.result(), server_state.opt_state, server_state.params
        )
        domain_weights = update_domain_weights(
            server_state.domain_weights,
            util.safe_div(sum_domain_loss, sum_domain_num),
            domain_learning_rate,
            domain_algorithm,
        )
        domain_window = [*server_state.domain_window[1:], sum_domain_num]
        return ServerState(params, opt_state, domain_weights, domain_window), diagnostics

    return FederatedAlgorithm(init, apply)
