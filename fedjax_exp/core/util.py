"""Small helpers FedJAX keeps in ``fedjax.core.util``."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

__all__ = ["FakeTensorFlowModule", "import_tf", "safe_div"]


def safe_div(a: Any, b: Any) -> jnp.ndarray:
    """``a / b`` where ``b != 0``, else 0, with finite gradients everywhere.

    Dividing by ``where(b != 0, b, 1)`` first keeps the unused branch finite: a plain
    ``where(b != 0, a / b, 0)`` would still send NaN gradients through ``a / 0``.
    """
    nonzero = b != 0
    quotient = a / jnp.where(nonzero, b, 1)
    return jnp.where(nonzero, quotient, 0)


class FakeTensorFlowModule:
    """Stands in for TensorFlow when it is not installed; any attribute access explains."""

    def __getattr__(self, name: str) -> Any:
        raise ModuleNotFoundError(
            f"tf.{name} needs TensorFlow, which is not installed. fedjax_exp itself never "
            "needs it; install tensorflow-cpu (or tensorflow) only for code that uses TF."
        )


def import_tf() -> Any:
    """TensorFlow if it is installed, else a ``FakeTensorFlowModule`` that fails on use."""
    try:
        import tensorflow  # noqa: PLC0415 - optional dependency, imported only on request.
    except ModuleNotFoundError:
        return FakeTensorFlowModule()
    return tensorflow
