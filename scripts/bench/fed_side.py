"""One side of one federated measurement (FedAvg on EMNIST-style data), in a fresh process.

    python -m bench.fed_side --side fedjax|jit|parallel|run --model logistic|haiku_cnn \
        --rounds 200 --warmup 10 --windows 5 --train TRAIN.h5 --test TEST.h5 [--seeds N]

Prints one JSON line: the timed windows' rates (rounds/s), the warm-up time, and the accuracy
on the whole test set after the last round for seeds 0..N-1 (seed 0 is the timed run).

The settings are FedJAX's ``experiments/fed_avg`` flags for EMNIST (:data:`SETTINGS`): 10
clients per round drawn by ``UniformGetClientSampler`` (sampler seed 2 + seed, params seed 1 +
seed, as ``run_fed_avg.py`` seeds them), one epoch of client SGD at batch 10 per client, and a
server optimizer on the mean client delta. Sides:

- ``fedjax``: FedJAX 0.0.17's ``fedjax.algorithms.fed_avg.federated_averaging`` and its
  sampler, round after round, as ``run_fed_avg.py`` drives them (``jax.tree_map`` restored so
  FedJAX runs on current JAX);
- ``jit`` / ``parallel``: fedjax_exp's library port (``fedjax_exp.algorithms.fed_avg``) with the
  sequential or the parallel ``for_each_client`` backend, driven the same way;
- ``run``: what ``python run.py algorithm=fed_avg ...`` runs: the algorithm the run config
  builds, driven by the experiment loop (one round per loop step), timed from the loop's log
  writes (:mod:`bench.ours`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SIDES = ("fedjax", "jit", "parallel", "run")
FED_MODELS = ("logistic", "haiku_cnn")
PARAMS_SEED = 1  # run_fed_avg.py's -params_seed
SAMPLER_SEED = 2  # run_fed_avg.py's -train_sampler_seed
CLIENTS_PER_ROUND = 10
CLIENT_BATCH_SIZE = 10
CLIENT_EPOCHS = 1


@dataclass(frozen=True)
class FedSettings:
    """One model's FedAvg hyper-parameters (FedJAX's experiment flags)."""

    client_learning_rate: float
    server_optimizer: str  # "adagrad" or "adam"
    server_learning_rate: float
    server_kwargs: tuple[tuple[str, float], ...]
    recipe: str  # experiments/<recipe>.yaml: the same settings as a run config

    def server(self, lib: Any) -> Any:
        return getattr(lib.optimizers, self.server_optimizer)(
            self.server_learning_rate, **dict(self.server_kwargs)
        )


SETTINGS = {
    # fed_avg.EMNIST_LOGISTIC: client SGD 10**-0.5, server Adagrad 1.0 with eps 1e-7.
    "logistic": FedSettings(0.31622777, "adagrad", 1.0, (("eps", 1e-7),), "fedavg_emnist_logistic"),
    # fed_avg.EMNIST_CONV: client SGD 0.001, server Adam 1.0, b1 0.9, b2 0.99, eps 0.01.
    "haiku_cnn": FedSettings(
        0.001, "adam", 1.0, (("b1", 0.9), ("b2", 0.99), ("eps", 0.01)), "fedavg_emnist_conv"
    ),
}


def patch_fedjax_for_current_jax() -> None:
    """FedJAX 0.0.17 calls ``jax.tree_map``, which current JAX removed: put it back (for the
    reference only; fedjax_exp never calls it)."""
    import jax

    if not hasattr(jax, "tree_map"):
        jax.tree_map = jax.tree_util.tree_map


def library_model(lib: Any, model_name: str) -> Any:
    if model_name == "logistic":
        return lib.models.emnist.create_logistic_model()
    return lib.models.emnist.create_conv_model()


def library_round_fn(lib: Any, side: str, model: Any, settings: FedSettings) -> Any:
    """``federated_averaging`` of ``lib`` with the settings (and, for fedjax_exp, the
    ``for_each_client`` backend ``side``, which is fixed when the algorithm is built)."""
    import contextlib

    batch = lib.ShuffleRepeatBatchHParams(batch_size=CLIENT_BATCH_SIZE, num_epochs=CLIENT_EPOCHS)
    backend = contextlib.nullcontext() if side == "fedjax" else lib.for_each_client_backend(side)
    with backend:
        return lib.algorithms.fed_avg.federated_averaging(
            grad_fn=lib.model_grad(model),
            client_optimizer=lib.optimizers.sgd(settings.client_learning_rate),
            server_optimizer=settings.server(lib),
            client_batch_hparams=batch,
        )


def train_library(
    lib: Any,
    side: str,
    model_name: str,
    train_fd: Any,
    rounds: int,
    warmup: int,
    windows: int,
    seed: int,
) -> tuple[Any, Any, float, Any]:
    """``rounds`` rounds of ``lib``'s FedAvg, sampled and applied one after another."""
    import jax

    from bench.reference import drive

    settings = SETTINGS[model_name]
    model = library_model(lib, model_name)
    algorithm = library_round_fn(lib, side, model, settings)
    sampler = lib.client_samplers.UniformGetClientSampler(
        train_fd, CLIENTS_PER_ROUND, seed=SAMPLER_SEED + seed
    )
    state = algorithm.init(model.init(jax.random.PRNGKey(PARAMS_SEED + seed)))

    def one_round(state: Any, _: Any) -> Any:
        return algorithm.apply(state, sampler.sample())[0]

    state, warmup_s, rate = drive(one_round, state, itertools.repeat(None), rounds, warmup, windows)
    rate.unit = "rounds/s"
    return model, state.params, warmup_s, rate


def run_overrides(model_name: str, seed: int, log_every: int) -> list[str]:
    """The run config of the recipe for ``model_name`` (the same settings as :data:`SETTINGS`)
    at ``seed``, logging (a host sync: the timing marks) every ``log_every`` rounds."""
    return [
        f"experiment={SETTINGS[model_name].recipe}",
        f"seed={seed}",
        f"trainer.log_every={log_every}",
    ]


def train_run(
    model_name: str,
    train_fd: Any,
    rounds: int,
    warmup: int,
    windows: int,
    seed: int,
    extra: Sequence[str] = (),
    log_every: int | None = None,
) -> tuple[Any, Any, float, Any]:
    """The rounds of ``python run.py experiment=<recipe>`` through the experiment loop.

    The run's ``seed`` is the library sides' sampler seed: its rounds draw the same clients
    (the runner samples with FedJAX's ``UniformGetClientSampler`` rule from ``seed``), so
    both sides do the same work; its initial parameters come from ``split(PRNGKey(seed))``.
    """
    from bench import ours

    run_seed = SAMPLER_SEED + seed
    log_every = log_every or max(1, (rounds - warmup) // max(1, windows))
    overrides = [*run_overrides(model_name, run_seed, log_every), *extra]
    model, run = ours.train_config(overrides, train_fd, rounds, warmup, windows, run_seed)
    run.rate.unit = "rounds/s"
    return model, run.params, run.warmup_s, run.rate


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from bench import data, reference

    if args.side == "fedjax":
        patch_fedjax_for_current_jax()
        import fedjax as lib

        to_fd = data.fedjax_federated_data
    else:
        import fedjax_exp as lib

        to_fd = data.ours_federated_data
    train_fd = to_fd(data.load_tff_h5(args.train))
    test_batches = None
    if args.test:
        test_batches = reference.first_test_batches(lib, to_fd(data.load_tff_h5(args.test)), None)
    timed, accuracies = None, []
    for seed in range(args.seeds):
        if args.side == "run":
            run = train_run(
                args.model,
                train_fd,
                args.rounds,
                args.warmup,
                args.windows,
                seed,
                args.override,
                args.log_every,
            )
        else:
            run = train_library(
                lib, args.side, args.model, train_fd, args.rounds, args.warmup, args.windows, seed
            )
        timed = timed or run
        model, params = run[0], run[1]
        if test_batches is not None:
            accuracies.append(reference.accuracy(lib, model, params, test_batches))
    return {
        "side": args.side,
        "samples": list(timed[3].samples),
        "warmup_s": timed[2],
        "accuracy": accuracies[0] if accuracies else None,
        "seed_accuracies": accuracies,
        "test_examples": (
            int(sum(int(b["__mask__"].sum()) for b in test_batches)) if test_batches else None
        ),
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--model", choices=FED_MODELS, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--windows", type=int, required=True)
    p.add_argument("--train", required=True, help="TFF-layout h5 train file")
    p.add_argument("--test", help="TFF-layout h5 test file (accuracy on all of it)")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (seed 0 timed)")
    p.add_argument(
        "--log-every", type=int, help="run side: rounds between log writes (the timing marks)"
    )
    p.add_argument("--override", action="append", default=[], help="run side: a Hydra override")
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(measure(parse_args(sys.argv[1:]))))
