"""What the config groups build: each optimizer option and schedule against the same optax
transformation written by hand (the config's numbers, not just "it trains")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import compose_config

from fedjax_exp.experiment import builders

# The hand-written twin of every conf/optimizer option (its yaml's numbers).
OPTAX_TWINS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=False),
    "adam": lambda: optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8),
    "adagrad": lambda: optax.adagrad(0.1, initial_accumulator_value=0.1, eps=1e-6),
    "rmsprop": lambda: optax.rmsprop(1e-3, decay=0.9, eps=1e-8),
    "yogi": lambda: optax.yogi(1e-3, b1=0.9, b2=0.999, eps=1e-3),
}
STEPS = 200  # trainer.steps: the decay horizon of the schedules.
SCHEDULE_TWINS = {
    "cosine": lambda: optax.cosine_decay_schedule(0.1, decay_steps=STEPS, alpha=0.0),
    "warmup_cosine": lambda: optax.warmup_cosine_decay_schedule(
        0.0, peak_value=0.1, warmup_steps=100, decay_steps=STEPS, end_value=0.0
    ),
    "exponential": lambda: optax.exponential_decay(
        0.1, transition_steps=1000, decay_rate=0.5, staircase=False
    ),
}


def _trajectory(apply, init, steps=4):
    """Params after each of ``steps`` updates with fixed, step-dependent gradients."""
    params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
    state, out = init(params), []
    for k in range(steps):
        grads = jax.tree_util.tree_map(lambda p, k=k: jnp.cos(p * (k + 1)) + 0.1 * k, params)
        state, params = apply(grads, state, params)
        out.append(np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(params)]))
    return np.stack(out)


def _optax_apply(opt):
    def apply(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return state, optax.apply_updates(params, updates)

    return apply


@pytest.mark.parametrize("name", sorted(OPTAX_TWINS))
def test_each_optimizer_option_is_its_optax_twin(name):
    built = builders.build_optimizer(compose_config([f"optimizer={name}"]))
    twin = OPTAX_TWINS[name]()
    np.testing.assert_allclose(
        _trajectory(built.apply, built.init),
        _trajectory(_optax_apply(twin), twin.init),
        rtol=1e-6,
        atol=1e-7,
    )


@pytest.mark.parametrize("schedule", sorted(SCHEDULE_TWINS))
def test_each_schedule_drives_the_learning_rate(schedule):
    cfg = compose_config(
        ["optimizer=sgd", f"optimizer/schedule={schedule}", f"trainer.steps={STEPS}"]
    )
    built = builders.build_optimizer(cfg)
    twin = optax.sgd(SCHEDULE_TWINS[schedule]())
    got = _trajectory(built.apply, built.init)
    np.testing.assert_allclose(got, _trajectory(_optax_apply(twin), twin.init), rtol=1e-6)
    # And not the constant rate: the schedule changes the trajectory.
    constant = optax.sgd(0.1)
    assert not np.allclose(got, _trajectory(_optax_apply(constant), constant.init))


def test_a_cosine_schedule_ends_at_zero_learning_rate():
    cfg = compose_config(["optimizer=sgd", "optimizer/schedule=cosine", "trainer.steps=2"])
    built = builders.build_optimizer(cfg)
    trajectory = _trajectory(built.apply, built.init, steps=3)
    # Rates 0.1, 0.05, 0: the third update leaves the parameters where they were.
    np.testing.assert_array_equal(trajectory[2], trajectory[1])
    assert not np.array_equal(trajectory[1], trajectory[0])
