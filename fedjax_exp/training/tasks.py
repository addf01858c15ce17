"""Registry of standard federated tasks (``fedjax.training.get_task``): EMNIST only.

A task is ``(train federated data, test federated data, model)``. FedJAX 0.0.17 also lists
Shakespeare, Stack Overflow and CIFAR-100 tasks; their datasets and models are not part of
fedjax_exp, so :func:`get_task` names them in its error instead of failing on a missing import.
"""

from __future__ import annotations

import os

from fedjax_exp.core.federated_data import FederatedData
from fedjax_exp.core.models import Model
from fedjax_exp.datasets import emnist as emnist_data
from fedjax_exp.models import emnist as emnist_models

__all__ = ["ALL_TASKS", "get_task"]

# Task name -> model constructor (all on the 62-class EMNIST, as in FedJAX).
_EMNIST_MODELS = {
    "EMNIST_CONV": emnist_models.create_conv_model,
    "EMNIST_LOGISTIC": emnist_models.create_logistic_model,
    "EMNIST_DENSE": emnist_models.create_dense_model,
}
ALL_TASKS = tuple(_EMNIST_MODELS)

_FEDJAX_ONLY_TASKS = ("SHAKESPEARE_CHARACTER", "STACKOVERFLOW_WORD", "CIFAR100_LOGISTIC")


def get_task(
    name: str, mode: str = "sqlite", cache_dir: str | os.PathLike[str] | None = None
) -> tuple[FederatedData, FederatedData, Model]:
    """The ``(train, test, model)`` of a standard task.

    Args:
        name: one of :data:`ALL_TASKS`.
        mode: how the EMNIST files are found, as in
            :func:`fedjax_exp.datasets.emnist.load_data` (``'sqlite'``: FedJAX's files,
            downloaded if missing; ``'h5'``: TFF's files; ``'auto'``: either).
        cache_dir: where the files are (default ``~/.cache/fedjax``).

    Returns:
        Preprocessed train and test federated data (features ``x``, ``y``, ``domain_id``) and
        the task's model, for all 62 classes.
    """
    if name in _FEDJAX_ONLY_TASKS:
        raise ValueError(
            f"task {name!r} is one of FedJAX's, but its dataset and model are not part of "
            f"fedjax_exp; available tasks: {', '.join(ALL_TASKS)}"
        )
    if name not in _EMNIST_MODELS:
        raise ValueError(f"Unsupported task: {name!r}; available tasks: {', '.join(ALL_TASKS)}")
    train, test = emnist_data.load_data(only_digits=False, mode=mode, cache_dir=cache_dir)
    return train, test, _EMNIST_MODELS[name](only_digits=False)
