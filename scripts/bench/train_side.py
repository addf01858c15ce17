"""One side of one training measurement, in a fresh process.

    python -m bench.train_side --side fedjax|ours --model logistic --batch-size 8 \
        --steps 2000 --warmup 20 --windows 5 --train TRAIN.h5 [--test TEST.h5]

Prints one JSON line: the timed windows' rates, the warm-up time and the test accuracy.

Why a process per side: each library then runs the way its users run it. fedjax_exp's runner
sets process-wide options (``trainer.reuse_host_memory`` raises glibc's malloc thresholds,
so that XLA:CPU's large per-step temporaries are not mapped afresh on every step); run in the
benchmark's own process, that setting would also speed up FedJAX's loop, which its users do
not get. Both sides load the same h5 files into the same columns (``bench.data``).
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
    train_cols = data.load_tff_h5(args.train)
    if args.side == "fedjax":
        import fedjax

        lib = fedjax
        to_fd = data.fedjax_federated_data
        model = models.reference_model(fedjax, args.model)
        run = reference.train(
            fedjax,
            model,
            to_fd(train_cols),
            args.batch_size,
            args.steps,
            args.warmup,
            args.windows,
            needs_rng=args.model in models.NEEDS_RNG,
        )
    else:
        lib = fedjax_exp
        to_fd = data.ours_federated_data
        model, run = ours.train(
            args.model, to_fd(train_cols), args.batch_size, args.steps, args.warmup, args.windows
        )
    accuracy = None
    if args.test:
        batches = reference.first_test_batches(lib, to_fd(data.load_tff_h5(args.test)))
        accuracy = reference.accuracy(lib, model, run.params, batches)
    return {
        "side": args.side,
        "samples": list(run.rate.samples),
        "warmup_s": run.warmup_s,
        "accuracy": accuracy,
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
    return p.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(measure(parse_args(sys.argv[1:]))))
