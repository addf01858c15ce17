"""Optimizers with FedJAX's interface over optax (``fedjax.optimizers``).

An :class:`Optimizer` is a pair of pure functions, like optax's ``GradientTransformation``,
except that ``apply`` also applies the update:

    opt_state = optimizer.init(params)
    opt_state, params = optimizer.apply(grads, opt_state, params)

The aliases (:func:`sgd`, :func:`adam`, ...) keep FedJAX 0.0.17's argument names and defaults,
which in places differ from optax's (e.g. ``adagrad``'s ``eps`` is 1e-6 here, 1e-7 in optax).
Every ``learning_rate`` may be a float or an optax schedule ``step -> rate``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import optax

from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.typing import OptState, Params

__all__ = [
    "Optimizer",
    "ScalarOrSchedule",
    "adafactor",
    "adagrad",
    "adam",
    "create_optimizer_from_optax",
    "ignore_grads_haiku",
    "rmsprop",
    "sgd",
    "yogi",
]

Grads = Params
ScalarOrSchedule = float | optax.Schedule


@dataclass
class Optimizer:
    """A frozen pair of pure functions; hashable, so it can be a static ``jax.jit`` argument.

    Attributes:
        init: ``params -> opt_state``, the (possibly empty) optimizer statistics.
        apply: ``(grads, opt_state, params) -> (opt_state, params)``, one optimization step.
    """

    init: Callable[[Params], OptState]
    apply: Callable[[Grads, OptState, Params], tuple[OptState, Params]]


def create_optimizer_from_optax(opt: optax.GradientTransformation) -> Optimizer:
    """Wraps an optax gradient transformation (or chain) as an :class:`Optimizer`."""

    @jax.jit
    def apply(grads: Grads, opt_state: OptState, params: Params) -> tuple[OptState, Params]:
        updates, opt_state = opt.update(grads, opt_state, params)
        return opt_state, optax.apply_updates(params, updates)

    return Optimizer(init=opt.init, apply=apply)


def ignore_grads_haiku(
    optimizer: Optimizer, non_trainable_names: Sequence[tuple[str, str]]
) -> Optimizer:
    """Freezes Haiku parameters named ``(module_name, param_name)``.

    The frozen entries are replaced by None before reaching ``optimizer`` (so it keeps no
    state for them and cannot change them) and restored from the input params afterwards.
    """
    frozen = frozenset(tuple(name) for name in non_trainable_names)

    def drop_frozen(params: Params) -> Params:
        return hk.data_structures.map(
            lambda module, name, value: None if (module, name) in frozen else value, params
        )

    def init(params: Params) -> OptState:
        return optimizer.init(drop_frozen(params))

    def apply(grads: Grads, opt_state: OptState, params: Params) -> tuple[OptState, Params]:
        opt_state, trained = optimizer.apply(drop_frozen(grads), opt_state, drop_frozen(params))
        restored = hk.data_structures.to_mutable_dict(trained)
        for module, name in frozen:
            restored[module][name] = params[module][name]
        return opt_state, hk.data_structures.to_immutable_dict(restored)

    return Optimizer(init=init, apply=apply)


def sgd(
    learning_rate: ScalarOrSchedule, momentum: float | None = None, nesterov: bool = False
) -> Optimizer:
    """Stochastic gradient descent, optionally with (Nesterov) momentum.

    ``params -= lr * g``; with momentum ``m = momentum * m + g`` and ``params -= lr * m``
    (Nesterov: ``params -= lr * (g + momentum * m)``).
    """
    return create_optimizer_from_optax(
        optax.sgd(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov)
    )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> Optimizer:
    """Adam (Kingma and Ba, 2014): bias-corrected moment estimates ``m``, ``v``;
    ``params -= lr * m_hat / (sqrt(v_hat + eps_root) + eps)``."""
    return create_optimizer_from_optax(
        optax.adam(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    )


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-6,
) -> Optimizer:
    """Adagrad (Duchi et al., 2011): ``s += g ** 2``; ``params -= lr * g / sqrt(s + eps)``."""
    return create_optimizer_from_optax(
        optax.adagrad(
            learning_rate=learning_rate,
            initial_accumulator_value=initial_accumulator_value,
            eps=eps,
        )
    )


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
) -> Optimizer:
    """RMSProp (Tieleman and Hinton, 2012; centered variant: Graves, 2013).

    ``nu = decay * nu + (1 - decay) * g ** 2``; ``params -= lr * g / sqrt(nu + eps)``, with
    the variance instead of ``nu`` when ``centered`` and optional (Nesterov) momentum.
    """
    return create_optimizer_from_optax(
        optax.rmsprop(
            learning_rate=learning_rate,
            decay=decay,
            eps=eps,
            initial_scale=initial_scale,
            centered=centered,
            momentum=momentum,
            nesterov=nesterov,
        )
    )


def yogi(
    learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-3
) -> Optimizer:
    """Yogi (Zaheer et al., 2018): Adam with the additive second-moment update
    ``v -= (1 - b2) * sign(v - g ** 2) * g ** 2``, which keeps the step size from growing."""
    return create_optimizer_from_optax(
        optax.yogi(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)
    )


def adafactor(
    learning_rate: ScalarOrSchedule,
    min_dim_size_to_factor: int = 128,
    decay_rate: float = 0.8,
    decay_offset: int = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: float | None = 1.0,
    momentum: float | None = None,
    dtype_momentum: Any = jnp.float32,
    weight_decay_rate: float | None = None,
    eps: float = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
) -> Optimizer:
    """Adafactor (Shazeer and Stern, 2018): Adam-like steps with a factored (row x column)
    second-moment estimate for matrices whose dims are at least ``min_dim_size_to_factor``.

    ``weight_decay_mask`` is a pytree of booleans (or a function of the params returning one)
    choosing which leaves are decayed.
    """
    return create_optimizer_from_optax(
        optax.adafactor(
            learning_rate=learning_rate,
            min_dim_size_to_factor=min_dim_size_to_factor,
            decay_rate=decay_rate,
            decay_offset=decay_offset,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            clipping_threshold=clipping_threshold,
            momentum=momentum,
            dtype_momentum=dtype_momentum,
            weight_decay_rate=weight_decay_rate,
            eps=eps,
            factored=factored,
            weight_decay_mask=weight_decay_mask,
        )
    )
