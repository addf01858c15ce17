"""One side of one training measurement, in a fresh process.

    python -m bench.train_side --side fedjax|ours --model logistic --batch-size 8 \
        --steps 2000 --warmup 20 --windows 5 --train TRAIN.h5 [--test TEST.h5]

Prints one JSON line: the timed windows' rates, the warm-up time and the test accuracy of
seed 0, and with ``--seeds N`` the test accuracies of seeds 0..N-1 (how much training noise
there is, to judge whether the two libraries' accuracies differ by more).

Why a process per side: each library then runs the way its users run it, and neither
inherits the other's process state (compiled code, allocator, JAX settings). Both sides load
the same h5 files into the same columns (``bench.data``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

SIDES = ("fedjax", "ours")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import fedjax_exp
    from bench import data, models, ours, reference

    lib: Any
    steps, warmup, windows = args.steps, args.warmup, args.windows
    if args.side == "fedjax":
        import fedjax

        lib, to_fd = fedjax, data.fedjax_federated_data
        model = models.reference_model(fedjax, args.model)
        needs_rng = args.model in models.NEEDS_RNG

        def train(fd: Any, seed: int) -> tuple[Any, Any]:
            run = reference.train(
                fedjax, model, fd, args.batch_size, steps, warmup, windows, needs_rng, seed
            )
            return model, run

    else:
        lib, to_fd = fedjax_exp, data.ours_federated_data

        def train(fd: Any, seed: int) -> tuple[Any, Any]:
            # The model comes from the run config, as run.py builds it.
            return ours.train(args.model, fd, args.batch_size, steps, warmup, windows, seed=seed)

    train_fd = to_fd(data.load_tff_h5(args.train))
    test_batches = None
    if args.test:
        test_batches = reference.first_test_batches(lib, to_fd(data.load_tff_h5(args.test)))
    timed, accuracies = None, []
    # Seed 0 is the timed run; the others only measure how much the accuracy varies by seed.
    for seed in range(args.seeds):
        model, run = train(train_fd, seed)
        timed = timed or run
        if test_batches is not None:
            accuracies.append(reference.accuracy(lib, model, run.params, test_batches))
    return {
        "side": args.side,
        "samples": list(timed.rate.samples),
        "warmup_s": timed.warmup_s,
        "accuracy": accuracies[0] if accuracies else None,
        "seed_accuracies": accuracies,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=SIDES, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--windows", type=int, required=True)
    p.add_argument("--train", required=True, help="TFF-layout h5 train file")
    p.add_argument("--test", help="TFF-layout h5 test file (accuracy on its first batches)")
    p.add_argument(
        "--seeds", type=int, default=1, help="train seeds 0..N-1 (seed 0 timed) for accuracy"
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(measure(parse_args(sys.argv[1:]))))
