"""Optimizers (FedJAX interface over optax) and pytree arithmetic, without FedJAX."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_exp.core import optimizers, tree_util


def _params():
    return {"w": jnp.array([1.0, 1.0, 1.0]), "b": jnp.array([[0.5, -0.5]])}


def _grads():
    return {"w": jnp.array([2.0, 3.0, 4.0]), "b": jnp.array([[1.0, -1.0]])}


def test_sgd_step_matches_hand_computation():
    opt = optimizers.sgd(learning_rate=0.1)
    state = opt.init(_params())
    state, params = opt.apply(_grads(), state, _params())
    np.testing.assert_allclose(params["w"], [0.8, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_allclose(params["b"], [[0.4, -0.4]], rtol=1e-6)


def test_sgd_momentum_two_steps():
    opt = optimizers.sgd(learning_rate=0.1, momentum=0.9)
    params = {"w": jnp.array([1.0])}
    g = {"w": jnp.array([1.0])}
    state = opt.init(params)
    state, params = opt.apply(g, state, params)  # m = 1 -> w = 0.9
    state, params = opt.apply(g, state, params)  # m = 1.9 -> w = 0.71
    np.testing.assert_allclose(params["w"], [0.71], rtol=1e-6)


def test_adam_first_step_is_lr_times_sign():
    # Bias-corrected first Adam step: m_hat = g, v_hat = g^2 -> step = lr * g / (|g| + eps).
    opt = optimizers.adam(learning_rate=0.01)
    state = opt.init(_params())
    _, params = opt.apply(_grads(), state, _params())
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.01 * np.sign(g), _params(), _grads())
    for got, want in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_adagrad_uses_fedjax_default_eps():
    opt = optimizers.adagrad(learning_rate=1.0)
    params = {"w": jnp.array([0.0])}
    _, params = opt.apply({"w": jnp.array([2.0])}, opt.init(params), params)
    # s = 0.1 + 4; step = g / sqrt(s + 1e-6) (optax adds eps inside the root).
    np.testing.assert_allclose(params["w"], [-2.0 / np.sqrt(4.1 + 1e-6)], rtol=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        functools.partial(optimizers.sgd, nesterov=True, momentum=0.5),
        optimizers.adam,
        optimizers.adagrad,
        optimizers.rmsprop,
        functools.partial(optimizers.rmsprop, centered=True, momentum=0.9),
        optimizers.yogi,
        optimizers.adafactor,
    ],
)
def test_aliases_equal_the_optax_transformation(make):
    ours = make(learning_rate=0.05)
    reference = make.func if isinstance(make, functools.partial) else make
    kwargs = make.keywords if isinstance(make, functools.partial) else {}
    name = reference.__name__
    defaults = {"adagrad": {"eps": 1e-6}}.get(name, {})
    tx = getattr(optax, name)(learning_rate=0.05, **defaults, **kwargs)
    params, grads = _params(), _grads()
    state, ref_state = ours.init(params), tx.init(params)
    ref_params = params
    for _ in range(3):
        state, params = ours.apply(grads, state, params)
        updates, ref_state = tx.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, updates)
    for got, want in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_learning_rate_schedule():
    schedule = optax.piecewise_constant_schedule(1.0, {1: 0.1})
    opt = optimizers.sgd(schedule)
    params = {"w": jnp.array([0.0])}
    g = {"w": jnp.array([1.0])}
    state = opt.init(params)
    state, params = opt.apply(g, state, params)  # lr 1.0
    state, params = opt.apply(g, state, params)  # lr 0.1
    np.testing.assert_allclose(params["w"], [-1.1], rtol=1e-6)


def test_optimizer_is_frozen_hashable_and_a_static_jit_argument():
    opt = optimizers.sgd(0.1)
    assert hash(opt) == hash(opt.replace())
    assert opt == opt.replace()
    with pytest.raises(AttributeError):
        opt.init = None  # type: ignore[misc]

    @functools.partial(jax.jit, static_argnums=0)
    def step(optimizer, params, grads):
        state = optimizer.init(params)
        return optimizer.apply(grads, state, params)[1]

    np.testing.assert_allclose(step(opt, _params(), _grads())["w"], [0.8, 0.7, 0.6], rtol=1e-6)


def test_create_optimizer_from_optax_chain():
    opt = optimizers.create_optimizer_from_optax(
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
    )
    params = {"w": jnp.array([0.0, 0.0])}
    _, params = opt.apply({"w": jnp.array([3.0, 4.0])}, opt.init(params), params)
    np.testing.assert_allclose(params["w"], [-0.6, -0.8], rtol=1e-6)


def test_ignore_grads_haiku_freezes_named_params():
    params = {"lin": {"w": jnp.ones(2), "b": jnp.ones(1)}}
    grads = {"lin": {"w": jnp.ones(2), "b": jnp.ones(1)}}
    opt = optimizers.ignore_grads_haiku(optimizers.sgd(0.5), [("lin", "b")])
    _, new = opt.apply(grads, opt.init(params), params)
    np.testing.assert_allclose(new["lin"]["w"], [0.5, 0.5])
    np.testing.assert_allclose(new["lin"]["b"], [1.0])


# -- tree_util ---------------------------------------------------------------------------------


def test_tree_arithmetic():
    a = {"x": jnp.array([1.0, 2.0]), "y": jnp.array(3.0)}
    b = {"x": jnp.array([0.5, 0.5]), "y": jnp.array(-1.0)}
    np.testing.assert_allclose(tree_util.tree_add(a, b)["x"], [1.5, 2.5])
    np.testing.assert_allclose(tree_util.tree_weight(a, 2.0)["y"], 6.0)
    np.testing.assert_allclose(tree_util.tree_inverse_weight(a, 4.0)["x"], [0.25, 0.5])
    np.testing.assert_allclose(tree_util.tree_inverse_weight(a, 0.0)["x"], [0.0, 0.0])
    np.testing.assert_array_equal(tree_util.tree_zeros_like(a)["x"], [0.0, 0.0])
    np.testing.assert_allclose(tree_util.tree_sum([a, b, a])["x"], [2.5, 4.5])
    assert tree_util.tree_sum([]) is None
    mean = tree_util.tree_mean([(a, 1.0), (b, 3.0)])
    np.testing.assert_allclose(mean["x"], [(1 + 1.5) / 4, (2 + 1.5) / 4])
    assert tree_util.tree_size(a) == 3
    assert float(tree_util.tree_l2_squared(a)) == pytest.approx(14.0)
    assert float(tree_util.tree_l2_norm(a)) == pytest.approx(np.sqrt(14.0))
    # The first tree must not be consumed by tree_sum's in-place accumulation.
    np.testing.assert_allclose(a["x"], [1.0, 2.0])


def test_tree_clip_by_global_norm():
    tree = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    clipped = tree_util.tree_clip_by_global_norm(tree, 1.0)
    np.testing.assert_allclose([clipped["a"][0], clipped["b"][0]], [0.6, 0.8], rtol=1e-6)
    unclipped = tree_util.tree_clip_by_global_norm(tree, 10.0)
    np.testing.assert_allclose(unclipped["a"], [3.0])
