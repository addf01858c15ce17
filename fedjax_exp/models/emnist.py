"""EMNIST models (``fedjax.models.emnist``) plus the model tutorial's stax CNN and MLP.

Inputs are ``batch['x']`` of shape ``[batch, 28, 28, 1]`` (ink = 1) and integer labels
``batch['y']``; 62 classes (digits, upper and lower case) or 10 with ``only_digits``.

The FedJAX models keep FedJAX 0.0.17's module and parameter names, shapes and initialization
order, so the same PRNG key gives the same params and FedJAX checkpoints load unchanged:

=========================  ==========  =========================
constructor                params (62)  library
=========================  ==========  =========================
create_logistic_model          48,670  Haiku
create_dense_model            209,662  Haiku
create_conv_model           1,206,590  Haiku (dropout in training)
create_stax_dense_model       209,662  stax
create_stax_cnn_model      12,861,886  stax (tutorial)
create_mlp_model              108,478  plain JAX (tutorial)
=========================  ==========  =========================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.example_libraries import stax

from fedjax_exp.core import metrics
from fedjax_exp.core.losses import cross_entropy_loss
from fedjax_exp.core.models import Model, create_model_from_haiku, create_model_from_stax
from fedjax_exp.core.typing import BatchExample, Params, PRNGKey

__all__ = [
    "create_conv_model",
    "create_dense_model",
    "create_logistic_model",
    "create_mlp_model",
    "create_stax_cnn_model",
    "create_stax_dense_model",
    "num_classes",
]

# Only the shapes matter: Haiku creates the params from this batch.
_HAIKU_SAMPLE_BATCH = {
    "x": np.zeros((1, 28, 28, 1), dtype=np.float32),
    "y": np.zeros((1,), dtype=np.float32),
}
_STAX_SAMPLE_SHAPE = (-1, 28, 28, 1)


def num_classes(only_digits: bool) -> int:
    """10 classes for digits only, else 62 (digits, upper and lower case letters)."""
    return 10 if only_digits else 62


def _eval_metrics() -> dict[str, metrics.Metric]:
    # The same names and order as FedJAX's zoo.
    return {"loss": metrics.CrossEntropyLoss(), "accuracy": metrics.Accuracy()}


def _dropout(x: jax.Array, rate: float, is_train: bool) -> jax.Array:
    # Draws an rng key only in training, in the same order as FedJAX, so that the same
    # apply_for_train rng gives the same dropout masks.
    if is_train:
        return hk.dropout(hk.next_rng_key(), rate, x)
    return x


class _ConvNet(hk.Module):
    """Conv32 -> Conv64 -> MaxPool -> Dropout .25 -> Dense128 -> Dropout .5 -> Dense C."""

    def __init__(self, classes: int):
        # FedJAX's module name, which prefixes every parameter name.
        super().__init__(name="conv_dropout_module")
        self._classes = classes

    def __call__(self, x: jax.Array, is_train: bool) -> jax.Array:
        x = jax.nn.relu(hk.Conv2D(32, kernel_shape=(3, 3), padding="VALID")(x))
        x = jax.nn.relu(hk.Conv2D(64, kernel_shape=(3, 3), padding="VALID")(x))
        x = hk.max_pool(x, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="VALID")
        x = _dropout(x, 0.25, is_train)
        x = jax.nn.relu(hk.Linear(128)(hk.Flatten()(x)))
        x = _dropout(x, 0.5, is_train)
        return hk.Linear(self._classes)(x)


def _haiku_classifier(forward_pass: Callable[..., jax.Array], **kwargs: Any) -> Model:
    """A zoo Model from a Haiku forward pass: cross-entropy training, loss/accuracy metrics."""
    return create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward_pass),
        sample_batch=_HAIKU_SAMPLE_BATCH,
        train_loss=cross_entropy_loss,
        eval_metrics=_eval_metrics(),
        **kwargs,
    )


def _stax_classifier(*layers: Any) -> Model:
    """A zoo Model from ``stax.serial(*layers)``, trained and evaluated like the Haiku ones."""
    stax_init, stax_apply = stax.serial(*layers)
    return create_model_from_stax(
        stax_init=stax_init,
        stax_apply=stax_apply,
        sample_shape=_STAX_SAMPLE_SHAPE,
        train_loss=cross_entropy_loss,
        eval_metrics=_eval_metrics(),
    )


def create_conv_model(only_digits: bool = False) -> Model:
    """The CNN of Reddi et al., "Adaptive Federated Optimization" (2020), in Haiku.

    Two 3x3 VALID convolutions (32, 64 channels), 2x2 max pooling, dropout 0.25, a
    128-unit dense layer, dropout 0.5 and the output layer. Dropout is on in
    ``apply_for_train`` only (it needs the rng there) and off in ``apply_for_eval``.
    """
    classes = num_classes(only_digits)

    def forward_pass(batch: BatchExample, is_train: bool = True) -> jax.Array:
        return _ConvNet(classes)(batch["x"], is_train)

    return _haiku_classifier(
        forward_pass, train_kwargs={"is_train": True}, eval_kwargs={"is_train": False}
    )


def create_dense_model(only_digits: bool = False, hidden_units: int = 200) -> Model:
    """A Haiku MLP: flatten, two ReLU layers of ``hidden_units``, then the output layer."""
    classes = num_classes(only_digits)

    def forward_pass(batch: BatchExample) -> jax.Array:
        network = hk.Sequential(
            [
                hk.Flatten(),
                hk.Linear(hidden_units),
                jax.nn.relu,
                hk.Linear(hidden_units),
                jax.nn.relu,
                hk.Linear(classes),
            ]
        )
        return network(batch["x"])

    return _haiku_classifier(forward_pass)


def create_logistic_model(only_digits: bool = False) -> Model:
    """Multinomial logistic regression in Haiku: flatten, one linear layer."""
    classes = num_classes(only_digits)

    def forward_pass(batch: BatchExample) -> jax.Array:
        return hk.Sequential([hk.Flatten(), hk.Linear(classes)])(batch["x"])

    return _haiku_classifier(forward_pass)


def create_stax_dense_model(only_digits: bool = False, hidden_units: int = 200) -> Model:
    """The same MLP as :func:`create_dense_model`, written with stax."""
    return _stax_classifier(
        stax.Flatten,
        stax.Dense(hidden_units),
        stax.Relu,
        stax.Dense(hidden_units),
        stax.Relu,
        stax.Dense(num_classes(only_digits)),
    )


def create_stax_cnn_model(only_digits: bool = False) -> Model:
    """The model tutorial's stax CNN: Conv 64 3x3 SAME, ReLU, Flatten, Dense 256, ReLU, Dense C.

    12.9M parameters at 62 classes, almost all in the 50,176 x 256 dense layer.
    """
    return _stax_classifier(
        stax.Conv(64, (3, 3), strides=(1, 1), padding="SAME"),
        stax.Relu,
        stax.Flatten,
        stax.Dense(256),
        stax.Relu,
        stax.Dense(num_classes(only_digits)),
    )


def create_mlp_model(only_digits: bool = False, hidden_units: int = 128) -> Model:
    """The model tutorial's hand-written one-hidden-layer MLP, as a Model of plain functions.

    Params are the tuple ``(w0, b0, w1, b1)``; weights are drawn uniformly from [0, 1) and
    biases start at zero, exactly as in the tutorial. Output: ``relu(x @ w0 + b0) @ w1 + b1``.
    """
    classes = num_classes(only_digits)

    @jax.jit
    def init(rng: PRNGKey) -> Params:
        k0, k1 = jax.random.split(rng)
        w0 = jax.random.uniform(k0, [28 * 28, hidden_units])
        b0 = jnp.zeros([hidden_units])
        w1 = jax.random.uniform(k1, [hidden_units, classes])
        b1 = jnp.zeros([classes])
        return w0, b0, w1, b1

    @jax.jit
    def apply_for_eval(params: Params, batch: BatchExample) -> jax.Array:
        w0, b0, w1, b1 = params
        x = batch["x"].reshape((batch["x"].shape[0], -1))
        return jax.nn.relu(x @ w0 + b0) @ w1 + b1

    @jax.jit
    def apply_for_train(
        params: Params, batch: BatchExample, rng: PRNGKey | None = None
    ) -> jax.Array:
        del rng  # Deterministic: no dropout.
        return apply_for_eval(params, batch)

    return Model(init, apply_for_train, apply_for_eval, cross_entropy_loss, _eval_metrics())
