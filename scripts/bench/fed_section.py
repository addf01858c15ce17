"""The ``fed`` section: FedAvg rounds/s, FedJAX 0.0.17 against fedjax_exp, and the accuracy
both reach after the same rounds.

Each side trains in a fresh process of its own (:mod:`bench.fed_side`) on the same h5 files,
with FedJAX's ``experiments/fed_avg`` EMNIST settings. FedJAX is measured once per model;
every fedjax_exp side (the config run path ``run``, and for reference the library port with
the ``jit`` and ``parallel`` ``for_each_client`` backends) gets a row against it. Goals apply
to the run path, which is what ``python run.py algorithm=fed_avg`` trains with.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from bench import fed_side
from bench.sections import (
    REPO_ROOT,
    SCRIPTS_DIR,
    Context,
    _child_env,
    _median,
    attempt,
    make_row,
    side_by_side_fields,
    within_noise,
)
from bench.timing import Rate

# Goals from the issue, for the config run path (2-core CPU).
FED_GOALS = {"logistic": 20.0, "haiku_cnn": 1.5}
# Rounds per run: long enough for steady windows and a meaningful accuracy; FedJAX trains the
# Haiku CNN at about half a round per second on 2 cores.
DEFAULT_ROUNDS = {"logistic": 300, "haiku_cnn": 24}
# Untimed rounds at the start: FedJAX compiles its client step once per distinct last-batch
# size (no drop_remainder), so its first rounds are mostly compilation.
DEFAULT_WARMUP = {"logistic": 30, "haiku_cnn": 4}
# Seeds per side for the accuracy comparison (seed 0 is the timed run).
DEFAULT_SEEDS = {"logistic": 3, "haiku_cnn": 2}
# Rounds per dispatch of run.py's loop (trainer.steps_per_dispatch=auto on CPU: 8, but 1 for
# convolutional models). The warm-up and every timed window are whole multiples of it, so the
# timed rounds run only programs the warm-up compiled.
DISPATCH = {"logistic": 8, "haiku_cnn": 1}


def aligned_schedule(rounds: int, warmup: int, windows: int, dispatch: int) -> tuple[int, int, int]:
    """``(rounds, warmup, rounds per window)`` with the warm-up and windows rounded up to
    whole dispatches (``rounds`` grows to fit)."""
    up = lambda n: -(-max(1, n) // dispatch) * dispatch  # noqa: E731
    warmup = up(warmup)
    per_window = up((rounds - warmup) // max(1, windows))
    return warmup + windows * per_window, warmup, per_window


SIDE_LABELS = {
    "run": "run.py (experiment loop)",
    "jit": "library, jit backend",
    "parallel": "library, parallel backend",
}


def fed_in_process(side: str, args: dict[str, Any]) -> dict[str, Any]:
    """One side's measurement in a fresh process (``bench.fed_side``)."""
    cmd = [sys.executable, "-m", "bench.fed_side", "--side", side]
    for key, value in args.items():
        if isinstance(value, list | tuple):
            for item in value:
                cmd += [f"--{key}", str(item)]
        elif value is not None:
            cmd += [f"--{key}", str(value)]
    proc = subprocess.run(
        cmd, env=_child_env(SCRIPTS_DIR), cwd=REPO_ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{side} federated process failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _note(a: Sequence[float], b: Sequence[float], n: int) -> str:
    if not a or not b:
        return ""
    ok = "within noise" if within_noise(a, b, n) else "NOT within noise"
    seeds = f"{len(a)}/{len(b)} seeds" if len(a) > 1 or len(b) > 1 else "1 seed"
    return (
        f"test accuracy {statistics.fmean(a):.3f} vs {statistics.fmean(b):.3f} "
        f"({seeds}, full test set; {ok})"
    )


def section_fed(ctx: Context) -> list[dict[str, Any]]:
    s = ctx.settings
    if ctx.h5_pair is None:
        errors = {"both": "no h5 train/test pair to train on"}
        return [make_row("fed", "-", "FedAvg", "rounds/s", None, None, errors=errors)]
    train_h5, test_h5 = ctx.h5_pair
    name = pathlib.Path(train_h5).stem
    rows = []
    for model_name in s.fed_models:
        rounds = s.fed_rounds or DEFAULT_ROUNDS[model_name]
        warmup = min(s.fed_warmup or DEFAULT_WARMUP[model_name], max(1, rounds // 4))
        rounds, warmup, per_window = aligned_schedule(
            rounds, warmup, s.windows, DISPATCH[model_name]
        )
        seeds = s.fed_seeds or DEFAULT_SEEDS[model_name]
        base = {
            "model": model_name,
            "rounds": rounds,
            "warmup": warmup,
            "windows": s.windows,
            "log-every": per_window,
            "train": train_h5,
            "test": test_h5,
            "seeds": seeds,
        }
        sides = [side for side in s.fed_sides if side in SIDE_LABELS]
        if model_name == "haiku_cnn" and not s.fed_parallel_cnn:
            # The parallel backend runs convolutions ~10x slower than the jit backend on CPU
            # (see fedjax_exp.core.parallel_for_each_client): minutes per round.
            sides = [side for side in sides if side != "parallel"]
        ref_errors: dict[str, str] = {}
        ref = attempt(ctx, ref_errors, "fedjax", lambda b=base: fed_in_process("fedjax", b))
        ref_rate = Rate(ref["samples"], "rounds/s") if ref else None
        for side in sides:
            errors = dict(ref_errors)
            args = dict(base)
            if side != "run":
                args["seeds"] = 1  # Reference rows: speed, and one accuracy.
            else:
                args["override"] = list(s.fed_run_overrides)
            mine = attempt(ctx, errors, side, lambda sd=side, a=args: fed_in_process(sd, a))
            seeds_ref = ref["seed_accuracies"] if ref else []
            seeds_ours = mine["seed_accuracies"] if mine else []
            n = (ref or mine or {}).get("test_examples") or 1
            settings = fed_side.SETTINGS[model_name]
            rows.append(
                make_row(
                    "fed",
                    name,
                    f"FedAvg {model_name}, {SIDE_LABELS[side]}, {rounds} rounds",
                    "rounds/s",
                    _median(ref_rate),
                    _median(Rate(mine["samples"], "rounds/s")) if mine else None,
                    goal=FED_GOALS.get(model_name) if side == "run" else None,
                    note=_note(seeds_ref, seeds_ours, n),
                    errors=errors,
                    model=model_name,
                    side=side,
                    rounds=rounds,
                    warmup_rounds=warmup,
                    clients_per_round=fed_side.CLIENTS_PER_ROUND,
                    client_batch_size=fed_side.CLIENT_BATCH_SIZE,
                    settings={
                        "client_sgd_learning_rate": settings.client_learning_rate,
                        "server_optimizer": settings.server_optimizer,
                        "server_learning_rate": settings.server_learning_rate,
                        **dict(settings.server_kwargs),
                    },
                    **side_by_side_fields(ref, mine, seeds_ref, seeds_ours, n),
                )
            )
    return rows
