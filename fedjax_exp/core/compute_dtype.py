"""Reduced-precision training compute: a model whose training forward pass runs in bf16."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.core.typing import BatchExample, Params, PRNGKey

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _cast_floats(tree: Any, dtype: Any) -> Any:
    def cast(x: Any) -> Any:
        x = jnp.asarray(x)
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

    return jax.tree_util.tree_map(cast, tree)


def with_compute_dtype(model: Any, dtype: str | Any) -> Any:
    """``model`` whose training forward pass computes in ``dtype`` (e.g. "bfloat16").

    Parameters and floating batch features are cast to ``dtype`` inside ``apply_for_train``
    (gradients flow back through the cast, so they and the parameters stay float32) and the
    output is cast back to float32, so the loss runs in float32. Evaluation is unchanged.
    ``"float32"`` returns ``model`` itself.

    Raises:
      ValueError: an unknown dtype name.
    """
    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"trainer.compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}"
        )
    if name == "float32":
        return model
    compute = jnp.dtype(name)
    forward: Callable[..., Any] = model.apply_for_train

    def apply_for_train(params: Params, batch: BatchExample, rng: PRNGKey | None = None) -> Any:
        output = forward(_cast_floats(params, compute), _cast_floats(dict(batch), compute), rng)
        return _cast_floats(output, jnp.float32)

    return model.replace(apply_for_train=apply_for_train)
