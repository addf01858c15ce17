"""Train steps as pure JAX functions: the centralized update and many steps in one dispatch.

:func:`centralized_update` is one optimizer step on a batch (the masked mean loss);
:func:`multi_step` runs any such update for a block of steps as one jitted, donated call (a
``lax.scan``); :func:`stack_inputs` makes the block. Nothing here reads a config or the host
clock: the experiment layer (:mod:`fedjax_exp.experiment.algorithms`) drives these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core.dataclasses import dataclass
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY, BatchExample, Params, PRNGKey

__all__ = [
    "TrainState",
    "centralized_update",
    "masked_mean_loss",
    "model_uses_convolution",
    "multi_step",
    "stack_inputs",
    "uses_convolution",
]


@dataclass
class TrainState:
    """Parameters and optimizer state of centralized training."""

    params: Params
    opt_state: Any


def masked_mean_loss(
    model: Any, params: Params, batch: BatchExample, rng: PRNGKey | None
) -> jax.Array:
    """Mean of ``model.train_loss`` over the real (unmasked) examples of ``batch``."""
    per_example = model.train_loss(batch, model.apply_for_train(params, batch, rng))
    mask = batch.get(EXAMPLE_MASK_KEY)
    if mask is None:
        return jnp.mean(per_example)
    mask = mask.astype(per_example.dtype)
    # max(.., 1): an all-padding batch contributes zero loss and zero gradient, not NaN.
    return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def centralized_update(
    model: Any, optimizer: Any
) -> Callable[[TrainState, BatchExample, PRNGKey], tuple[TrainState, dict[str, jax.Array]]]:
    """The pure train step ``(state, batch, rng) -> (state, {"loss": loss})`` (not jitted)."""

    def update(state: TrainState, batch: BatchExample, rng: PRNGKey):
        loss, grads = jax.value_and_grad(lambda p: masked_mean_loss(model, p, batch, rng))(
            state.params
        )
        opt_state, params = optimizer.apply(grads, state.opt_state, state.params)
        return TrainState(params=params, opt_state=opt_state), {"loss": loss}

    return update


def multi_step(
    update: Callable[[Any, Any, PRNGKey], tuple[Any, Mapping[str, jax.Array]]],
    num_steps: int,
    shardings: tuple[Any, Any] | None = None,
) -> Callable[..., tuple[Any, dict[str, jax.Array]]]:
    """``num_steps`` steps of ``update`` as one jitted dispatch with a donated state.

    The result is ``run(state, block, base_rng, first_step) -> (state, scalars)``: ``block``
    stacks the step inputs along a leading axis; step ``first_step + i`` uses
    ``fold_in(base_rng, first_step + i)`` (per row for keys stacked over trials); ``scalars``
    have a leading ``num_steps`` axis. ``num_steps > 1`` is a ``lax.scan``. ``shardings =
    (replicated, block_sharding)`` compiles for a device mesh.
    """

    def one(state: Any, batch: Any, base_rng: PRNGKey, step: jax.Array) -> Any:
        # Keys stacked over trials (a vectorized sweep): each trial folds in its own.
        fold = jax.random.fold_in if base_rng.ndim == 1 else jax.vmap(jax.random.fold_in, (0, None))
        return update(state, batch, fold(base_rng, step))

    def run(state: Any, block: Any, base_rng: PRNGKey, first_step: jax.Array):
        if num_steps == 1:
            inputs = jax.tree_util.tree_map(lambda x: x[0], block)
            state, scalars = one(state, inputs, base_rng, first_step)
            return state, jax.tree_util.tree_map(lambda x: x[None], dict(scalars))

        def body(state: Any, xs: tuple[Any, jax.Array]) -> Any:
            return one(state, xs[0], base_rng, xs[1])

        steps = first_step + jnp.arange(num_steps, dtype=jnp.int32)
        return jax.lax.scan(body, state, (block, steps))

    kwargs: dict[str, Any] = {}
    if shardings is not None:
        replicated, block_sharding = shardings
        kwargs = dict(
            in_shardings=(replicated, block_sharding, replicated, replicated),
            out_shardings=(replicated, replicated),
        )
    jitted = jax.jit(run, donate_argnums=0, **kwargs)

    def call(state: Any, block: Any, base_rng: PRNGKey, first_step: int):
        return jitted(state, block, base_rng, np.int32(first_step))

    return call


def uses_convolution(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` computes a convolution, nested calls included (traced
    abstractly: ``args`` may be ``jax.ShapeDtypeStruct`` s; nothing runs)."""
    return "conv_general_dilated" in str(jax.make_jaxpr(fn)(*args))


def model_uses_convolution(model: Any, batch: Mapping[str, Any]) -> bool:
    """Whether ``model.apply_for_train`` convolves on batches shaped like ``batch`` (a few
    examples; traced abstractly, nothing runs)."""
    key = jax.random.PRNGKey(0)
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
    return uses_convolution(model.apply_for_train, jax.eval_shape(model.init, key), abstract, key)


def stack_inputs(items: Sequence[Any]) -> Any:
    """Step inputs stacked along a new leading axis, on the host (NumPy)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack(xs), *items)
