"""A Model from any Haiku module given by dotted path (the ``model=haiku`` config option)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import haiku as hk
import numpy as np

from fedjax_exp.core import metrics
from fedjax_exp.core.models import Model, create_model_from_haiku

__all__ = ["create_model_from_module"]


def _import_object(path: str) -> Callable[..., Any]:
    """The object at dotted ``path`` ("package.module.Name")."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"model.module={path!r} cannot be imported ({error}); give the dotted path of a "
            "Haiku module class, e.g. haiku.nets.MLP"
        ) from None


def create_model_from_module(
    module: str,
    module_kwargs: Mapping[str, Any] | None = None,
    flatten_input: bool = False,
    input_shape: Sequence[int] = (28, 28, 1),
) -> Model:
    """Wraps ``module(**module_kwargs)`` applied to ``batch["x"]`` as a fedjax_exp Model.

    ``module`` is the dotted path of a Haiku module class (or any callable returning a
    callable on arrays, e.g. a function building an ``hk.Sequential``). The network must
    return logits; the loss and metrics are set from the config afterwards.
    """
    factory = _import_object(module)
    kwargs = dict(module_kwargs or {})

    def forward_pass(batch: Mapping[str, Any]) -> Any:
        x = batch["x"]
        if flatten_input:
            x = hk.Flatten()(x)
        return factory(**kwargs)(x)

    sample_batch = {"x": np.zeros((1, *input_shape), np.float32), "y": np.zeros((1,), np.int32)}
    return create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward_pass),
        sample_batch=sample_batch,
        train_loss=lambda batch, preds: metrics.unreduced_cross_entropy_loss(batch["y"], preds),
        eval_metrics={"accuracy": metrics.Accuracy()},
    )
