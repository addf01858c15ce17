"""DP-FedAvg: FedAvg with client-level differential privacy.

Each round, every client's delta ``server_params - client_params`` is clipped to the global L2
norm ``clip_norm`` (over the whole pytree), the clipped deltas are averaged **uniformly** over
the round's ``n = clients_per_round`` clients, and Gaussian noise with standard deviation
``noise_multiplier * clip_norm / n`` is added to every coordinate of the mean before the server
optimizer applies it.

Why uniform weights: adding or removing one client changes the *sum* of clipped deltas by at
most ``clip_norm``, and the mean by at most ``clip_norm / n`` with a fixed denominator ``n``.
Example-count weights (FedAvg's) would let one large client move the mean by up to its share of
the weight, which is unbounded, so the noise could not be calibrated to it.

Privacy accounting: each round is a sampled Gaussian mechanism with noise multiplier
``noise_multiplier`` and sampling probability ``q = clients_per_round / num_clients``, composed
over the rounds run so far; ``epsilon`` at ``target_delta`` comes from the ``dp-accounting``
package (RDP by default, or PLD) for add-or-remove-one-client adjacency. As in McMahan et al.
(2018), the accountant treats the cohort as Poisson sampled with rate ``q``; a sampler that
draws exactly ``clients_per_round`` clients uniformly is the usual stand-in for it. The epsilon
spent after each round is kept in :class:`ServerState` (``state.epsilon``).

References:
    McMahan, Ramage, Talwar, Zhang, Learning Differentially Private Recurrent Language Models,
    ICLR 2018. https://arxiv.org/abs/1710.06963
    Mironov, Talwar, Zhang, Renyi Differential Privacy of the Sampled Gaussian Mechanism, 2019.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp

from fedjax_exp.algorithms._aggregation import RunningWeightedMean, client_num_examples
from fedjax_exp.algorithms.fed_avg import create_train_for_each_client
from fedjax_exp.core import client_datasets, optimizers, tree_util
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.typing import BatchExample, ClientId, Params, PRNGKey

__all__ = ["ServerState", "add_gaussian_noise", "dp_federated_averaging", "epsilon_spent"]

Grads = Params
GradFn = Callable[[Params, BatchExample, PRNGKey], Grads]
ACCOUNTANTS = ("rdp", "pld")


def _round_event(noise_multiplier: float, sampling_probability: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(
        sampling_probability, dp_accounting.GaussianDpEvent(noise_multiplier)
    )


def epsilon_spent(
    noise_multiplier: float,
    sampling_probability: float,
    num_rounds: int,
    target_delta: float,
    accountant: str = "rdp",
) -> float:
    """The epsilon at ``target_delta`` of ``num_rounds`` sampled Gaussian rounds.

    Args:
        noise_multiplier: noise standard deviation divided by the clip norm.
        sampling_probability: the chance ``q`` that a client takes part in a round.
        num_rounds: rounds composed.
        target_delta: the delta of the (epsilon, delta) guarantee.
        accountant: ``'rdp'`` (Renyi DP; fast, slightly loose) or ``'pld'`` (privacy loss
            distributions; tighter, slower for many rounds).

    Returns:
        epsilon; 0 before any round, ``inf`` without noise.
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    if num_rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        _round_event(noise_multiplier, sampling_probability), num_rounds
    )
    if accountant == "rdp":
        privacy_accountant = dp_accounting.rdp.RdpAccountant()
    else:
        privacy_accountant = dp_accounting.pld.PLDAccountant()
    # The RDP accountant warns (through absl) for each Renyi order whose series does not
    # converge and leaves that order out of the minimum: expected for small noise multipliers,
    # harmless, and one console line per order per round otherwise.
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(_drop_unconverged_order_warnings)
    try:
        privacy_accountant.compose(event)
        return float(privacy_accountant.get_epsilon(target_delta))
    finally:
        absl_logger.removeFilter(_drop_unconverged_order_warnings)


def _drop_unconverged_order_warnings(record: logging.LogRecord) -> bool:
    return "failed to converge" not in str(record.msg)


def add_gaussian_noise(tree: Params, stddev: float, rng: PRNGKey) -> Params:
    """``tree`` plus independent ``N(0, stddev^2)`` noise on every coordinate of every leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(rng, len(leaves))
    noisy = [
        leaf + stddev * jax.random.normal(key, jnp.shape(leaf), jnp.result_type(leaf))
        for leaf, key in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noisy)


@dataclass
class ServerState:
    """DP-FedAvg's state between rounds.

    Attributes:
        params: the server model params.
        opt_state: the server optimizer's state.
        noise_rng: the key the next round's noise is split from.
        num_rounds: rounds completed.
        epsilon: the privacy spent by those rounds, at the algorithm's ``target_delta``.
    """

    params: Params
    opt_state: optimizers.OptState
    noise_rng: PRNGKey
    num_rounds: int
    epsilon: float


def _check_arguments(
    clip_norm: float | None,
    noise_multiplier: float,
    num_clients: int,
    clients_per_round: int,
    target_delta: float,
    accountant: str,
) -> None:
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    if noise_multiplier > 0 and clip_norm is None:
        raise ValueError(
            f"noise_multiplier={noise_multiplier} needs a clip_norm: the noise is calibrated to "
            "the clipped client updates (std = noise_multiplier * clip_norm / clients). Pass "
            "clip_norm > 0, or noise_multiplier=0 for no privacy."
        )
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 (or None for no clipping), got {clip_norm}.")
    if not 0 < clients_per_round <= num_clients:
        raise ValueError(
            "need 0 < clients_per_round <= num_clients, got "
            f"clients_per_round={clients_per_round}, num_clients={num_clients}."
        )
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}.")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")


def dp_federated_averaging(
    grad_fn: GradFn,
    client_optimizer: optimizers.Optimizer,
    server_optimizer: optimizers.Optimizer,
    client_batch_hparams: client_datasets.ShuffleRepeatBatchHParams,
    *,
    clip_norm: float | None,
    noise_multiplier: float,
    num_clients: int,
    clients_per_round: int,
    target_delta: float,
    noise_seed: int = 0,
    accountant: str = "rdp",
) -> FederatedAlgorithm:
    """Builds DP-FedAvg.

    Args:
        grad_fn: ``(params, batch, rng) -> grads``, e.g. :func:`fedjax_exp.core.models.model_grad`.
        client_optimizer: the optimizer of local client training.
        server_optimizer: applies the noisy mean of clipped deltas.
        client_batch_hparams: batching of client training.
        clip_norm: the L2 bound of each client's delta (None: no clipping; then
            ``noise_multiplier`` must be 0).
        noise_multiplier: noise std over the per-client sensitivity ``clip_norm`` (0: no noise).
        num_clients: the number of clients in the population.
        clients_per_round: the clients of every round; ``apply`` checks it.
        target_delta: the delta at which epsilon is reported.
        noise_seed: seeds the server's noise key.
        accountant: ``'rdp'`` or ``'pld'`` (see :func:`epsilon_spent`).

    Returns:
        A :class:`FederatedAlgorithm` with :class:`ServerState` (``epsilon`` after each round).
        Diagnostics per client: ``delta_l2_norm``, ``clipped_delta_l2_norm`` and ``clipped``.

    Raises:
        ValueError: noise without a clip norm, or any argument out of range.
    """
    _check_arguments(
        clip_norm, noise_multiplier, num_clients, clients_per_round, target_delta, accountant
    )
    train_for_each_client = create_train_for_each_client(grad_fn, client_optimizer)
    sampling_probability = clients_per_round / num_clients

    def init(params: Params) -> ServerState:
        return ServerState(
            params, server_optimizer.init(params), jax.random.PRNGKey(noise_seed), 0, 0.0
        )

    def apply(
        server_state: ServerState, clients: Sequence[tuple[ClientId, Any, PRNGKey]]
    ) -> tuple[ServerState, Mapping[ClientId, Any]]:
        client_num_examples(clients)
        if len(clients) != clients_per_round:
            raise ValueError(
                f"DP-FedAvg was built for clients_per_round={clients_per_round} but this round "
                f"has {len(clients)} clients; the noise and the privacy accounting assume that "
                "number. Sample exactly clients_per_round clients per round."
            )
        batched = [
            (cid, dataset.shuffle_repeat_batch(client_batch_hparams), rng)
            for cid, dataset, rng in clients
        ]
        mean_delta = RunningWeightedMean(server_state.params)
        diagnostics: dict[ClientId, dict[str, Any]] = {}
        for cid, delta in train_for_each_client(server_state.params, batched):
            norm = tree_util.tree_l2_norm(delta)
            diagnostics[cid] = {"delta_l2_norm": norm}
            if clip_norm is not None:
                delta = tree_util.tree_clip_by_global_norm(delta, clip_norm)
                clipped_norm = tree_util.tree_l2_norm(delta)
                diagnostics[cid]["clipped_delta_l2_norm"] = clipped_norm
                diagnostics[cid]["clipped"] = norm > clip_norm
            # Uniform weights: the mean's sensitivity to one client is clip_norm / n.
            mean_delta.add(cid, delta, 1.0)
        update = mean_delta.result()
        noise_rng, round_rng = jax.random.split(server_state.noise_rng)
        if noise_multiplier > 0:
            stddev = noise_multiplier * clip_norm / clients_per_round
            update = add_gaussian_noise(update, stddev, round_rng)
        opt_state, params = server_optimizer.apply(
            update, server_state.opt_state, server_state.params
        )
        num_rounds = server_state.num_rounds + 1
        epsilon = epsilon_spent(
            noise_multiplier, sampling_probability, num_rounds, target_delta, accountant
        )
        return ServerState(params, opt_state, noise_rng, num_rounds, epsilon), diagnostics

    return FederatedAlgorithm(init, apply)
