"""Arithmetic on pytrees of arrays (``fedjax.tree_util``).

Model parameters, gradients and optimizer states are pytrees; federated algorithms add, scale
and average them. These helpers do that leaf by leaf with ``jax.tree_util`` (the old
``jax.tree_map`` alias that FedJAX 0.0.17 used is gone from current JAX).
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core.typing import PyTree

__all__ = [
    "check_tree_matches",
    "tree_add",
    "tree_clip_by_global_norm",
    "tree_inverse_weight",
    "tree_l2_norm",
    "tree_l2_squared",
    "tree_mean",
    "tree_size",
    "tree_sum",
    "tree_weight",
    "tree_zeros_like",
]


def _scale(pytree: PyTree, weight: float | jax.Array) -> PyTree:
    return jax.tree_util.tree_map(lambda leaf: leaf * weight, pytree)


def _add(left: PyTree, right: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.add, left, right)


@jax.jit
def tree_weight(pytree: PyTree, weight: float | jax.Array) -> PyTree:
    """Multiplies every leaf of ``pytree`` by ``weight``."""
    return _scale(pytree, weight)


@jax.jit
def tree_add(left: PyTree, right: PyTree) -> PyTree:
    """Adds two pytrees of the same structure leaf by leaf."""
    return _add(left, right)


# Running sums own their accumulator, so its buffers can be reused for the result.
_add_into = jax.jit(_add, donate_argnums=0)
_scale_in_place = jax.jit(_scale, donate_argnums=0)


def _inverse(weight: float) -> float:
    # A zero total weight means "nothing was averaged": return zeros rather than inf/nan.
    return 1.0 / weight if weight > 0.0 else 0.0


def tree_inverse_weight(pytree: PyTree, weight: float) -> PyTree:
    """Multiplies every leaf by ``1 / weight``; a non-positive weight gives zeros."""
    return tree_weight(pytree, _inverse(weight))


@jax.jit
def tree_zeros_like(pytree: PyTree) -> PyTree:
    """A pytree of zeros with the structure, shapes and dtypes of ``pytree``."""
    return jax.tree_util.tree_map(jnp.zeros_like, pytree)


def tree_sum(pytrees: Iterable[PyTree]) -> PyTree | None:
    """Sums pytrees of the same structure; returns None for an empty iterable."""
    total = None
    for pytree in pytrees:
        if total is None:
            # Copy: the caller still owns the first tree, and later adds donate the total.
            total = jax.tree_util.tree_map(jnp.array, pytree)
        else:
            total = _add_into(total, pytree)
    return total


def tree_mean(pytrees_and_weights: Iterable[tuple[PyTree, float]]) -> PyTree | None:
    """The weighted mean ``sum_i w_i * t_i / sum_i w_i`` of ``(tree, weight)`` pairs.

    A total weight of zero gives a tree of zeros; an empty iterable gives None.
    """
    total = None
    total_weight = 0.0
    for pytree, weight in pytrees_and_weights:
        weighted = tree_weight(pytree, weight)
        total = weighted if total is None else _add_into(total, weighted)
        total_weight += weight
    if total is None:
        return None
    return _scale_in_place(total, _inverse(total_weight))


def tree_size(pytree: PyTree) -> int:
    """The total number of scalars in all leaves of ``pytree``."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(pytree))


@jax.jit
def tree_l2_squared(pytree: PyTree) -> jax.Array:
    """The squared L2 norm of all leaves taken together, ``sum_leaves <leaf, leaf>``."""
    return sum(jnp.vdot(leaf, leaf) for leaf in jax.tree_util.tree_leaves(pytree))


@jax.jit
def tree_l2_norm(pytree: PyTree) -> jax.Array:
    """The global L2 norm of all leaves taken together."""
    return jnp.sqrt(tree_l2_squared(pytree))


@jax.jit
def tree_clip_by_global_norm(pytree: PyTree, max_norm: float) -> PyTree:
    """Scales ``pytree`` by ``min(1, max_norm / ||pytree||)`` (Pascanu et al., 2012).

    Trees whose global norm is at most ``max_norm`` come back unchanged.
    """
    scale = jnp.minimum(1.0, max_norm / tree_l2_norm(pytree))
    return jax.tree_util.tree_map(lambda leaf: scale * leaf, pytree)


def _dtype(leaf: object) -> np.dtype:
    # JAX arrays (and tracers) carry .dtype; np.result_type on them is deprecated. Python
    # scalars do not.
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)


class _LeafSpec(str):
    """A leaf's ``dtype[shape]``, printed without quotes inside its tree."""

    __repr__ = str.__str__


def _summary(pytree: PyTree) -> str:
    """The tree with every leaf shown as ``dtype[shape]``, e.g. ``{'b': float32[2]}``."""
    return str(
        jax.tree_util.tree_map(
            lambda leaf: _LeafSpec(f"{_dtype(leaf)}{list(np.shape(leaf))}"), pytree
        )
    )


def check_tree_matches(
    pytree: PyTree,
    reference: PyTree,
    what: str,
    reference_what: str,
    check_dtypes: bool = False,
) -> None:
    """Raises one ValueError unless ``pytree`` has ``reference``'s tree structure and leaf
    shapes (and leaf dtypes, with ``check_dtypes``).

    Trees that differ cannot be added or averaged meaningfully (a leaf of another shape would
    broadcast silently), so they fail here, both named (``what``, ``reference_what``) and
    summarised leaf by leaf, rather than deep inside ``jax.tree_util``. Structures, shapes and
    dtypes are static under ``jax.jit``, so the check also works at trace time.
    """
    leaves, treedef = jax.tree_util.tree_flatten(pytree)
    reference_leaves, reference_treedef = jax.tree_util.tree_flatten(reference)
    shapes = [tuple(np.shape(leaf)) for leaf in leaves]
    reference_shapes = [tuple(np.shape(leaf)) for leaf in reference_leaves]
    dtypes = [_dtype(leaf).name for leaf in leaves]
    reference_dtypes = [_dtype(leaf).name for leaf in reference_leaves]
    if treedef != reference_treedef:
        problem = "tree structure"
    elif shapes != reference_shapes:
        problem = f"leaf shapes {shapes} vs {reference_shapes}"
    elif check_dtypes and dtypes != reference_dtypes:
        problem = f"leaf dtypes {dtypes} vs {reference_dtypes}"
    else:
        return
    kinds = "structure, leaf shapes and dtypes" if check_dtypes else "structure and leaf shapes"
    raise ValueError(
        f"{what} cannot be combined with {reference_what}: the parameter trees differ in "
        f"{problem} ({_summary(pytree)} vs {_summary(reference)}). Client params, updates and "
        f"stored per-client states must all have the same {kinds}; check that the gradient "
        "function, the optimizers and any stored client state belong to one model."
    )
