"""fedjax_exp: a FedJAX-compatible federated learning library and experiment framework.

``import fedjax_exp as fedjax`` gives FedJAX's public names (``fedjax.Model``,
``fedjax.evaluate_model``, ``fedjax.metrics``, ``fedjax.optimizers``, ...) on current JAX.

Names are resolved lazily (PEP 562): ``import fedjax_exp`` itself does not import JAX. That keeps
command-line start-up fast and lets a Hydra launcher fork worker processes before any JAX
runtime exists in the parent (JAX warns that fork after start-up may deadlock).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module that defines it.
_ATTRIBUTES: dict[str, str] = {}


def _export(module: str, *names: str) -> None:
    for name in names:
        _ATTRIBUTES[name] = module


_export("fedjax_exp.core.dataclasses", "dataclass")
_export(
    "fedjax_exp.core.typing",
    "BatchExample",
    "BatchPrediction",
    "ClientId",
    "OptState",
    "Params",
    "PRNGKey",
    "PyTree",
    "SingleExample",
    "SinglePrediction",
)
_export(
    "fedjax_exp.core.models",
    "Model",
    "create_model_from_haiku",
    "create_model_from_stax",
    "model_per_example_loss",
    "model_grad",
    "grad",
    "evaluate_model",
    "ModelEvaluator",
    "evaluate_average_loss",
    "AverageLossEvaluator",
)
_export("fedjax_exp.core.optimizers", "Optimizer")
_export(
    "fedjax_exp.core.client_datasets",
    "EXAMPLE_MASK_KEY",
    "BatchHParams",
    "PaddedBatchHParams",
    "ShuffleRepeatBatchHParams",
    "BatchPreprocessor",
    "ClientDataset",
    "padded_batch_client_datasets",
    "buffered_shuffle_batch_client_datasets",
)
_export(
    "fedjax_exp.core.federated_data",
    "ClientPreprocessor",
    "FederatedData",
    "FederatedDataBuilder",
    "RepeatableIterator",
    "SubsetFederatedData",
    "padded_batch_federated_data",
    "shuffle_repeat_batch_federated_data",
)
_export("fedjax_exp.core.in_memory_federated_data", "InMemoryFederatedData")
_export("fedjax_exp.core.federated_algorithm", "FederatedAlgorithm")
_export(
    "fedjax_exp.core.for_each_client",
    "ForEachClientBackend",
    "for_each_client",
    "for_each_client_backend",
    "get_for_each_client_backend",
    "set_for_each_client_backend",
)
_export(
    "fedjax_exp.core.sqlite_federated_data", "SQLiteFederatedData", "SQLiteFederatedDataBuilder"
)

# Public submodule -> its module path.
_SUBMODULES: dict[str, str] = {
    "metrics": "fedjax_exp.core.metrics",
    "optimizers": "fedjax_exp.core.optimizers",
    "losses": "fedjax_exp.core.losses",
    "regularizers": "fedjax_exp.core.regularizers",
    "tree_util": "fedjax_exp.core.tree_util",
    "client_samplers": "fedjax_exp.core.client_samplers",
    "serialization": "fedjax_exp.core.serialization",
    "algorithms": "fedjax_exp.algorithms",
    "aggregators": "fedjax_exp.aggregators",
    "training": "fedjax_exp.training",
    "core": "fedjax_exp.core",
    "models": "fedjax_exp.models",
    "datasets": "fedjax_exp.datasets",
    "experiment": "fedjax_exp.experiment",
}

__all__ = sorted([*_ATTRIBUTES, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    elif name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    else:
        raise AttributeError(f"module 'fedjax_exp' has no attribute {name!r}")
    globals()[name] = value  # Cache: later lookups skip __getattr__.
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # Static analysers and IDEs see the eager imports.
    from fedjax_exp.core import metrics, optimizers  # noqa: F401
    from fedjax_exp.core.models import Model, evaluate_model  # noqa: F401
