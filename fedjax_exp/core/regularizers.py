"""Parameter regularizers (``fedjax.regularizers``).

A regularizer maps params to a scalar that is added to the mean per-example loss, as the
``regularizer`` argument of :func:`fedjax_exp.core.models.model_grad` expects.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedjax_exp.core.typing import Params

__all__ = ["l2_regularizer"]


def l2_regularizer(
    weight: float,
    center_params: Params | None = None,
    params_weights: Params | None = None,
) -> Callable[[Params], jax.Array]:
    """Returns ``params -> weight * sum_i pw_i * (p_i - c_i) ** 2``.

    Args:
        weight: Overall strength of the penalty.
        center_params: Params to pull toward (e.g. the server model in FedProx); zero if None.
        params_weights: Per-parameter weights ``pw`` with the structure of the params; one if
            None.

    Returns:
        The regularizer, a function of the params.
    """

    def regularizer(params: Params) -> jax.Array:
        if center_params is not None:
            params = jax.tree_util.tree_map(jnp.subtract, params, center_params)
        leaves = jax.tree_util.tree_leaves(params)
        if params_weights is None:
            penalty = sum(jnp.vdot(leaf, leaf) for leaf in leaves)
        else:
            weights = jax.tree_util.tree_leaves(params_weights)
            penalty = sum(
                jnp.vdot(w, jnp.square(leaf)) for w, leaf in zip(weights, leaves, strict=True)
            )
        return penalty * weight

    return regularizer
