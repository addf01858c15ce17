"""Compressed aggregation: clients send quantized updates (``fedjax.aggregators.compression``).

Each aggregator here quantizes every client's params with a stochastic quantizer (unbiased, or
nearly so for TernGrad's clipping and DRIVE's structured rotation), averages the quantized trees
with the clients' weights, and adds the bits one client would transmit to its state's running
``num_bits``. Every leaf of a tree is quantized separately, with its own range and its own key.

Quantizers (``E`` over the random key):

- binary: ``v`` in ``[a, b]`` becomes ``b`` with probability ``(v - a) / (b - a)``, else ``a``;
  ``E[q(v)] = v``.
- uniform with ``L`` levels: the same between the two nearest of ``L`` evenly spaced levels
  of ``[a, b]``, so ``E[q(v)] = v`` and ``|q(v) - v| <= (b - a) / (L - 1)``
  (Suresh et al., 2017, https://arxiv.org/abs/1611.00429).
- rotated uniform: the uniform quantizer applied after a random structured rotation
  (``walsh_hadamard``), which shrinks ``b - a`` for vectors with a few large coordinates.
- DRIVE: one bit per coordinate, ``S * sign(R x)`` in the rotated space with the scale
  ``S = ||R x||_2^2 / ||R x||_1``, which makes ``<x_hat, x> = ||x||^2`` exactly; the estimate is
  unbiased over uniformly random rotations, only approximately over the structured ones used
  here (Vargaftik et al., 2021, https://arxiv.org/abs/2105.08339).
- TernGrad: coordinates clipped to ``2.5 std(v)``, then ``s * sign(v) * Bernoulli(|v| / s)``
  with ``s = max |v|`` (Wen et al., 2017, https://arxiv.org/abs/1705.07878).

Keys follow FedJAX 0.0.17, so the same ``rng`` gives the same quantized values: a round splits
the state's key into the next state's key and the round's key(s), and client ``i`` of the round
gets the ``i``-th key of :func:`_key_sequence`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.aggregators import walsh_hadamard
from fedjax_exp.aggregators.aggregator import (
    Aggregator,
    ClientParamsAndWeight,
    check_matching_params,
)
from fedjax_exp.core import dataclasses, tree_util
from fedjax_exp.core.typing import Params, PRNGKey, PyTree

__all__ = [
    "CompressionState",
    "arithmetic_encoding_num_bits",
    "binary_stochastic_quantize",
    "drive_pytree",
    "num_leaves",
    "rotated_uniform_stochastic_quantizer",
    "structured_drive_quantizer",
    "terngrad_quantize",
    "terngrad_quantize_pytree",
    "terngrad_quantizer",
    "uniform_stochastic_quantize",
    "uniform_stochastic_quantize_pytree",
    "uniform_stochastic_quantizer",
]

# Every leaf also sends its two range endpoints (a, b) as 32-bit floats.
_BITS_PER_FLOAT = 32
_FLOATS_PER_LEAF = 2


@dataclasses.dataclass
class CompressionState:
    """What a compressing aggregator carries between rounds.

    Attributes:
        num_bits: bits one client has sent so far, summed over rounds (for the arithmetic
            coder, the mean over each round's clients).
        rng: the key the next round splits its quantization keys from.
    """

    num_bits: float
    rng: PRNGKey


def _unit_interval(v: jax.Array, v_min: jax.Array | float, v_max: jax.Array | float) -> jax.Array:
    """``(v - a) / (b - a)`` clipped to ``[0, 1]``; 0 where ``a == b`` (0/0)."""
    return jnp.clip(jnp.nan_to_num((v - v_min) / (v_max - v_min)), 0.0, 1.0)


def binary_stochastic_quantize(
    v: jax.Array,
    rng: PRNGKey,
    v_min: jax.Array | float | None = None,
    v_max: jax.Array | float | None = None,
) -> jax.Array:
    """Rounds every value to ``v_min`` or ``v_max`` at random, unbiasedly.

    ``v`` becomes ``v_max`` with probability ``p = clip((v - v_min) / (v_max - v_min), 0, 1)``
    and ``v_min`` otherwise, so ``E[q(v)] = v`` inside the range.

    Args:
        v: the array to quantize.
        rng: the key of the uniform draws (one per value).
        v_min: the lower level; ``min(v)`` when None.
        v_max: the upper level; ``max(v)`` when None.
    """
    v_min = jnp.amin(v) if v_min is None else v_min
    v_max = jnp.amax(v) if v_max is None else v_max
    p_up = _unit_interval(v, v_min, v_max)
    return jnp.where(jax.random.uniform(rng, v.shape) > p_up, v_min, v_max)


def _check_num_levels(num_levels: int) -> None:
    if isinstance(num_levels, int | np.integer) and num_levels < 2:
        raise ValueError(f"num_levels must be at least 2 (the range's two ends), got {num_levels}")


def uniform_stochastic_quantize(
    v: jax.Array,
    num_levels: int,
    rng: PRNGKey,
    v_min: jax.Array | float | None = None,
    v_max: jax.Array | float | None = None,
) -> jax.Array:
    """Rounds every value to one of ``num_levels`` evenly spaced levels at random, unbiasedly.

    With ``u = clip((v - a) / (b - a), 0, 1)``, ``s = num_levels - 1`` and the neighbouring
    levels ``lo = floor(u s) / s``, ``hi = ceil(u s) / s``, ``u`` becomes ``hi`` with
    probability ``(u - lo) / (hi - lo)`` (0 when ``u`` is a level) and ``lo`` otherwise; the
    result is ``a + q (b - a)``.

    Args:
        v: the array to quantize.
        num_levels: the number of levels ``L >= 2`` (``log2 L`` bits per value).
        rng: the key of the uniform draws (one per value).
        v_min: the lowest level ``a``; ``min(v)`` when None.
        v_max: the highest level ``b``; ``max(v)`` when None.
    """
    _check_num_levels(num_levels)
    v_min = jnp.amin(v) if v_min is None else v_min
    v_max = jnp.amax(v) if v_max is None else v_max
    u = _unit_interval(v, v_min, v_max)
    steps = num_levels - 1
    upper = jnp.ceil(u * steps) / steps
    lower = jnp.floor(u * steps) / steps
    p_up = jnp.nan_to_num((u - lower) / (upper - lower))
    quantized = jnp.where(jax.random.uniform(rng, v.shape) > p_up, lower, upper)
    return v_min + quantized * (v_max - v_min)


def _map_leaves_with_keys(
    quantize: Callable[[jax.Array, PRNGKey], jax.Array], params: Params, rng: PRNGKey
) -> Params:
    """``quantize(leaf, key)`` for every leaf, keys ``jax.random.split(rng, num_leaves)``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(rng, len(leaves))
    return treedef.unflatten([quantize(leaf, key) for leaf, key in zip(leaves, keys, strict=True)])


@jax.jit
def _uniform_quantize_pytree(params: Params, num_levels: int | jax.Array, rng: PRNGKey) -> Params:
    # num_levels is traced: one compilation serves every number of levels.
    return _map_leaves_with_keys(
        lambda leaf, key: uniform_stochastic_quantize(leaf, num_levels, key), params, rng
    )


def uniform_stochastic_quantize_pytree(params: Params, num_levels: int, rng: PRNGKey) -> Params:
    """:func:`uniform_stochastic_quantize` on every leaf, each with its own range and key."""
    _check_num_levels(num_levels)
    return _uniform_quantize_pytree(params, num_levels, rng)


def terngrad_quantize(v: jax.Array, rng: PRNGKey) -> jax.Array:
    """TernGrad: ``v`` clipped to ``+-2.5 std(v)``, then ``s * sign(v) * Bernoulli(|v| / s)``.

    ``s`` is the largest clipped magnitude, so every value becomes one of ``{-s, 0, s}`` and
    ``E[q(v)]`` equals the clipped ``v``.
    """
    bound = 2.5 * jnp.std(v)
    clipped = jnp.where(jnp.abs(v) > bound, bound * jnp.sign(v), v)
    magnitude = jnp.abs(clipped)
    return binary_stochastic_quantize(magnitude, rng, 0.0, jnp.amax(magnitude)) * jnp.sign(clipped)


@jax.jit
def terngrad_quantize_pytree(params: Params, rng: PRNGKey) -> Params:
    """:func:`terngrad_quantize` on every leaf, each with its own key."""
    return _map_leaves_with_keys(terngrad_quantize, params, rng)


def _drive(x: jax.Array) -> jax.Array:
    abs_sum = jnp.sum(jnp.abs(x))
    # An all-zero leaf (e.g. a frozen layer's update) gives 0 / 1 = 0 rather than 0 / 0 = NaN.
    return jnp.sum(jnp.square(x)) * jnp.sign(x) / jnp.where(abs_sum > 0, abs_sum, 1.0)


@jax.jit
def drive_pytree(params: Params) -> Params:
    """DRIVE's one-bit estimate ``||x||_2^2 / ||x||_1 * sign(x)`` of every (rotated) leaf."""
    return jax.tree_util.tree_map(_drive, params)


def num_leaves(pytree: PyTree) -> int:
    """The number of leaves of ``pytree``."""
    return len(jax.tree_util.tree_leaves(pytree))


def arithmetic_encoding_num_bits(v: jax.Array) -> float:
    """Bits to send ``v`` with an arithmetic coder over its empirical symbol distribution.

    For ``d`` values (NaN/inf mapped to finite numbers) over ``k`` distinct symbols of
    frequencies ``p_j``: ``d H(p)`` bits for the symbols (``H = -sum_j p_j log2 p_j``),
    ``k log2(e (d + k) / k)`` for the histogram, ``2 * 32`` for the range's two floats and 2
    to terminate the code.
    """
    values = np.nan_to_num(np.asarray(v)).ravel()
    _, counts = np.unique(values, return_counts=True)
    d, k = values.size, counts.size
    if d == 0:
        return 0.0
    p = counts / d
    entropy = -np.sum(p * np.log2(p))
    histogram_bits = k * math.log2(math.e * (d + k) / k)
    return float(histogram_bits + d * entropy + _FLOATS_PER_LEAF * _BITS_PER_FLOAT + 2)


def _fixed_rate_num_bits(params: Params, bits_per_value: float) -> float:
    """``bits_per_value`` for every value plus the two 32-bit range floats of every leaf."""
    return bits_per_value * tree_util.tree_size(params) + _BITS_PER_FLOAT * (
        _FLOATS_PER_LEAF * num_leaves(params)
    )


def _key_sequence(key: PRNGKey) -> Iterator[PRNGKey]:
    """Keys one by one, each split off the last: ``key, subkey = split(key)``; yield subkey.

    This is the sequence ``haiku.PRNGSequence(key)`` yields, which FedJAX hands clients.
    """
    while True:
        key, subkey = jax.random.split(key)
        yield subkey


# A round's plan: (the next state's key, one key per client, params -> quantized params).
RoundPlan = tuple[PRNGKey, Iterator[PRNGKey], Callable[[Params, PRNGKey], Params]]


def _keys_per_client(
    quantize: Callable[[Params, PRNGKey], Params],
) -> Callable[[PRNGKey], RoundPlan]:
    """The usual round: the state's key splits into the next state's key and the clients' keys."""

    def plan_round(state_rng: PRNGKey) -> RoundPlan:
        next_rng, clients_rng = jax.random.split(state_rng)
        return next_rng, _key_sequence(clients_rng), quantize

    return plan_round


def _compressing_aggregator(
    rng: PRNGKey, plan_round: Callable[[PRNGKey], RoundPlan], bits_per_value: float | None
) -> Aggregator:
    """The weighted mean of quantized client params, counting bits.

    Args:
        rng: the initial key of the state.
        plan_round: the state's key -> the round's :data:`RoundPlan`.
        bits_per_value: fixed bits per value; None measures each client's quantized params with
            :func:`arithmetic_encoding_num_bits` and adds the mean over the round's clients.
    """

    def init() -> CompressionState:
        return CompressionState(0.0, rng)

    def apply(
        clients_params_and_weights: Iterable[ClientParamsAndWeight], state: CompressionState
    ) -> tuple[Params, CompressionState]:
        next_rng, client_keys, quantize = plan_round(state.rng)
        # Generators all the way: one client's params at a time, as FedJAX streams them. The
        # key sequence is endless; zip stops at the last client without drawing another key.
        clients = zip(check_matching_params(clients_params_and_weights), client_keys, strict=False)
        quantized = ((quantize(params, key), weight) for (_, params, weight), key in clients)
        if bits_per_value is None:
            client_bits = []

            def measured() -> Iterator[tuple[Params, float]]:
                for params, weight in quantized:
                    leaves = jax.tree_util.tree_leaves(params)
                    client_bits.append(sum(map(arithmetic_encoding_num_bits, leaves)))
                    yield params, weight

            aggregated = tree_util.tree_mean(measured())
            round_bits = sum(client_bits) / len(client_bits) if client_bits else 0.0
        else:
            aggregated = tree_util.tree_mean(quantized)
            round_bits = _fixed_rate_num_bits(aggregated, bits_per_value)
        return aggregated, CompressionState(state.num_bits + round_bits, next_rng)

    return Aggregator(init, apply)


def uniform_stochastic_quantizer(
    num_levels: int, rng: PRNGKey, encode_algorithm: str | None = None
) -> Aggregator:
    """The weighted mean of the clients' params, each uniformly quantized to ``num_levels``.

    Args:
        num_levels: quantization levels per leaf (at least 2).
        rng: the initial key of the aggregator's state.
        encode_algorithm: None counts ``log2(num_levels)`` bits per value; ``'arithmetic'``
            counts what an arithmetic coder would send (:func:`arithmetic_encoding_num_bits`).
    """
    _check_num_levels(num_levels)
    if encode_algorithm not in (None, "arithmetic"):
        raise ValueError(f"encode_algorithm must be None or 'arithmetic', got {encode_algorithm!r}")

    plan_round = _keys_per_client(
        lambda params, key: uniform_stochastic_quantize_pytree(params, num_levels, key)
    )
    bits_per_value = None if encode_algorithm == "arithmetic" else math.log2(num_levels)
    return _compressing_aggregator(rng, plan_round, bits_per_value)


def _in_rotated_space(
    params: Params, rotation_key: PRNGKey, quantize: Callable[[Params], Params]
) -> Params:
    """``R^{-1}(quantize(R(params)))`` leaf by leaf, ``R`` the structured rotation of the key."""
    rotated, shapes = walsh_hadamard.structured_rotation_pytree(params, rotation_key)
    return walsh_hadamard.inverse_structured_rotation_pytree(
        quantize(rotated), rotation_key, shapes
    )


def rotated_uniform_stochastic_quantizer(num_levels: int, rng: PRNGKey) -> Aggregator:
    """Like :func:`uniform_stochastic_quantizer`, in a random rotation shared by a round's clients.

    Counts ``log2(num_levels)`` bits per (unpadded) value and two floats per leaf.
    """
    _check_num_levels(num_levels)

    def plan_round(state_rng: PRNGKey) -> RoundPlan:
        # The round's rotation key is split off first; the rest is the usual round.
        state_rng, rotation_key = jax.random.split(state_rng)

        def quantize(params: Params, key: PRNGKey) -> Params:
            return _in_rotated_space(
                params,
                rotation_key,
                lambda rotated: uniform_stochastic_quantize_pytree(rotated, num_levels, key),
            )

        return _keys_per_client(quantize)(state_rng)

    return _compressing_aggregator(rng, plan_round, math.log2(num_levels))


def structured_drive_quantizer(rng: PRNGKey) -> Aggregator:
    """The weighted mean of DRIVE-compressed params, each client in its own random rotation.

    Counts one bit per (unpadded) value and two floats per leaf.
    """

    plan_round = _keys_per_client(lambda params, key: _in_rotated_space(params, key, drive_pytree))
    return _compressing_aggregator(rng, plan_round, 1.0)


def terngrad_quantizer(rng: PRNGKey) -> Aggregator:
    """The weighted mean of TernGrad-quantized params; ``log2(3)`` bits per value."""
    return _compressing_aggregator(rng, _keys_per_client(terngrad_quantize_pytree), math.log2(3))
