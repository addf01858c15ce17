"""The Walsh-Hadamard transform and random structured rotations (``fedjax.aggregators``).

The Walsh-Hadamard matrix of order ``n = 2^m`` is Sylvester's ``H_1 = [1]``,
``H_2k = [[H_k, H_k], [H_k, -H_k]]``; ``H_n / sqrt(n)`` is orthonormal and its own inverse.

A structured rotation ``R(x) = H D x / sqrt(d)`` (``D`` a random diagonal of +-1 signs, ``d`` the
length of ``x`` zero-padded to a power of 2) spreads a vector's energy evenly over its
coordinates, so a quantizer applied afterwards loses less (Suresh et al., 2017,
https://arxiv.org/abs/1611.00429). Its inverse is ``D H y / sqrt(d)``: ``H`` and ``D`` are
symmetric and square to ``d I`` and ``I``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core.typing import Params, PRNGKey

__all__ = [
    "hadamard_matrix",
    "inverse_structured_rotation",
    "inverse_structured_rotation_pytree",
    "structured_rotation",
    "structured_rotation_pytree",
    "walsh_hadamard_transform",
]


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def hadamard_matrix(n: int, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """The ``n x n`` (unnormalised) Walsh-Hadamard matrix of Sylvester's construction.

    Built in NumPy integers, then cast, so that JAX-only dtypes (``bfloat16``) work too.
    """
    if not _is_power_of_two(n):
        raise ValueError(f"hadamard_matrix needs n to be a power of 2, got n={n}")
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return jnp.asarray(h, dtype)


def _factor_sizes(n: int, small_n: int) -> list[int]:
    """``n`` as a product of Hadamard orders of at most ``small_n``, the remainder first."""
    sizes = []
    while n > 1:
        sizes.append(min(n, small_n))
        n //= small_n
    return sizes[::-1]


@functools.partial(jax.jit, static_argnames=("small_n", "precision"))
def walsh_hadamard_transform(
    x: jax.Array, small_n: int = 2**7, precision: jax.lax.Precision | str = "highest"
) -> jax.Array:
    """``H_n x`` for a vector ``x`` of length ``n = 2^m``, in ``O(n log n)`` (unnormalised).

    Because ``H_{ab} = H_a ⊗ H_b`` and ``(A ⊗ B) vec(X) = vec(A X B^T)`` for row-major ``vec``,
    reshaping ``x`` into an array of shape ``(n_1, ..., n_k)`` with ``n = n_1 ... n_k`` and
    multiplying every axis ``i`` by the small matrix ``H_{n_i}`` gives ``H_n x``. Each of the
    ``k ~ log n / log small_n`` products is a dense matrix product, which accelerators run far
    faster than the textbook butterfly.

    Args:
        x: a 1-D array whose length is a power of 2.
        small_n: the largest factor ``n_i`` (a power of 2, at least 2); 128 suits TPUs.
        precision: precision of the matrix products (``jax.lax.Precision`` or its name).

    Returns:
        ``H_n x``, of the same length and dtype as ``x``. Divide by ``sqrt(n)`` for the
        orthonormal transform, which is then its own inverse.
    """
    if x.ndim != 1 or not _is_power_of_two(x.shape[0]):
        raise ValueError(
            "walsh_hadamard_transform needs a 1-D array whose length is a power of 2, got "
            f"shape {x.shape}; zero-pad it first (structured_rotation does)"
        )
    if small_n < 2 or not _is_power_of_two(small_n):
        raise ValueError(f"small_n must be a power of 2 and at least 2, got {small_n}")
    sizes = _factor_sizes(x.shape[0], small_n)
    y = x.reshape(sizes)
    matrices = {size: hadamard_matrix(size, x.dtype) for size in set(sizes)}
    axes = list(range(len(sizes)))
    new_axis = len(sizes)
    for i, size in enumerate(sizes):
        out_axes = axes[:i] + [new_axis] + axes[i + 1 :]
        y = jnp.einsum(y, axes, matrices[size], [i, new_axis], out_axes, precision=precision)
    return y.reshape(-1)


@jax.jit
def structured_rotation(x: jax.Array, rng: PRNGKey) -> tuple[jax.Array, jax.Array]:
    """``R(x) = H D pad(x) / sqrt(d)``: ``x`` flattened, zero-padded to ``d = 2^ceil(log2 n)``.

    Args:
        x: an array of any shape.
        rng: the key of the random signs ``D``; the inverse needs the same key.

    Returns:
        ``(R(x), shape)``: the rotated vector of length ``d`` and ``x``'s shape as an int32
        array, which :func:`inverse_structured_rotation` takes to restore it.
    """
    flat = x.reshape(-1)
    d = 2 ** math.ceil(math.log2(flat.size)) if flat.size else 1
    padded = jnp.pad(flat, (0, d - flat.size))
    signs = jax.random.rademacher(rng, padded.shape)
    rotated = walsh_hadamard_transform(padded * signs) / jnp.sqrt(d)
    return rotated, jnp.asarray(x.shape, jnp.int32)


@functools.partial(jax.jit, static_argnames="shape")
def _unrotate(x: jax.Array, rng: PRNGKey, shape: tuple[int, ...]) -> jax.Array:
    signs = jax.random.rademacher(rng, x.shape)
    flat = walsh_hadamard_transform(x) * signs / jnp.sqrt(x.size)
    return flat[: math.prod(shape)].reshape(shape)


def inverse_structured_rotation(
    x: jax.Array, rng: PRNGKey, original_shape: jax.Array | tuple[int, ...]
) -> jax.Array:
    """``R^{-1}(y) = D H y / sqrt(d)``, cut back to ``original_shape``.

    Args:
        x: a rotated vector (length a power of 2), as :func:`structured_rotation` returns.
        rng: the key the rotation used.
        original_shape: the shape to restore (the array :func:`structured_rotation` returns,
            or a tuple).
    """
    shape = tuple(int(size) for size in np.asarray(original_shape).reshape(-1))
    return _unrotate(x, rng, shape)


def structured_rotation_pytree(params: Params, rng: PRNGKey) -> tuple[Params, Params]:
    """Rotates every leaf with its own key, ``jax.random.split(rng, num_leaves)`` in leaf order.

    Returns:
        ``(rotated, shapes)``: pytrees of the rotated vectors and of the leaves' shapes.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(rng, len(leaves))
    pairs = [structured_rotation(leaf, key) for leaf, key in zip(leaves, keys, strict=True)]
    rotated = treedef.unflatten([leaf for leaf, _ in pairs])
    return rotated, treedef.unflatten([shape for _, shape in pairs])


def inverse_structured_rotation_pytree(params: Params, rng: PRNGKey, shapes: Params) -> Params:
    """Undoes :func:`structured_rotation_pytree` given the same ``rng`` and its ``shapes``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaf_shapes = treedef.flatten_up_to(shapes)
    keys = jax.random.split(rng, len(leaves))
    return treedef.unflatten(map(inverse_structured_rotation, leaves, keys, leaf_shapes))
