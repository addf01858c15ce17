"""Optimizers whose learning rate is a value of the program, not a constant baked into it.

A sweep that trains several learning rates as one vmapped program needs each rate as an
ordinary (traced, vmappable) array:

- :func:`learning_rate_in_state` keeps the rate in the optimizer state (the idea of
  ``optax.inject_hyperparams``), for optimizers whose state the caller holds;
- :func:`learning_rate_in_scope` reads it, while a program is traced, from the innermost
  :func:`learning_rate_scope`, for optimizers whose state is made inside the program (a
  federated client's, built from the server params every round).

Either way the arithmetic is ``make_optimizer(rate)``'s.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.optimizers import Optimizer
from fedjax_exp.core.typing import Params

__all__ = [
    "LearningRateState",
    "learning_rate_in_scope",
    "learning_rate_in_state",
    "learning_rate_scope",
]


@dataclass
class LearningRateState:
    """Optimizer state carrying its own learning rate (a float32 scalar, vmappable)."""

    learning_rate: jax.Array
    inner: Any


def learning_rate_in_state(make_optimizer: Callable[[Any], Any], learning_rate: float) -> Any:
    """An :class:`~fedjax_exp.core.optimizers.Optimizer` whose learning rate is in its state.

    ``make_optimizer(lr)`` builds the underlying optimizer; ``apply`` calls it again with the
    (possibly traced) rate read from the state. The arithmetic is ``make_optimizer(rate)``'s.
    """

    def init(params: Params) -> LearningRateState:
        lr = jnp.asarray(learning_rate, jnp.float32)
        return LearningRateState(learning_rate=lr, inner=make_optimizer(learning_rate).init(params))

    def apply(grads: Params, state: LearningRateState, params: Params) -> tuple[Any, Params]:
        inner, params = make_optimizer(state.learning_rate).apply(grads, state.inner, params)
        return LearningRateState(learning_rate=state.learning_rate, inner=inner), params

    return Optimizer(init=init, apply=apply)


_SCOPE = threading.local()


@contextlib.contextmanager
def learning_rate_scope(rate: Any) -> Iterator[None]:
    """Optimizers of :func:`learning_rate_in_scope` traced inside use ``rate``."""
    previous, _SCOPE.rate = getattr(_SCOPE, "rate", None), rate
    try:
        yield
    finally:
        _SCOPE.rate = previous


def learning_rate_in_scope(make_optimizer: Callable[[Any], Any], learning_rate: float) -> Any:
    """An optimizer at :func:`learning_rate_scope`'s rate while that scope is open (outside:
    ``learning_rate``). ``init`` uses ``learning_rate``: the state must not depend on it."""

    def apply(grads: Params, state: Any, params: Params) -> tuple[Any, Params]:
        rate = getattr(_SCOPE, "rate", None)
        rate = learning_rate if rate is None else rate
        return make_optimizer(rate).apply(grads, state, params)

    return Optimizer(init=lambda params: make_optimizer(learning_rate).init(params), apply=apply)
