"""Parity with FedJAX 0.0.17's aggregators: the same inputs and keys give the same outputs.

Quantized values, rotations, aggregated params and the states' keys are compared bit for bit;
the arithmetic coder's bit count, which fedjax_exp computes in float64 on the host and FedJAX
in float32 on the device, to float32 tolerance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

fedjax = pytest.importorskip("fedjax")

from fedjax.aggregators import aggregator as fj_aggregator  # noqa: E402
from fedjax.aggregators import compression as fj_compression  # noqa: E402
from fedjax.aggregators import walsh_hadamard as fj_walsh_hadamard  # noqa: E402

from fedjax_exp.aggregators import aggregator, compression, walsh_hadamard  # noqa: E402

pytestmark = pytest.mark.usefixtures("fedjax_on_current_jax")


def assert_trees_equal(ours, theirs):
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
    for a, b in zip(
        jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(theirs), strict=True
    ):
        assert np.shape(a) == np.shape(b)
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _params(seed: int) -> dict[str, jax.Array]:
    """A small model-like tree: leaves of different shapes, sizes not powers of 2."""
    rng = np.random.default_rng(seed)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        },
        "scale": jnp.asarray(rng.normal(size=(2, 2, 2)) * 10, jnp.float32),
    }


# Walsh-Hadamard transform and rotations.


# FedJAX jits walsh_hadamard_transform without static arguments, so it runs only with its
# default small_n (128); 2**15 splits into three factors (2, 128, 128).
@pytest.mark.parametrize("n", [1, 2, 8, 1024, 2**15])
def test_walsh_hadamard_transform_parity(n):
    x = jax.random.normal(jax.random.PRNGKey(n), (n,))
    assert_trees_equal(
        walsh_hadamard.walsh_hadamard_transform(x),
        fj_walsh_hadamard.walsh_hadamard_transform(x),
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
@pytest.mark.parametrize("n", [1, 2, 16])
def test_hadamard_matrix_parity(n, dtype):
    assert_trees_equal(
        walsh_hadamard.hadamard_matrix(n, dtype), fj_walsh_hadamard.hadamard_matrix(n, dtype)
    )


@pytest.mark.parametrize("shape", [(1,), (2, 3, 5), (16,)])
def test_structured_rotation_and_inverse_parity(shape):
    key = jax.random.PRNGKey(7)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    ours, our_shape = walsh_hadamard.structured_rotation(x, key)
    theirs, their_shape = fj_walsh_hadamard.structured_rotation(x, key)
    assert_trees_equal((ours, our_shape), (theirs, their_shape))
    assert_trees_equal(
        walsh_hadamard.inverse_structured_rotation(ours, key, our_shape),
        fj_walsh_hadamard.inverse_structured_rotation(theirs, key, their_shape),
    )


def test_structured_rotation_pytree_parity():
    key = jax.random.PRNGKey(3)
    params = _params(0)
    ours, our_shapes = walsh_hadamard.structured_rotation_pytree(params, key)
    theirs, their_shapes = fj_walsh_hadamard.structured_rotation_pytree(params, key)
    assert_trees_equal((ours, our_shapes), (theirs, their_shapes))
    assert_trees_equal(
        walsh_hadamard.inverse_structured_rotation_pytree(ours, key, our_shapes),
        fj_walsh_hadamard.inverse_structured_rotation_pytree(theirs, key, their_shapes),
    )


# Quantizers.

VECTORS = {
    "normal": np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32),
    "constant": np.full(6, 4.0, np.float32),
    "two_values": np.array([0.0, 2.0, 2.0, 0.0], np.float32),
    "wide": np.array([0.0, 1.0, 100.0, -3.5, 1e-4], np.float32),
}


@pytest.mark.parametrize("name", list(VECTORS))
@pytest.mark.parametrize("bounds", [(None, None), (-1.0, 1.0)])
def test_binary_stochastic_quantize_parity(name, bounds):
    v, key = jnp.asarray(VECTORS[name]), jax.random.PRNGKey(11)
    assert_trees_equal(
        compression.binary_stochastic_quantize(v, key, *bounds),
        fj_compression.binary_stochastic_quantize(v, key, *bounds),
    )


@pytest.mark.parametrize("name", list(VECTORS))
@pytest.mark.parametrize("num_levels", [2, 16])
@pytest.mark.parametrize("bounds", [(None, None), (-1.0, 1.0)])
def test_uniform_stochastic_quantize_parity(name, num_levels, bounds):
    v, key = jnp.asarray(VECTORS[name]), jax.random.PRNGKey(5)
    assert_trees_equal(
        compression.uniform_stochastic_quantize(v, num_levels, key, *bounds),
        fj_compression.uniform_stochastic_quantize(v, num_levels, key, *bounds),
    )


@pytest.mark.parametrize("num_levels", [2, 16])
def test_uniform_stochastic_quantize_pytree_parity(num_levels):
    params, key = _params(1), jax.random.PRNGKey(9)
    assert_trees_equal(
        compression.uniform_stochastic_quantize_pytree(params, num_levels, key),
        fj_compression.uniform_stochastic_quantize_pytree(params, num_levels, key),
    )


@pytest.mark.parametrize("name", list(VECTORS))
def test_terngrad_quantize_parity(name):
    v, key = jnp.asarray(VECTORS[name]), jax.random.PRNGKey(2)
    assert_trees_equal(
        compression.terngrad_quantize(v, key), fj_compression.terngrad_quantize(v, key)
    )


def test_pytree_quantizers_parity():
    params, key = _params(2), jax.random.PRNGKey(4)
    assert_trees_equal(
        compression.terngrad_quantize_pytree(params, key),
        fj_compression.terngrad_quantize_pytree(params, key),
    )
    assert_trees_equal(compression.drive_pytree(params), fj_compression.drive_pytree(params))
    assert compression.num_leaves(params) == fj_compression.num_leaves(params) == 3


@pytest.mark.parametrize(
    "v",
    [
        np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32),  # FedJAX's own example: 89.82311
        np.array([0.0, 0.0, 1.0, 1.0, 1.0, 7.0, np.nan, np.inf], np.float32),
        np.random.default_rng(3).integers(0, 4, size=(30, 20)).astype(np.float32),
        np.full((3, 3), 2.5, np.float32),
    ],
)
def test_arithmetic_encoding_num_bits_parity(v):
    ours = compression.arithmetic_encoding_num_bits(jnp.asarray(v))
    theirs = fj_compression.arithmetic_encoding_num_bits(jnp.asarray(v))
    assert isinstance(ours, float)
    np.testing.assert_allclose(ours, float(theirs), rtol=1e-6)


def test_arithmetic_encoding_num_bits_known_value():
    # FedJAX's test value for five distinct symbols.
    bits = compression.arithmetic_encoding_num_bits(jnp.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert bits == pytest.approx(89.82311, abs=1e-4)


# Aggregators: several rounds, params and states.


def _clients(round_num: int) -> list[tuple[bytes, dict, float]]:
    # Three clients of different weights, fresh params each round.
    return [
        (f"client{i}".encode(), _params(10 * round_num + i), weight)
        for i, weight in enumerate([3.0, 1.0, 6.0])
    ]


def _assert_rounds_equal(ours, theirs, num_rounds=2, bits_rtol=0.0):
    def assert_states_equal(our_state, their_state):
        # The state classes differ between the libraries; their fields must not.
        assert type(our_state).__name__ == type(their_state).__name__
        if hasattr(their_state, "rng"):
            assert_trees_equal(our_state.rng, their_state.rng)
            np.testing.assert_allclose(
                our_state.num_bits, float(their_state.num_bits), rtol=bits_rtol
            )

    our_state, their_state = ours.init(), theirs.init()
    assert_states_equal(our_state, their_state)
    for round_num in range(num_rounds):
        our_params, our_state = ours.apply(iter(_clients(round_num)), our_state)
        their_params, their_state = theirs.apply(iter(_clients(round_num)), their_state)
        assert_trees_equal(our_params, their_params)
        assert_states_equal(our_state, their_state)


def test_mean_aggregator_parity():
    _assert_rounds_equal(aggregator.mean_aggregator(), fj_aggregator.mean_aggregator())


@pytest.mark.parametrize("num_levels", [2, 16])
def test_uniform_stochastic_quantizer_parity(num_levels):
    key = jax.random.PRNGKey(0)
    _assert_rounds_equal(
        compression.uniform_stochastic_quantizer(num_levels, key),
        fj_compression.uniform_stochastic_quantizer(num_levels, key),
    )


def test_uniform_stochastic_quantizer_arithmetic_parity():
    key = jax.random.PRNGKey(1)
    _assert_rounds_equal(
        compression.uniform_stochastic_quantizer(4, key, "arithmetic"),
        fj_compression.uniform_stochastic_quantizer(4, key, "arithmetic"),
        bits_rtol=1e-6,
    )


def test_rotated_uniform_stochastic_quantizer_parity():
    key = jax.random.PRNGKey(2)
    _assert_rounds_equal(
        compression.rotated_uniform_stochastic_quantizer(8, key),
        fj_compression.rotated_uniform_stochastic_quantizer(8, key),
    )


def test_structured_drive_quantizer_parity():
    key = jax.random.PRNGKey(3)
    _assert_rounds_equal(
        compression.structured_drive_quantizer(key), fj_compression.structured_drive_quantizer(key)
    )


def test_terngrad_quantizer_parity():
    key = jax.random.PRNGKey(4)
    # FedJAX's bit count is float32 here (log2(3) times its jitted tree_size, an int32 array).
    _assert_rounds_equal(
        compression.terngrad_quantizer(key), fj_compression.terngrad_quantizer(key), bits_rtol=1e-6
    )


def test_fixed_rate_bit_counts():
    # 15 + 3 + 8 = 26 values in 3 leaves, each leaf also sending two 32-bit floats.
    key = jax.random.PRNGKey(0)
    expected = [
        (compression.uniform_stochastic_quantizer(16, key), 4 * 26 + 32 * 6),
        (compression.rotated_uniform_stochastic_quantizer(4, key), 2 * 26 + 32 * 6),
        (compression.structured_drive_quantizer(key), 26 + 32 * 6),
        (compression.terngrad_quantizer(key), np.log2(3) * 26 + 32 * 6),
    ]
    for agg, bits_per_round in expected:
        state = agg.init()
        for _ in range(2):
            _, state = agg.apply(_clients(0), state)
        assert state.num_bits == pytest.approx(2 * bits_per_round, rel=1e-12)


def test_fedjax_aggregator_names_exist():
    import fedjax_exp.aggregators as ours

    for module, our_module in [
        (fedjax.aggregators, ours),
        (fj_aggregator, aggregator),
        (fj_compression, compression),
        (fj_walsh_hadamard, walsh_hadamard),
    ]:
        public = {
            name
            for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", "").startswith("fedjax.")
        }
        assert public, module
        assert public <= set(dir(our_module)), public - set(dir(our_module))
