"""Behaviour of fedjax_exp.aggregators on its own: the maths each docstring promises.

The Walsh-Hadamard transform against the dense matrix, rotations that are orthonormal and
invertible, quantizers that are unbiased within sampling error and land on their levels, the
weighted mean against NumPy, bit counts by hand, and clear errors for bad input.
"""

from __future__ import annotations

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from fedjax_exp.aggregators import aggregator, compression, walsh_hadamard

# Walsh-Hadamard transform.


@pytest.mark.parametrize("n", [1, 2, 4, 64, 512])
@pytest.mark.parametrize("small_n", [2, 4, 128])
def test_walsh_hadamard_transform_equals_dense_matrix_product(n, small_n):
    # Small integers: every sum is exact in float32, so the fast transform must equal H x exactly.
    x = np.random.default_rng(n).integers(-5, 6, size=n).astype(np.float32)
    expected = scipy.linalg.hadamard(n).astype(np.float32) @ x
    result = walsh_hadamard.walsh_hadamard_transform(jnp.asarray(x), small_n=small_n)
    np.testing.assert_array_equal(np.asarray(result), expected)


@pytest.mark.parametrize("n", [1, 8, 1024])
def test_hadamard_matrix_is_sylvester_and_orthogonal(n):
    h = np.asarray(walsh_hadamard.hadamard_matrix(n))
    np.testing.assert_array_equal(h, scipy.linalg.hadamard(n))
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


def test_normalised_transform_is_orthonormal_and_its_own_inverse():
    x = jax.random.normal(jax.random.PRNGKey(0), (2048,))
    y = walsh_hadamard.walsh_hadamard_transform(x) / math.sqrt(2048)
    np.testing.assert_allclose(jnp.linalg.norm(y), jnp.linalg.norm(x), rtol=1e-5)
    back = walsh_hadamard.walsh_hadamard_transform(y) / math.sqrt(2048)
    np.testing.assert_allclose(back, x, atol=1e-5)


@pytest.mark.parametrize("shape", [(), (1,), (5,), (3, 4), (2, 3, 5), (64,)])
def test_structured_rotation_preserves_norm_and_inverts(shape):
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    key = jax.random.PRNGKey(2)
    rotated, original_shape = walsh_hadamard.structured_rotation(x, key)
    size = max(math.prod(shape), 1)
    assert rotated.shape == (2 ** math.ceil(math.log2(size)),)
    assert tuple(original_shape.tolist()) == shape
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(x), rtol=1e-5)
    restored = walsh_hadamard.inverse_structured_rotation(rotated, key, original_shape)
    assert restored.shape == shape
    np.testing.assert_allclose(restored, x, atol=1e-5)
    # A plain tuple works as the shape too.
    np.testing.assert_array_equal(
        walsh_hadamard.inverse_structured_rotation(rotated, key, shape), restored
    )


def test_structured_rotation_depends_on_the_key():
    x = jnp.arange(8.0)
    first, _ = walsh_hadamard.structured_rotation(x, jax.random.PRNGKey(0))
    again, _ = walsh_hadamard.structured_rotation(x, jax.random.PRNGKey(0))
    other, _ = walsh_hadamard.structured_rotation(x, jax.random.PRNGKey(1))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_structured_rotation_pytree_round_trip():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.5, -2.0]), "s": jnp.array(3.0)}
    key = jax.random.PRNGKey(4)
    rotated, shapes = walsh_hadamard.structured_rotation_pytree(params, key)
    assert jax.tree_util.tree_map(jnp.shape, rotated) == {"w": (8,), "b": (2,), "s": (1,)}
    restored = walsh_hadamard.inverse_structured_rotation_pytree(rotated, key, shapes)
    for name in params:
        np.testing.assert_allclose(restored[name], params[name], atol=1e-5)
        assert restored[name].shape == params[name].shape


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: walsh_hadamard.walsh_hadamard_transform(jnp.ones(6)), "power of 2"),
        (lambda: walsh_hadamard.walsh_hadamard_transform(jnp.ones((2, 2))), "1-D"),
        (lambda: walsh_hadamard.walsh_hadamard_transform(jnp.ones(8), small_n=3), "small_n"),
        (lambda: walsh_hadamard.hadamard_matrix(12), "power of 2"),
    ],
)
def test_walsh_hadamard_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# Quantizers: unbiased within sampling error, values on their levels.

NUM_DRAWS = 4000


def _draws(quantize, v, seed=0):
    """``quantize(v, key)`` for NUM_DRAWS independent keys, stacked on a leading axis."""
    keys = jax.random.split(jax.random.PRNGKey(seed), NUM_DRAWS)
    return np.asarray(jax.vmap(lambda key: quantize(v, key))(keys), np.float64)


def _assert_unbiased(samples, expected, max_std):
    """Every coordinate's sample mean within 5 standard errors of ``expected``.

    ``max_std`` bounds one draw's standard deviation: a value rounded at random between two
    levels ``s`` apart has variance at most ``s^2 / 4``.
    """
    standard_error = max_std / math.sqrt(len(samples))
    np.testing.assert_array_less(np.abs(samples.mean(axis=0) - expected), 5 * standard_error)


V = jnp.array([0.0, 0.3, 1.0, 1.7, -2.0, 2.0, 0.05, -1.3])


def test_binary_stochastic_quantize_is_unbiased_and_two_valued():
    samples = _draws(compression.binary_stochastic_quantize, V)
    assert set(np.unique(samples)) == {-2.0, 2.0}
    _assert_unbiased(samples, np.asarray(V), max_std=4.0 / 2)


@pytest.mark.parametrize("num_levels", [2, 5, 33])
def test_uniform_stochastic_quantize_is_unbiased_and_on_levels(num_levels):
    samples = _draws(lambda v, key: compression.uniform_stochastic_quantize(v, num_levels, key), V)
    step = 4.0 / (num_levels - 1)
    levels = (samples + 2.0) / step
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    # Each value only ever rounds to one of its two neighbouring levels.
    assert np.all(np.abs(samples - np.asarray(V)) <= step + 1e-6)
    _assert_unbiased(samples, np.asarray(V), max_std=step / 2)


def test_uniform_stochastic_quantize_keeps_values_on_levels():
    key = jax.random.PRNGKey(42)
    on_levels = jnp.array([0.0, 2.0, 2.0, 4.0])
    np.testing.assert_array_equal(
        compression.uniform_stochastic_quantize(on_levels, 3, key), on_levels
    )
    constant = jnp.full(5, 4.0)
    np.testing.assert_array_equal(
        compression.uniform_stochastic_quantize(constant, 4, key), constant
    )


def test_terngrad_is_ternary_and_unbiased_for_the_clipped_vector():
    v = jnp.array([0.1, -0.2, 0.3, 0.0, -0.1, 0.2, 0.15, -0.25, 0.05, 5.0])
    bound = 2.5 * float(jnp.std(v))
    clipped = np.clip(np.asarray(v), -bound, bound)  # the outlier 5.0 is clipped to 2.5 std
    samples = _draws(compression.terngrad_quantize, v)
    scale = np.abs(clipped).max()
    np.testing.assert_allclose(np.unique(np.abs(samples)), [0.0, scale], rtol=1e-6)
    _assert_unbiased(samples, clipped, max_std=scale / 2)


def test_drive_pytree_is_scaled_signs_and_keeps_zero_leaves():
    x = jnp.array([3.0, -1.0, 0.0, 2.0])
    scale = (9 + 1 + 4) / (3 + 1 + 2)
    out = compression.drive_pytree({"x": x, "zeros": jnp.zeros(4)})
    np.testing.assert_allclose(out["x"], scale * np.sign(np.asarray(x)), rtol=1e-6)
    np.testing.assert_array_equal(out["zeros"], np.zeros(4))


def test_arithmetic_encoding_num_bits_by_hand():
    # Two symbols, equally frequent: 1 bit each, 2 log2(e (4 + 2) / 2) for the histogram,
    # 64 for the range's floats and 2 to end the code.
    bits = compression.arithmetic_encoding_num_bits(jnp.array([0.0, 0.0, 1.0, 1.0]))
    assert bits == pytest.approx(2 * math.log2(3 * math.e) + 4 + 64 + 2, rel=1e-12)
    # A constant vector costs no symbol bits.
    bits = compression.arithmetic_encoding_num_bits(jnp.full((3, 3), 7.0))
    assert bits == pytest.approx(math.log2(10 * math.e) + 66, rel=1e-12)


# Aggregators.


def _client_params(seed):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=5), jnp.float32),
    }


CLIENTS = [
    (b"a", _client_params(0), 2.0),
    (b"b", _client_params(1), 5.0),
    (b"c", _client_params(2), 1.0),
]


def _numpy_weighted_mean(clients):
    weights = np.array([weight for _, _, weight in clients], np.float64)
    return {
        name: np.tensordot(
            weights, np.stack([np.asarray(p[name], np.float64) for _, p, _ in clients]), 1
        )
        / weights.sum()
        for name in clients[0][1]
    }


def test_mean_aggregator_equals_numpy_weighted_mean():
    agg = aggregator.mean_aggregator()
    state = agg.init()
    # A generator: the aggregator reads its input once.
    mean, new_state = agg.apply((client for client in CLIENTS), state)
    assert new_state == state == aggregator.MeanAggregatorState()
    expected = _numpy_weighted_mean(CLIENTS)
    for name, value in expected.items():
        np.testing.assert_allclose(mean[name], value, rtol=1e-6, atol=1e-7)


def test_mean_aggregator_edge_weights():
    agg = aggregator.mean_aggregator()
    zero_weights = [(client_id, params, 0.0) for client_id, params, _ in CLIENTS]
    mean, _ = agg.apply(zero_weights, agg.init())
    np.testing.assert_array_equal(mean["w"], np.zeros((3, 4)))
    assert agg.apply([], agg.init())[0] is None


@pytest.mark.parametrize(
    "make",
    [
        lambda key: compression.uniform_stochastic_quantizer(5, key),
        lambda key: compression.rotated_uniform_stochastic_quantizer(5, key),
    ],
    ids=["uniform", "rotated"],
)
def test_compressing_aggregators_are_unbiased_over_rounds(make):
    # The state's key advances every round, so rounds are independent draws of the estimate.
    agg = make(jax.random.PRNGKey(0))
    state = agg.init()
    rounds = []
    for _ in range(150):
        mean, state = agg.apply(CLIENTS, state)
        rounds.append(np.concatenate([np.ravel(mean["b"]), np.ravel(mean["w"])]))
    rounds = np.array(rounds, np.float64)
    expected = _numpy_weighted_mean(CLIENTS)
    expected = np.concatenate([expected["b"].ravel(), expected["w"].ravel()])
    standard_error = rounds.std(axis=0, ddof=1) / math.sqrt(len(rounds))
    np.testing.assert_array_less(np.abs(rounds.mean(axis=0) - expected), 5 * standard_error + 1e-6)


def test_structured_drive_estimate_keeps_the_inner_product():
    # DRIVE's scale makes <x_hat, x> = ||x||^2 for every leaf: R is orthonormal, so
    # <R^-1(S sign(Rx)), x> = S ||Rx||_1 = ||Rx||^2 = ||x||^2. (Over Hadamard rotations the
    # estimate is not exactly unbiased, so unbiasedness is not asserted.)
    agg = compression.structured_drive_quantizer(jax.random.PRNGKey(3))
    client_id, params, _ = CLIENTS[0]
    estimate, state = agg.apply([(client_id, params, 1.0)], agg.init())
    for name, x in params.items():
        x = np.asarray(x, np.float64)
        assert np.vdot(np.asarray(estimate[name], np.float64), x) == pytest.approx(
            np.vdot(x, x), rel=1e-5
        )
        assert not np.allclose(estimate[name], x)
    assert state.num_bits == 17 + 2 * 2 * 32


def test_compressing_aggregator_is_deterministic_and_its_key_advances():
    agg = compression.uniform_stochastic_quantizer(3, jax.random.PRNGKey(7))
    first, state = agg.apply(CLIENTS, agg.init())
    again, _ = agg.apply(CLIENTS, agg.init())
    second, state = agg.apply(CLIENTS, state)
    np.testing.assert_array_equal(first["w"], again["w"])
    assert not np.array_equal(first["w"], second["w"])
    # 17 values at log2(3) bits plus 2 leaves x 2 floats x 32 bits, twice.
    assert state.num_bits == pytest.approx(2 * (17 * math.log2(3) + 128), rel=1e-12)


def test_compression_state_passes_through_jit():
    state = compression.CompressionState(3.5, jax.random.PRNGKey(1))
    out = jax.jit(lambda s: s.replace(num_bits=s.num_bits + 1))(state)
    assert float(out.num_bits) == 4.5
    np.testing.assert_array_equal(out.rng, state.rng)


MISMATCHES = {
    "structure": {"w": jnp.zeros((3, 4)), "bias": jnp.zeros(5)},
    "shape": {"w": jnp.zeros((4, 3)), "b": jnp.zeros(5)},
    "dtype": {"w": jnp.zeros((3, 4), jnp.int32), "b": jnp.zeros(5)},
}


@pytest.mark.parametrize("kind", list(MISMATCHES))
@pytest.mark.parametrize(
    "make",
    [
        aggregator.mean_aggregator,
        lambda: compression.uniform_stochastic_quantizer(4, jax.random.PRNGKey(0), "arithmetic"),
        lambda: compression.structured_drive_quantizer(jax.random.PRNGKey(0)),
    ],
    ids=["mean", "uniform", "drive"],
)
def test_mismatched_parameter_trees_fail_clearly(kind, make):
    agg = make()
    clients = [*CLIENTS[:2], (b"odd", MISMATCHES[kind], 1.0)]
    with pytest.raises(ValueError, match="parameter trees differ") as error:
        agg.apply(clients, agg.init())
    message = str(error.value)
    # Both clients named, both trees summarised leaf by leaf.
    assert "b'odd'" in message and "b'a'" in message
    assert "'w': float32[3, 4]" in message
    assert {"structure": "'bias'", "shape": "float32[4, 3]", "dtype": "int32[3, 4]"}[
        kind
    ] in message


def test_quantizer_arguments_are_checked():
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match="num_levels must be at least 2"):
        compression.uniform_stochastic_quantizer(1, key)
    with pytest.raises(ValueError, match="num_levels must be at least 2"):
        compression.uniform_stochastic_quantize_pytree({"w": jnp.ones(3)}, 1, key)
    with pytest.raises(ValueError, match="encode_algorithm must be None or 'arithmetic'"):
        compression.uniform_stochastic_quantizer(4, key, "huffman")


def test_package_imports_by_itself():
    # A fresh interpreter: nothing else of fedjax_exp imported first.
    code = (
        "import fedjax_exp.aggregators as a; "
        "print(sorted(n for n in a.__all__ if not n.startswith('_'))[:2])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['Aggregator', 'aggregator']"
