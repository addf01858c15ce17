"""The federated training loop and its evaluation functions (``fedjax.training``).

:func:`run_federated_experiment` runs rounds of a
:class:`~fedjax_exp.core.federated_algorithm.FederatedAlgorithm` on clients from a client
sampler, evaluates periodically and at the end, checkpoints, and resumes from the latest
checkpoint in its ``root_dir``. Names, arguments and round semantics are FedJAX 0.0.17's;
TensorFlow is not used anywhere (metrics go to a JSON-lines file, see
:mod:`fedjax_exp.training.logging`).

FedJAX's ``set_tf_cpu_only`` is kept as a no-op so ported scripts that call it still run: it
only kept TensorFlow's data loading off the accelerators, and no TensorFlow runs here.

Where this differs from FedJAX 0.0.17 (each where FedJAX fails or contradicts its own docs):

- A negative ``checkpoint_frequency`` or ``eval_frequency`` means never, as documented
  (FedJAX's ``round_num % -1 == 0`` made it every round).
- A sampler without ``set_round_num`` (``UniformShuffledClientSampler``) works on a fresh start
  (FedJAX raised NotImplementedError); resuming with one is a clear error.
- A resumed run with no rounds left still runs the final evaluations, at the checkpoint's round
  (FedJAX failed on an unset loop variable).
- Bad configuration and evaluation functions of the wrong type fail before round 1, not after
  the first evaluated round.
"""

from __future__ import annotations

import abc
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from fedjax_exp.core import client_datasets, federated_data, models
from fedjax_exp.core.atomic_file import AtomicFile
from fedjax_exp.training import checkpoint
from fedjax_exp.training import logging as metrics_logging

if TYPE_CHECKING:
    from fedjax_exp.core.client_samplers import ClientSampler
    from fedjax_exp.core.federated_algorithm import FederatedAlgorithm, ServerState

__all__ = [
    "EvaluationFn",
    "FederatedExperimentConfig",
    "ModelFullEvaluationFn",
    "ModelSampleClientsEvaluationFn",
    "ModelTrainClientsEvaluationFn",
    "TrainClientsEvaluationFn",
    "run_federated_experiment",
    "set_tf_cpu_only",
]

_log = logging.getLogger(__name__)

# One sampled client as a ClientSampler yields it: (client id, client dataset, client rng).
SampledClient = tuple[Any, client_datasets.ClientDataset, Any]


def set_tf_cpu_only() -> None:
    """Does nothing: kept so code ported from FedJAX runs unchanged.

    FedJAX hid the GPUs and TPUs from TensorFlow, which it used for data loading only. No
    TensorFlow is imported here, so there is nothing to restrict.
    """


def _state_params(state: Any, evaluator: str) -> Any:
    """``state.params``, or one clear error when the server state has no such field."""
    try:
        return state.params
    except AttributeError:
        raise TypeError(
            f"{evaluator} evaluates the model at state.params, but the server state "
            f"({type(state).__name__}) has no 'params' attribute; use a server state with a "
            "params field, or write an EvaluationFn that reads the parameters from it"
        ) from None


class EvaluationFn(abc.ABC):
    """An evaluation given only the server state and the round: ``fn(state, round_num)``.

    Used for evaluation on held-out data (the full test set, or test clients sampled per
    round). May be used in both ``periodic_eval_fn_map`` and ``final_eval_fn_map``.
    """

    @abc.abstractmethod
    def __call__(self, state: ServerState, round_num: int) -> Mapping[str, Any]:
        """Returns metric name -> value for ``state`` after round ``round_num``."""


class ModelSampleClientsEvaluationFn(EvaluationFn):
    """Evaluates ``state.params`` on clients sampled for the round.

    Each call sets the sampler to ``round_num`` and evaluates on the clients it samples, all
    of their examples batched together as by
    :func:`~fedjax_exp.core.client_datasets.padded_batch_client_datasets`. With
    :class:`~fedjax_exp.core.client_samplers.UniformGetClientSampler` the same round always
    evaluates on the same clients.

    Args:
        client_sampler: sampler over the evaluation data (not the training sampler: its round
            number is reset on every call).
        model: the model evaluated.
        batch_hparams: batching of the evaluation examples.
    """

    def __init__(
        self,
        client_sampler: ClientSampler,
        model: models.Model,
        batch_hparams: client_datasets.PaddedBatchHParams,
    ):
        self._client_sampler = client_sampler
        self._model = model
        self._batch_hparams = batch_hparams

    def __call__(self, state: ServerState, round_num: int) -> Mapping[str, Any]:
        params = _state_params(state, type(self).__name__)
        self._client_sampler.set_round_num(round_num)
        clients = self._client_sampler.sample()
        batches = client_datasets.padded_batch_client_datasets(
            [dataset for _, dataset, _ in clients], self._batch_hparams
        )
        return models.evaluate_model(self._model, params, batches)


class ModelFullEvaluationFn(EvaluationFn):
    """Evaluates ``state.params`` on every example of a federated dataset.

    Batches as :func:`~fedjax_exp.core.federated_data.padded_batch_federated_data` (clients
    in order, batches spanning client boundaries). The round number is not used.

    Args:
        fd: the evaluation data.
        model: the model evaluated.
        batch_hparams: batching of the evaluation examples.
    """

    def __init__(
        self,
        fd: federated_data.FederatedData,
        model: models.Model,
        batch_hparams: client_datasets.PaddedBatchHParams,
    ):
        self._fd = fd
        self._model = model
        self._batch_hparams = batch_hparams

    def __call__(self, state: ServerState, round_num: int) -> Mapping[str, Any]:
        del round_num  # The whole dataset, whatever the round.
        params = _state_params(state, type(self).__name__)
        batches = federated_data.padded_batch_federated_data(self._fd, self._batch_hparams)
        return models.evaluate_model(self._model, params, batches)


class TrainClientsEvaluationFn(abc.ABC):
    """An evaluation that also gets the round's training clients:
    ``fn(state, round_num, train_clients)``.

    Only meaningful in ``periodic_eval_fn_map``, where it is called with the clients the
    round just trained on (as returned by the training sampler).
    """

    @abc.abstractmethod
    def __call__(
        self, state: ServerState, round_num: int, train_clients: Sequence[SampledClient]
    ) -> Mapping[str, Any]:
        """Returns metric name -> value for ``state`` after round ``round_num``."""


class ModelTrainClientsEvaluationFn(TrainClientsEvaluationFn):
    """Evaluates ``state.params`` (the parameters after the round) on the round's training
    clients, all their examples batched together as by
    :func:`~fedjax_exp.core.client_datasets.padded_batch_client_datasets`.

    Args:
        model: the model evaluated.
        batch_hparams: batching of the clients' examples.
    """

    def __init__(self, model: models.Model, batch_hparams: client_datasets.PaddedBatchHParams):
        self._model = model
        self._batch_hparams = batch_hparams

    def __call__(
        self, state: ServerState, round_num: int, train_clients: Sequence[SampledClient]
    ) -> Mapping[str, Any]:
        del round_num  # The clients given, whatever the round.
        params = _state_params(state, type(self).__name__)
        batches = client_datasets.padded_batch_client_datasets(
            [dataset for _, dataset, _ in train_clients], self._batch_hparams
        )
        return models.evaluate_model(self._model, params, batches)


class FederatedExperimentConfig(NamedTuple):
    """Settings of :func:`run_federated_experiment` (FedJAX's, same names and defaults).

    Attributes:
        root_dir: directory for checkpoints, ``metrics.jsonl`` and the final evaluations'
            ``<name>.tsv`` files (created if missing).
        num_rounds: train up to and including this round (rounds count from 1).
        checkpoint_frequency: checkpoint after every round divisible by it, and after the
            first round a run trains; 0 (or less) never checkpoints.
        num_checkpoints_to_keep: how many of the latest checkpoints are kept on disk.
        eval_frequency: run the periodic evaluations after every round divisible by it, and
            after the first round a run trains; 0 (or less) never runs them.
    """

    root_dir: str
    num_rounds: int
    checkpoint_frequency: int = 0
    num_checkpoints_to_keep: int = 1
    eval_frequency: int = 0


def _check_int(config: FederatedExperimentConfig, name: str, minimum: int | None = None) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(
            f"FederatedExperimentConfig.{name} must be an int, got {type(value).__name__} {value!r}"
        )
    if minimum is not None and value < minimum:
        raise ValueError(f"FederatedExperimentConfig.{name} must be >= {minimum}, got {value}")


def _check_config(config: FederatedExperimentConfig) -> None:
    if not isinstance(config, FederatedExperimentConfig):
        raise TypeError(f"config must be a FederatedExperimentConfig, got {type(config).__name__}")
    if not isinstance(config.root_dir, (str, os.PathLike)):
        raise TypeError(
            f"FederatedExperimentConfig.root_dir must be a path, got {config.root_dir!r}"
        )
    _check_int(config, "num_rounds", minimum=0)
    _check_int(config, "checkpoint_frequency")
    _check_int(config, "eval_frequency")
    if config.checkpoint_frequency > 0:
        _check_int(config, "num_checkpoints_to_keep", minimum=1)


def _check_eval_fns(
    periodic_eval_fn_map: Mapping[str, Any], final_eval_fn_map: Mapping[str, Any]
) -> None:
    """Bad evaluation functions fail before training, not after the first evaluated round."""
    for name, fn in periodic_eval_fn_map.items():
        if not isinstance(fn, (EvaluationFn, TrainClientsEvaluationFn)):
            raise TypeError(
                f"periodic_eval_fn_map[{name!r}] is a {type(fn).__name__}; it must be an "
                "EvaluationFn or a TrainClientsEvaluationFn (subclass one of them)"
            )
    for name, fn in final_eval_fn_map.items():
        if not isinstance(fn, EvaluationFn):
            hint = (
                ": final evaluation has no training clients, so TrainClientsEvaluationFns "
                "belong in periodic_eval_fn_map only"
                if isinstance(fn, TrainClientsEvaluationFn)
                else " (subclass it)"
            )
            raise TypeError(
                f"final_eval_fn_map[{name!r}] is a {type(fn).__name__}; it must be an "
                f"EvaluationFn{hint}"
            )


def _is_due(round_num: int, start_round_num: int, frequency: int) -> bool:
    """FedJAX's schedule: every ``frequency`` rounds, plus the first round of every run."""
    return frequency > 0 and (round_num == start_round_num or round_num % frequency == 0)


def _set_start_round(client_sampler: Any, start_round_num: int, resuming: bool) -> None:
    try:
        client_sampler.set_round_num(start_round_num)
    except NotImplementedError:
        # FedJAX calls set_round_num even on a fresh start, so its loop fails outright with
        # samplers that cannot seek (UniformShuffledClientSampler). A fresh start does not need
        # to seek: such a sampler starts where it was built to start.
        if resuming:
            raise ValueError(
                f"cannot resume at round {start_round_num}: "
                f"{type(client_sampler).__name__}.set_round_num is not supported, so the "
                "sampler cannot continue from the checkpointed round. Use a sampler that can "
                "seek (UniformGetClientSampler), or a new root_dir to start over"
            ) from None


def _write_tsv(path: str, metrics: Mapping[str, Any]) -> None:
    """FedJAX's final-evaluation file: a header line of names, a line of values, tab-separated;
    written atomically so a crash never leaves a half-written result."""
    text = "\t".join(metrics.keys()) + "\n" + "\t".join(str(v) for v in metrics.values())
    with AtomicFile(path) as out:
        out.tmp.write_text(text, encoding="utf-8")


def run_federated_experiment(
    algorithm: FederatedAlgorithm,
    init_state: ServerState,
    client_sampler: ClientSampler,
    config: FederatedExperimentConfig,
    periodic_eval_fn_map: Mapping[str, EvaluationFn | TrainClientsEvaluationFn] | None = None,
    final_eval_fn_map: Mapping[str, EvaluationFn] | None = None,
) -> ServerState:
    """Trains ``algorithm`` for ``config.num_rounds`` rounds; returns the final server state.

    Round ``r`` (from 1) samples clients with ``client_sampler.sample()``, after the sampler
    was set to the run's first round with ``set_round_num``, and applies
    ``algorithm.apply(state, clients)``. After the round, as scheduled by ``config`` (every
    ``frequency`` rounds and after the run's first round):

    - the state is checkpointed to ``root_dir/checkpoint_<r:08d>`` (the latest
      ``num_checkpoints_to_keep`` kept), and
    - every periodic evaluation runs, as ``fn(state, r)`` for an :class:`EvaluationFn` and
      ``fn(state, r, clients)`` for a :class:`TrainClientsEvaluationFn` (the round's training
      clients); their metrics are logged as writer ``<name>`` at round ``r``, with
      ``periodic_eval_duration_sec`` under writer ``"."``.

    Every round also logs ``mean_round_duration_sec`` under writer ``"."``. After the last
    round each final evaluation runs as ``fn(state, num_rounds)`` and its metrics are written
    to ``root_dir/<name>.tsv``.

    Resuming: if ``root_dir`` holds checkpoints, training continues after the latest one, with
    its state (restored into ``init_state``'s structure) and the sampler set to the next round,
    so a run killed and restarted with the same arguments ends in the same state as one that
    was never interrupted (given a deterministic algorithm and sampler).

    Args:
        algorithm: the federated algorithm.
        init_state: the server state before round 1 (also the template checkpoints are
            restored into).
        client_sampler: sampler of the training clients.
        config: rounds, checkpointing and evaluation schedule, output directory.
        periodic_eval_fn_map: name -> evaluation run on ``config.eval_frequency``'s schedule.
        final_eval_fn_map: name -> evaluation run once after training.

    Returns:
        The server state after round ``config.num_rounds``.
    """
    _check_config(config)
    periodic_eval_fn_map = dict(periodic_eval_fn_map or {})
    final_eval_fn_map = dict(final_eval_fn_map or {})
    _check_eval_fns(periodic_eval_fn_map, final_eval_fn_map)
    root_dir = os.fspath(config.root_dir)
    if root_dir:
        os.makedirs(root_dir, exist_ok=True)
    logger = metrics_logging.Logger(root_dir)

    latest = checkpoint.load_latest_checkpoint(root_dir, target=init_state)
    if latest is not None:
        state, last_round_num = latest
        start_round_num = last_round_num + 1
        _log.info("Resuming from the checkpoint of round %d in %s.", last_round_num, root_dir)
    else:
        state, last_round_num, start_round_num = init_state, 0, 1
    _set_start_round(client_sampler, start_round_num, resuming=latest is not None)

    start = time.time()
    for round_num in range(start_round_num, config.num_rounds + 1):
        clients = client_sampler.sample()
        _log.info("round_num %d: client_ids = %s", round_num, [c[0] for c in clients])
        state, _ = algorithm.apply(state, clients)

        if _is_due(round_num, start_round_num, config.checkpoint_frequency):
            checkpoint.save_checkpoint(root_dir, state, round_num, config.num_checkpoints_to_keep)

        if _is_due(round_num, start_round_num, config.eval_frequency):
            eval_start = time.time()
            for eval_name, eval_fn in periodic_eval_fn_map.items():
                if isinstance(eval_fn, TrainClientsEvaluationFn):
                    metrics = eval_fn(state, round_num, clients)
                else:
                    metrics = eval_fn(state, round_num)
                for metric_name, metric_value in (metrics or {}).items():
                    logger.log(eval_name, metric_name, metric_value, round_num)
            logger.log(".", "periodic_eval_duration_sec", time.time() - eval_start, round_num)

        # Dispatch time mostly (JAX runs asynchronously), as in FedJAX: a rough figure.
        mean_round_duration = (time.time() - start) / (round_num + 1 - start_round_num)
        logger.log(".", "mean_round_duration_sec", mean_round_duration, round_num)
        last_round_num = round_num

    final_eval_start = time.time()
    for eval_name, eval_fn in final_eval_fn_map.items():
        # The round of the final state: num_rounds, or the checkpoint's round when a resumed run
        # had no rounds left (FedJAX failed there, with its loop variable never set).
        metrics = eval_fn(state, last_round_num)
        if metrics:
            _write_tsv(os.path.join(root_dir, f"{eval_name}.tsv"), metrics)
    _log.info("final_eval_duration = %f sec.", time.time() - final_eval_start)
    return state
