"""Serialization: byte-identical msgpack to FedJAX 0.0.17, round trips, state files; util."""

from __future__ import annotations

import pickle

import fedjax
import fedjax.core.util as fedjax_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.core import serialization, util


@pytest.fixture(autouse=True)
def _fedjax_on_current_numpy(fedjax_on_current_jax, monkeypatch):
    # FedJAX 0.0.17 also calls np.issctype, which NumPy 2 removed.
    monkeypatch.setattr(
        np,
        "issctype",
        lambda t: isinstance(t, type) and issubclass(t, np.generic) and t is not np.object_,
        raising=False,
    )


def _tree():
    return {
        "params": {
            "w": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
            "b": jnp.array([1.5, -2.0], dtype=jnp.bfloat16),
            "count": jnp.array(3, dtype=jnp.int32),
        },
        "ids": np.array([[b"a", b"bc\x00"], [b"", b"d"]], dtype=object),
        "history": [1, 2.5, "text", b"raw", None, True, 3 + 4j],
        "scalars": [np.float32(0.25), np.int64(-7), np.float64(1e-3), np.bool_(True)],
        "empty": np.zeros((0, 3), dtype=np.uint8),
    }


def _assert_same(decoded, expected):
    assert jax.tree_util.tree_structure(decoded) == jax.tree_util.tree_structure(expected)
    for got, want in zip(
        jax.tree_util.tree_leaves(decoded), jax.tree_util.tree_leaves(expected), strict=True
    ):
        if isinstance(want, (np.ndarray, jax.Array)):
            want = np.asarray(want)
            assert isinstance(got, np.ndarray) and got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        else:
            assert type(got) is type(want) and got == want


def test_msgpack_bytes_identical_to_fedjax_and_cross_readable():
    tree = _tree()
    ours = serialization.msgpack_serialize(tree)
    assert ours == fedjax.serialization.msgpack_serialize(tree)
    _assert_same(serialization.msgpack_deserialize(ours), tree)
    _assert_same(fedjax.serialization.msgpack_deserialize(ours), tree)


def test_msgpack_array_layout_is_shape_dtype_bytes():
    encoded = serialization.msgpack_serialize({"x": np.array([1, 2], dtype=np.int16)})
    # fixmap(1), "x", ext8 of type 1 holding msgpack [[2], "int16", bin(4)].
    payload = b"\x93\x91\x02\xa5int16\xc4\x04\x01\x00\x02\x00"
    assert encoded == b"\x81\xa1x\xc7" + bytes([len(payload), 1]) + payload


def test_msgpack_rejects_what_the_format_cannot_hold():
    with pytest.raises(TypeError, match="tuples"):
        serialization.msgpack_serialize({"x": (1, 2)})
    with pytest.raises(ValueError, match="holds bytes"):
        serialization.msgpack_serialize(np.array(["s"], dtype=object))
    with pytest.raises(TypeError, match="set values"):
        serialization.msgpack_serialize([{1, 2}])


def test_save_and_load_state_round_trip(tmp_path):
    state = {"params": {"w": jnp.ones((2, 3))}, "round": 4, "rng": jax.random.PRNGKey(1)}
    path = tmp_path / "nested" / "state.pkl"
    serialization.save_state(state, path)
    loaded = serialization.load_state(path)
    assert loaded["round"] == 4
    assert isinstance(loaded["params"]["w"], np.ndarray)
    np.testing.assert_array_equal(loaded["params"]["w"], np.ones((2, 3)))
    np.testing.assert_array_equal(loaded["rng"], jax.random.PRNGKey(1))
    # A plain pickle, as FedJAX writes: FedJAX-style readers load it too.
    with open(path, "rb") as f:
        assert pickle.load(f)["round"] == 4
    assert [p.name for p in path.parent.iterdir()] == ["state.pkl"]  # No temporary left over.


def test_safe_div_values_and_gradient_match_fedjax():
    a = jnp.array([1.0, 2.0, 3.0])
    b = jnp.array([2.0, 0.0, -4.0])
    np.testing.assert_array_equal(util.safe_div(a, b), fedjax_util.safe_div(a, b))
    np.testing.assert_array_equal(util.safe_div(a, b), [0.5, 0.0, -0.75])
    grad = jax.grad(lambda x: util.safe_div(x, b).sum())(a)
    np.testing.assert_array_equal(grad, [0.5, 0.0, -0.25])


def test_import_tf_without_tensorflow_fails_on_use():
    tf = util.import_tf()
    if isinstance(tf, util.FakeTensorFlowModule):
        with pytest.raises(ModuleNotFoundError, match="needs TensorFlow"):
            tf.io  # noqa: B018
