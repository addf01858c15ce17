"""FedJAX's side: the seed chapter's centralized training loop, timed.

The loop is the one FedJAX's model tutorial teaches: a ``jax.jit``-ed step that takes the
gradient of the mean per-example loss and applies ``optimizer.apply``, fed one batch at a time
from ``shuffle_repeat_batch_federated_data`` (Adam 1e-3, client buffer 16, example buffer
1024, seed 0). Nothing is donated and nothing is prefetched: that is the baseline.

Run as a module (``python -m bench.reference ...`` with ``scripts/`` on the path) it does the
end-to-end work of ``python run.py experiment=seed_logistic`` with FedJAX, from process
start-up to the final evaluation, and prints one JSON line with its results.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench.timing import Rate, sync, window_sizes

# The seed chapter's hyper-parameters.
LEARNING_RATE = 1e-3
CLIENT_BUFFER_SIZE = 16
EXAMPLE_BUFFER_SIZE = 1024
SEED = 0
EVAL_BATCH_SIZE = 128
EVAL_BATCHES = 16


@dataclass
class TrainRun:
    """What one timed training run reports."""

    params: Any
    steps: int
    warmup_s: float  # wall time of the first `warmup` steps, compilation included
    rate: Rate  # steps/s over the windows after warm-up, data pipeline included


def drive(
    step: Callable[[Any, Any], Any],
    state: Any,
    batches: Iterator[Any],
    steps: int,
    warmup: int,
    windows: int,
) -> tuple[Any, float, Rate]:
    """Runs ``state = step(state, batch)`` for ``steps`` batches and times it.

    The first ``warmup`` steps (compilation included) are timed together as ``warmup_s``;
    the rest are split into ``windows`` timed windows, each ending with a device sync, and
    the rate is the median window rate. Every step counts towards the final state.
    """
    if steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    warmup = max(1, min(warmup, steps))
    start = time.perf_counter()
    for batch in itertools.islice(batches, warmup):
        state = step(state, batch)
    state = sync(state)
    warmup_s = time.perf_counter() - start
    rate = Rate(unit="steps/s")
    for size in window_sizes(steps - warmup, windows):
        start = time.perf_counter()
        for batch in itertools.islice(batches, size):
            state = step(state, batch)
        state = sync(state)
        rate.samples.append(size / (time.perf_counter() - start))
    return state, warmup_s, rate


def tutorial_train_step(lib: Any, model: Any, optimizer: Any, needs_rng: bool) -> Callable:
    """The seed chapter's jitted step ``(example, opt_state, params) -> (opt_state, params)``.

    Models with dropout need a key: then the step also takes and returns one (split inside
    the jitted function, so no extra dispatch per step).
    """
    import jax
    import jax.numpy as jnp

    per_example_loss = lib.model_per_example_loss(model)

    if not needs_rng:

        def train_objective(params: Any, example: Any) -> Any:
            return jnp.mean(per_example_loss(params, example, None))

        @jax.jit
        def train_step(example: Any, opt_state: Any, params: Any) -> Any:
            grads = jax.grad(train_objective)(params, example)
            return optimizer.apply(grads, opt_state, params)

        return train_step

    def train_objective_rng(params: Any, example: Any, rng: Any) -> Any:
        return jnp.mean(per_example_loss(params, example, rng))

    @jax.jit
    def train_step_rng(example: Any, opt_state: Any, params: Any, rng: Any) -> Any:
        rng, use = jax.random.split(rng)
        grads = jax.grad(train_objective_rng)(params, example, use)
        return (*optimizer.apply(grads, opt_state, params), rng)

    return train_step_rng


def train_batches(lib: Any, fd: Any, batch_size: int, seed: int = SEED) -> Iterator[Any]:
    return iter(
        lib.shuffle_repeat_batch_federated_data(
            fd,
            batch_size=batch_size,
            client_buffer_size=CLIENT_BUFFER_SIZE,
            example_buffer_size=EXAMPLE_BUFFER_SIZE,
            seed=seed,
        )
    )


def train(
    lib: Any,
    model: Any,
    fd: Any,
    batch_size: int,
    steps: int,
    warmup: int,
    windows: int,
    needs_rng: bool,
    seed: int = SEED,
) -> TrainRun:
    """Trains ``model`` from ``init(PRNGKey(seed))`` for ``steps`` steps with the tutorial loop."""
    import jax

    optimizer = lib.optimizers.adam(LEARNING_RATE)
    params = model.init(jax.random.PRNGKey(seed))
    opt_state = optimizer.init(params)
    train_step = tutorial_train_step(lib, model, optimizer, needs_rng)
    state: tuple = (opt_state, params)
    if needs_rng:
        state += (jax.random.PRNGKey(seed + 1),)
    batches = train_batches(lib, fd, batch_size, seed)
    step = lambda s, b: train_step(b, *s)
    state, warmup_s, rate = drive(step, state, batches, steps, warmup, windows)
    return TrainRun(params=state[1], steps=steps, warmup_s=warmup_s, rate=rate)


def first_test_batches(lib: Any, fd: Any, num_batches: int | None = EVAL_BATCHES) -> list[Any]:
    """The seed chapter's evaluation set: the first padded test batches of 128."""
    stream = lib.padded_batch_federated_data(fd, batch_size=EVAL_BATCH_SIZE)
    return list(itertools.islice(stream, num_batches))


def accuracy(lib: Any, model: Any, params: Any, batches: list[Any]) -> float:
    return float(lib.evaluate_model(model, params, batches)["accuracy"])


# --------------------------------------------------------------------------------------------
# End-to-end: the seed logistic recipe's work, done with FedJAX in a fresh process.
# --------------------------------------------------------------------------------------------


def end_to_end(argv: list[str] | None = None) -> dict[str, Any]:
    """Loads the h5 pair, trains with the tutorial loop, evaluates like the recipe does:
    every ``--eval-every`` steps on the first 16 padded train and test batches of 128, and a
    full test pass at the end."""
    parser = argparse.ArgumentParser(description="FedJAX's loop, end to end")
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--model", default="logistic")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=1000)
    args = parser.parse_args(argv)

    import fedjax
    import jax

    from bench import data, models

    train_fd = data.fedjax_federated_data(data.load_tff_h5(args.train))
    test_fd = data.fedjax_federated_data(data.load_tff_h5(args.test))
    model = models.reference_model(fedjax, args.model)
    optimizer = fedjax.optimizers.adam(LEARNING_RATE)
    params = model.init(jax.random.PRNGKey(SEED))
    opt_state = optimizer.init(params)
    needs_rng = args.model in models.NEEDS_RNG
    train_step = tutorial_train_step(fedjax, model, optimizer, needs_rng)
    rng = jax.random.PRNGKey(SEED + 1)
    eval_sets = {
        "train": first_test_batches(fedjax, train_fd),
        "test": first_test_batches(fedjax, test_fd),
    }
    history = []
    batches = train_batches(fedjax, train_fd, args.batch_size)
    for step, example in enumerate(itertools.islice(batches, args.steps), start=1):
        if needs_rng:
            opt_state, params, rng = train_step(example, opt_state, params, rng)
        else:
            opt_state, params = train_step(example, opt_state, params)
        if args.eval_every and step % args.eval_every == 0:
            results = {
                split: {k: float(v) for k, v in fedjax.evaluate_model(model, params, b).items()}
                for split, b in eval_sets.items()
            }
            history.append({"step": step, **results})
    final = fedjax.evaluate_model(model, params, first_test_batches(fedjax, test_fd, None))
    return {
        "steps": args.steps,
        "history": history,
        "final_test": {k: float(v) for k, v in final.items()},
    }


if __name__ == "__main__":
    print(json.dumps(end_to_end(sys.argv[1:])))
