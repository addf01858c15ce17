"""Federated experiment utilities (``fedjax.training``), without TensorFlow.

The training loop with periodic and final evaluation, checkpointing and resume
(:func:`run_federated_experiment`), its evaluation functions, checkpoint files, a JSON-lines
metrics logger and the EMNIST task registry. FedJAX's ``structured_flags`` (absl flag helpers)
is not provided: experiments here are configured with Hydra.
"""

from fedjax_exp.training.checkpoint import load_latest_checkpoint, save_checkpoint
from fedjax_exp.training.federated_experiment import (
    EvaluationFn,
    FederatedExperimentConfig,
    ModelFullEvaluationFn,
    ModelSampleClientsEvaluationFn,
    ModelTrainClientsEvaluationFn,
    TrainClientsEvaluationFn,
    run_federated_experiment,
    set_tf_cpu_only,
)
from fedjax_exp.training.logging import Logger, read_metrics
from fedjax_exp.training.tasks import ALL_TASKS, get_task

__all__ = [
    "ALL_TASKS",
    "EvaluationFn",
    "FederatedExperimentConfig",
    "Logger",
    "ModelFullEvaluationFn",
    "ModelSampleClientsEvaluationFn",
    "ModelTrainClientsEvaluationFn",
    "TrainClientsEvaluationFn",
    "get_task",
    "load_latest_checkpoint",
    "read_metrics",
    "run_federated_experiment",
    "save_checkpoint",
    "set_tf_cpu_only",
]
