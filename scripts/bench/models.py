"""The models under test: the seed chapter's three plus FedJAX's Haiku CNN.

``reference_model(lib, name)`` builds a model the way the seed chapter (FedJAX's model
tutorial) builds it, through the public API of ``lib`` (``fedjax`` or the drop-in
``fedjax_exp``): FedJAX's logistic model, a hand-written one-hidden-layer MLP (784 -> 128 ->
62, weights drawn uniform in [0, 1) as in the chapter), a stax CNN (Conv 64 3x3 SAME, ReLU,
Flatten, Dense 256, ReLU, Dense 62) and FedJAX's Haiku conv model (dropout in training).

``ours_model(name)`` takes the same model from fedjax_exp's model zoo, which is what
``python run.py model=...`` trains.
"""

from __future__ import annotations

from typing import Any

MODEL_NAMES = ("logistic", "mlp", "stax_cnn", "haiku_cnn")
# Models whose apply_for_train needs a PRNG key (dropout); the others get None, as in the
# seed chapter's loop.
NEEDS_RNG = frozenset({"haiku_cnn"})
# fedjax_exp's zoo constructors (conf/model/*.yaml names them the same way).
OURS_CONSTRUCTORS = {
    "logistic": "create_logistic_model",
    "mlp": "create_mlp_model",
    "stax_cnn": "create_stax_cnn_model",
    "haiku_cnn": "create_conv_model",
}


def check_model_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _per_example_cross_entropy(batch: Any, logits: Any) -> Any:
    import jax
    import jax.numpy as jnp

    one_hot = jax.nn.one_hot(batch["y"], logits.shape[-1])
    return -jnp.sum(jax.nn.log_softmax(logits) * one_hot, axis=-1)


def _seed_mlp(lib: Any, hidden: int = 128, num_classes: int = 62) -> Any:
    import jax
    import jax.numpy as jnp

    def init(rng: Any) -> Any:
        k0, k1 = jax.random.split(rng)
        return (
            jax.random.uniform(k0, [28 * 28, hidden]),
            jnp.zeros([hidden]),
            jax.random.uniform(k1, [hidden, num_classes]),
            jnp.zeros([num_classes]),
        )

    def apply(params: Any, batch: Any, rng: Any = None) -> Any:
        w0, b0, w1, b1 = params
        x = batch["x"].reshape([batch["x"].shape[0], -1])
        return jax.nn.relu(x @ w0 + b0) @ w1 + b1

    return lib.Model(
        init=init,
        apply_for_train=apply,
        apply_for_eval=lambda params, batch: apply(params, batch),
        train_loss=_per_example_cross_entropy,
        eval_metrics={"accuracy": lib.metrics.Accuracy()},
    )


def _seed_stax_cnn(lib: Any, num_classes: int = 62) -> Any:
    from jax.example_libraries import stax

    init, apply = stax.serial(
        stax.Conv(out_chan=64, filter_shape=(3, 3), strides=(1, 1), padding="SAME"),
        stax.Relu,
        stax.Flatten,
        stax.Dense(256),
        stax.Relu,
        stax.Dense(num_classes),
    )
    return lib.create_model_from_stax(
        stax_init=init,
        stax_apply=apply,
        sample_shape=[-1, 28, 28, 1],
        train_loss=_per_example_cross_entropy,
        eval_metrics={"accuracy": lib.metrics.Accuracy()},
    )


def reference_model(lib: Any, name: str) -> Any:
    """Model ``name`` built as the seed chapter builds it, through ``lib``'s public API."""
    check_model_name(name)
    if name == "logistic":
        return lib.models.emnist.create_logistic_model()
    if name == "mlp":
        return _seed_mlp(lib)
    if name == "stax_cnn":
        return _seed_stax_cnn(lib)
    return lib.models.emnist.create_conv_model()


def ours_model(name: str) -> Any:
    """Model ``name`` from fedjax_exp's zoo (raises ImportError/AttributeError while missing)."""
    check_model_name(name)
    from fedjax_exp.models import emnist

    return getattr(emnist, OURS_CONSTRUCTORS[name])()
