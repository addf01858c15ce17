"""Vectorized learning-rate sweep vs the same trials run one after another, in one process.

    python scripts/bench_vectorized.py [--steps 500] [--batch-size 8] [--model logistic]

Both sides train the same trials (one per learning rate, Adam, the embedded FEMNIST sample)
for the same number of steps and include everything a run does per step: drawing shuffled
batches, dispatching the jitted (donated) step and reading the loss back every 50 steps.

- separate: for each learning rate, the runner's loop (``loop.train``) over its own
  ``CentralizedTraining`` with the engine's speed settings (``parallel.speed_up``: device
  data, steps per dispatch): a fresh compiled step per run, as in a sweep of separate runs;
- vectorized: one ``VectorizedTraining`` program over all learning rates, with the same
  speed settings (device data, steps per dispatch) as ``run.py trainer.vectorize=...``.

Process start-up, imports and data loading are excluded from both. Reported: wall time
including each side's compilation, and steady-state time (compilation excluded: the first
``WARMUP_STEPS`` steps of each run, which compile its programs, are timed apart). Prints one
JSON object; the ratio is separate/vectorized.

``--cli wandb|local`` also times the two commands end to end, each in a fresh process:
``python run.py -m experiment=seed_logistic optimizer.learning_rate=<8 values>`` (one Hydra
job per learning rate) against ``python run.py experiment=seed_logistic
trainer.vectorize.learning_rates=[<8 values>]``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

# The first logging interval of every run is its warm-up: it compiles each program the run
# uses (K steps per dispatch, and the shorter dispatch that ends at the logging step).
WARMUP_STEPS = 50
LEARNING_RATES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]


def _models():
    from fedjax_exp.models import emnist

    return {
        "logistic": emnist.create_logistic_model,
        "mlp": emnist.create_dense_model,
    }


class _NullWriter:
    def write_scalars(self, step, scalars):
        pass

    def write_histogram(self, step, name, values):
        pass

    def write_summary(self, summary):
        pass

    def close(self, exit_code):
        pass


def _block(tree):
    jax.tree_util.tree_map(lambda x: x.block_until_ready(), tree)


def time_loop(alg, init_rng, train_rng, steps) -> tuple[float, float]:
    """(wall time, wall time after the first ``WARMUP_STEPS``) of ``loop.train`` over ``alg``
    with the runner's speed settings (``parallel.speed_up``: device data, steps/dispatch)."""
    import dataclasses

    from fedjax_exp.experiment import loop, parallel

    speed = parallel.speed_up(alg, {})
    state = alg.init(init_rng)
    _block(state)
    settings = loop.LoopSettings(
        steps=WARMUP_STEPS,
        log_every=50,
        eval_every=0,
        checkpoint_every=0,
        progress_bar=False,
        steps_per_dispatch=speed.steps_per_dispatch,
    )
    kwargs = dict(
        seed=0,
        rng=train_rng,
        writers=[_NullWriter()] * alg.num_trials,
        evaluator=None,
        checkpointer=None,
        clock=loop.Clock(),
    )
    t0 = time.perf_counter()
    state, _, _ = loop.train(alg, state, start_step=0, settings=settings, **kwargs)
    _block(state)
    t1 = time.perf_counter()
    settings = dataclasses.replace(settings, steps=steps)
    state, _, _ = loop.train(alg, state, start_step=WARMUP_STEPS, settings=settings, **kwargs)
    _block(state)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def run_separate(model, train, lrs, steps, batch_size):
    from fedjax_exp.core import optimizers
    from fedjax_exp.experiment import algorithms

    total = steady = 0.0
    for lr in lrs:
        alg = algorithms.CentralizedTraining(
            model, optimizers.adam(lr), train, batch_size, 16, 1024
        )
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
        wall, after_warmup = time_loop(alg, init_rng, train_rng, steps)
        total, steady = total + wall, steady + after_warmup
    return total, steady


def run_vectorized(model, train, lrs, steps, batch_size):
    from fedjax_exp.core import optimizers
    from fedjax_exp.experiment import algorithms, vectorized

    trials = vectorized.expand_trials(lrs, None, None, 0)
    training = vectorized.VectorizedTraining(
        lambda opt: algorithms.CentralizedTraining(model, opt, train, batch_size, 16, 1024),
        optimizers.adam,
        trials,
    )
    return time_loop(training, *vectorized.trial_keys(trials), steps)


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_cli(lrs, steps: int, logger: str) -> dict[str, float]:
    """Wall time of the two commands a researcher types, each in a fresh process: a Hydra
    multirun of one job per learning rate, and one vectorized run of all of them (the
    seed_logistic recipe; start-up, data loading, compilation, evaluation, checkpoints and
    logging included)."""
    values = ",".join(f"{lr:g}" for lr in lrs)
    common = [
        "experiment=seed_logistic",
        f"trainer.steps={steps}",
        "trainer.progress_bar=false",
        f"logger={logger}",
    ]
    times = {}
    with tempfile.TemporaryDirectory(prefix="bench_vectorized_") as tmp:
        commands = {
            "multirun": [f"optimizer.learning_rate={values}", f"hydra.sweep.dir={tmp}/m"],
            "vectorized": [
                f"trainer.vectorize.learning_rates=[{values}]",
                f"hydra.run.dir={tmp}/v",
            ],
        }
        for name, extra in commands.items():
            # Each side starts from an empty compilation cache (a first sweep; the multirun's
            # later jobs do load what its first job compiled).
            cache = f"{tmp}/xla-{name}"
            env = dict(os.environ, WANDB_SILENT="true", FEDJAX_EXP_COMPILATION_CACHE=cache)
            start = time.perf_counter()
            subprocess.run(
                # Hydra's -m must precede the overrides.
                [sys.executable, str(REPO_ROOT / "run.py")]
                + (["-m"] if name == "multirun" else [])
                + [*common, *extra],
                cwd=REPO_ROOT,
                env=env,
                check=True,
                capture_output=True,
            )
            times[name] = time.perf_counter() - start
    return {
        "logger": logger,
        "multirun_s": round(times["multirun"], 2),
        "vectorized_s": round(times["vectorized"], 2),
        "ratio": round(times["multirun"] / times["vectorized"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", choices=sorted(_models()), default="logistic")
    parser.add_argument("--trials", type=int, default=8, help="number of learning rates (<= 8)")
    parser.add_argument(
        "--cli",
        choices=["wandb", "local"],
        help="also time `python run.py -m ...` against `run.py trainer.vectorize...` "
        "with this logger (seed_logistic recipe, --steps steps)",
    )
    args = parser.parse_args()
    from fedjax_exp.datasets import sample

    train, _ = sample.load_data()
    model = _models()[args.model]()
    lrs = LEARNING_RATES[: args.trials]
    sep_total, sep_steady = run_separate(model, train, lrs, args.steps, args.batch_size)
    vec_total, vec_steady = run_vectorized(model, train, lrs, args.steps, args.batch_size)
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "trials": len(lrs),
        "steps_per_trial": args.steps,
        "separate_s": round(sep_total, 3),
        "vectorized_s": round(vec_total, 3),
        "ratio_with_compile": round(sep_total / vec_total, 2),
        "separate_steady_s": round(sep_steady, 3),
        "vectorized_steady_s": round(vec_steady, 3),
        "ratio_steady": round(sep_steady / vec_steady, 2),
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "numpy": np.__version__,
    }
    if args.cli:
        result["cli"] = run_cli(lrs, args.steps, args.cli)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
