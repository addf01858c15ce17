"""The library's federated algorithms as rounds of the cohort engine (``core.cohort``).

Each builder calls the library algorithm's own constructor (``fed_avg.federated_averaging``,
``fed_prox.fed_prox``, ``scaffold.scaffold``, ``dp_fed_avg.dp_federated_averaging``,
``mime.mime``, ``mime_lite.mime_lite``) and captures the client functions it builds, so
local training is the library's arithmetic; the server step below is the library's too,
written over the lanes axis instead of a Python loop over clients. A round then equals the
library algorithm's ``apply`` on the same clients, keys and batches, up to the order in which
the client updates are summed.

A round is ``round(state, inputs, columns, cohort) -> (state, scalars)``: ``inputs`` is a
:meth:`~fedjax_exp.core.cohort.CohortPlanner.plan` on the device, ``cohort`` is
:func:`~fedjax_exp.core.cohort.train_cohort` (or a stepwise or sharded variant), ``scalars``
are per-round means: ``loss`` (client training loss over all local steps, taken before each
step) and ``delta_l2_norm`` (over the round's clients).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.algorithms import dp_fed_avg, fed_avg, fed_prox, mime, mime_lite, scaffold
from fedjax_exp.core import models, tree_util
from fedjax_exp.core.client_datasets import PaddedBatchHParams
from fedjax_exp.core.cohort import capture_client_functions
from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.typing import Params

__all__ = ["ALGORITHMS", "CohortAlgorithm", "DPState"]


@dataclasses.dataclass(frozen=True)
class CohortAlgorithm:
    """A federated algorithm for the cohort engine.

    Attributes:
        init: ``params -> server state``.
        round: one round (see the module docstring); pure, traceable.
        grads_batch_size: the batch size of a full gradient pass over each client the round
            needs (Mime's server gradient), or None.
    """

    init: Callable[[Params], Any]
    round: Callable[..., tuple[Any, dict[str, jax.Array]]]
    grads_batch_size: int | None = None


@dataclass
class DPState:
    """DP-FedAvg's state in the engine: the library's without the host-side accounting
    (the privacy spent follows from the round number: ``dp_fed_avg.epsilon_spent``)."""

    params: Params
    opt_state: Any
    noise_rng: jax.Array


def _lane_rngs(inputs: dict[str, jax.Array], clients_per_round: int) -> jax.Array:
    """Each lane's client key: ``split(PRNGKey(round), clients)[slot]``, the samplers'."""
    keys = jax.random.split(jax.random.PRNGKey(inputs["round"]), clients_per_round)
    return keys[inputs["slot"]]


@jax.jit  # One program when a stepwise round runs eagerly; inlined under jit.
def _real_only(tree: Any, real: jax.Array) -> Any:
    """Padding lanes' values replaced by zeros (they may be inf or NaN)."""
    flat = real.reshape(-1)
    return jax.tree_util.tree_map(
        lambda x: jnp.where(flat.reshape(flat.shape + (1,) * (x.ndim - 1)), x, 0), tree
    )


@jax.jit  # One program when a stepwise round runs eagerly; inlined under jit.
def _weighted_mean(updates: Any, weights: jax.Array) -> Any:
    """``sum_i w_i u_i / sum_i w_i`` over the lanes axis; zeros for a zero total weight."""
    w = weights.reshape(-1).astype(jnp.float32)
    total = jnp.sum(w)
    scale = jnp.where(total > 0, 1.0 / total, 0.0)
    return jax.tree_util.tree_map(lambda u: jnp.tensordot(w, u, axes=1) * scale, updates)


def _scalars(inputs, losses, norms) -> dict[str, jax.Array]:
    real = inputs["real"].reshape(-1)
    steps = jnp.sum(inputs["train"]["counts"])
    return {
        "loss": jnp.sum(losses) / jnp.maximum(steps, 1),
        "delta_l2_norm": jnp.sum(jnp.where(real, norms, 0.0)) / jnp.maximum(jnp.sum(real), 1),
    }


def _loss_fn(per_example_loss) -> Callable[[Any, Any], jax.Array]:
    """The client's loss before a step, at the key the library's step draws for its gradient
    (so XLA may share the forward pass with the gradient's)."""

    def loss(state: Any, batch: Any) -> jax.Array:
        _, step_rng = jax.random.split(state["rng"])
        return jnp.mean(per_example_loss(state["params"], batch, step_rng))

    return loss


@jax.jit  # One program when a stepwise round runs eagerly; inlined under jit.
def _norms(deltas: Any) -> jax.Array:
    return jax.vmap(tree_util.tree_l2_norm)(deltas)


def _averaging(ctx, build_library, init=None, clip=None):
    """FedAvg's round (FedProx's too): example-weighted mean delta, server optimizer step.
    ``build_library``: the library constructor call whose client functions the round trains
    with; ``init``: the server state (default: the library algorithm's); ``clip``: DP-FedAvg's
    clip norm, noise multiplier (then uniform weights and noise)."""
    captured, algorithm = capture_client_functions(build_library)
    fns, init = captured[0], init or algorithm.init
    server_optimizer, clients_per_round = ctx["server_optimizer"], ctx["clients_per_round"]
    loss_fn = _loss_fn(ctx["loss"])

    def round_(state, inputs, columns, cohort):
        rngs = _lane_rngs(inputs, clients_per_round)
        deltas, losses = cohort(fns, state.params, rngs, columns, inputs["train"], loss_fn=loss_fn)
        deltas = _real_only(deltas, inputs["real"])
        norms = _norms(deltas)
        if clip is None:
            update = _weighted_mean(deltas, inputs["weights"])
            opt_state, params = server_optimizer.apply(update, state.opt_state, state.params)
            return fed_avg.ServerState(params, opt_state), _scalars(inputs, losses, norms)
        clip_norm, noise_multiplier = clip
        if clip_norm is not None:
            deltas = jax.vmap(lambda d: tree_util.tree_clip_by_global_norm(d, clip_norm))(deltas)
        update = _weighted_mean(deltas, inputs["real"])  # Uniform: see dp_fed_avg.
        noise_rng, round_rng = jax.random.split(state.noise_rng)
        if noise_multiplier > 0:
            stddev = noise_multiplier * clip_norm / clients_per_round
            update = dp_fed_avg.add_gaussian_noise(update, stddev, round_rng)
        opt_state, params = server_optimizer.apply(update, state.opt_state, state.params)
        return DPState(params, opt_state, noise_rng), _scalars(inputs, losses, norms)

    return CohortAlgorithm(init, round_)


def build_fed_avg(ctx: dict[str, Any]) -> CohortAlgorithm:
    """FedAvg (``fed_avg.federated_averaging``)."""
    return _averaging(
        ctx,
        lambda: fed_avg.federated_averaging(
            models.model_grad(ctx["model"]),
            ctx["client_optimizer"],
            ctx["server_optimizer"],
            ctx["batch_hparams"],
        ),
    )


def build_fed_prox(ctx: dict[str, Any], proximal_weight: float) -> CohortAlgorithm:
    """FedProx (``fed_prox.fed_prox``): FedAvg with the proximal term in the client loss."""
    return _averaging(
        ctx,
        lambda: fed_prox.fed_prox(
            ctx["loss"],
            ctx["client_optimizer"],
            ctx["server_optimizer"],
            ctx["batch_hparams"],
            proximal_weight,
        ),
    )


def build_dp_fed_avg(
    ctx: dict[str, Any],
    clip_norm: float | None,
    noise_multiplier: float,
    target_delta: float,
    accountant: str = "rdp",
    noise_seed: int = 0,
) -> CohortAlgorithm:
    """DP-FedAvg (``dp_fed_avg.dp_federated_averaging``): clipped, uniformly averaged deltas
    plus Gaussian noise. The library constructor checks the settings (noise needs a clip)."""
    server_optimizer = ctx["server_optimizer"]

    def init(params: Params) -> DPState:
        return DPState(params, server_optimizer.init(params), jax.random.PRNGKey(noise_seed))

    return _averaging(
        ctx,
        lambda: dp_fed_avg.dp_federated_averaging(
            models.model_grad(ctx["model"]),
            ctx["client_optimizer"],
            ctx["server_optimizer"],
            ctx["batch_hparams"],
            clip_norm=clip_norm,
            noise_multiplier=noise_multiplier,
            num_clients=ctx["num_clients"],
            clients_per_round=ctx["clients_per_round"],
            target_delta=target_delta,
            noise_seed=noise_seed,
            accountant=accountant,
        ),
        init,
        clip=(clip_norm, noise_multiplier),
    )


@functools.partial(jax.jit, donate_argnums=0)
def _store_rows(table: Any, rows: jax.Array, values: Any) -> Any:
    """``table[rows] = values`` per leaf, rows past the end dropped; in place when called
    outside jit (the population's table is large: num_clients x the model's parameters)."""
    return jax.tree_util.tree_map(lambda t, v: t.at[rows].set(v, mode="drop"), table, values)


def build_scaffold(ctx: dict[str, Any], client_learning_rate: float) -> CohortAlgorithm:
    """SCAFFOLD (``scaffold.scaffold``): every client's control variate is kept on the
    device, stacked over the population (``[num_clients, ...]`` per leaf; zeros until the
    client is first sampled, as the library's missing entries)."""
    num_clients, cohort_size = ctx["num_clients"], ctx["clients_per_round"]
    server_optimizer = ctx["server_optimizer"]
    captured, _ = capture_client_functions(
        lambda: scaffold.scaffold(
            models.model_grad(ctx["model"]),
            client_learning_rate,
            server_optimizer,
            ctx["batch_hparams"],
            num_clients,
        )
    )
    fns, loss_fn = captured[0], _loss_fn(ctx["loss"])

    def init(params: Params) -> scaffold.ServerState:
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        stacked = jax.tree_util.tree_map(
            lambda z: jnp.zeros((num_clients,) + z.shape, z.dtype), params
        )
        return scaffold.ServerState(params, server_optimizer.init(params), zeros, stacked)

    def round_(state, inputs, columns, cohort):
        clients = inputs["clients"]  # num_clients for padding lanes: gathers clamp, scatters drop.
        lane_inputs = {
            "rng": _lane_rngs(inputs, cohort_size),
            "control_variate": jax.tree_util.tree_map(
                lambda c: c[jnp.minimum(clients, num_clients - 1)], state.client_control_variates
            ),
        }
        shared = {"params": state.params, "control_variate": state.control_variate}
        out, losses = cohort(fns, shared, lane_inputs, columns, inputs["train"], loss_fn=loss_fn)
        out = _real_only(out, inputs["real"])
        update = _weighted_mean(out["delta"], inputs["real"])
        opt_state, params = server_optimizer.apply(update, state.opt_state, state.params)
        mean_control_delta = _weighted_mean(out["control_variate_delta"], inputs["real"])
        fraction = jnp.sum(inputs["real"]) / num_clients
        control_variate = jax.tree_util.tree_map(
            lambda c, d: c + fraction * d, state.control_variate, mean_control_delta
        )
        stored = _store_rows(
            state.client_control_variates, clients.reshape(-1), out["control_variate"]
        )
        next_state = scaffold.ServerState(params, opt_state, control_variate, stored)
        return next_state, _scalars(inputs, losses, _norms(out["delta"]))

    return CohortAlgorithm(init, round_)


def _server_gradient(grads_fns, params, rngs, columns, inputs, cohort):
    """Mime's full-batch gradient of the round's clients at ``params``."""
    (grads_sums, num_sums), _ = cohort(grads_fns, params, rngs, columns, inputs["grads"])
    grads_sums = _real_only(grads_sums, inputs["real"])
    num_sums = jnp.where(inputs["real"].reshape(-1), num_sums, 0.0)
    total = jnp.sum(num_sums)
    scale = jnp.where(total > 0, 1.0 / total, 0.0)
    return jax.tree_util.tree_map(lambda g: jnp.sum(g, axis=0) * scale, grads_sums)


def build_mime(
    ctx: dict[str, Any],
    server_learning_rate: float,
    grads_batch_size: int,
    lite: bool = False,
    client_delta_clip_norm: float | None = None,
) -> CohortAlgorithm:
    """Mime (``mime.mime``) or Mime Lite (``mime_lite.mime_lite``); the server optimizer is
    the base optimizer clients mimic (its state is the server's; clients only read it)."""
    base_optimizer, cohort_size = ctx["server_optimizer"], ctx["clients_per_round"]
    grads_hparams = PaddedBatchHParams(batch_size=grads_batch_size)
    args = (ctx["loss"], base_optimizer, ctx["batch_hparams"], grads_hparams, server_learning_rate)
    if lite:
        build = lambda: mime_lite.mime_lite(  # noqa: E731
            *args, client_delta_clip_norm=client_delta_clip_norm
        )
    else:
        build = lambda: mime.mime(*args)  # noqa: E731
    (grads_fns, train_fns), algorithm = capture_client_functions(build)
    loss_fn = _loss_fn(ctx["loss"])

    def round_(state, inputs, columns, cohort):
        rngs = _lane_rngs(inputs, cohort_size)
        server_grads = _server_gradient(grads_fns, state.params, rngs, columns, inputs, cohort)
        shared = {"params": state.params, "opt_state": state.opt_state}
        if not lite:
            shared["control_variate"] = server_grads
        deltas, losses = cohort(train_fns, shared, rngs, columns, inputs["train"], loss_fn=loss_fn)
        deltas = _real_only(deltas, inputs["real"])
        norms = _norms(deltas)
        if lite and client_delta_clip_norm is not None:
            clip = lambda d: tree_util.tree_clip_by_global_norm(d, client_delta_clip_norm)  # noqa: E731
            deltas = jax.vmap(clip)(deltas)
        mean_delta = _weighted_mean(deltas, inputs["weights"])
        next_state = mime.apply_server_update(
            base_optimizer, server_learning_rate, state, server_grads, mean_delta
        )
        return next_state, _scalars(inputs, losses, norms)

    return CohortAlgorithm(algorithm.init, round_, grads_batch_size)


def build_mime_lite(
    ctx: dict[str, Any],
    server_learning_rate: float,
    grads_batch_size: int,
    client_delta_clip_norm: float | None = None,
) -> CohortAlgorithm:
    """Mime Lite (``mime_lite.mime_lite``)."""
    return build_mime(ctx, server_learning_rate, grads_batch_size, True, client_delta_clip_norm)


# Name -> builder(ctx, **settings). ``ctx`` holds model, loss (per-example), client_optimizer,
# server_optimizer, batch_hparams, num_clients and clients_per_round.
ALGORITHMS: dict[str, Callable[..., CohortAlgorithm]] = {
    "fed_avg": build_fed_avg,
    "fed_prox": build_fed_prox,
    "scaffold": build_scaffold,
    "dp_fed_avg": build_dp_fed_avg,
    "mime": build_mime,
    "mime_lite": build_mime_lite,
}
