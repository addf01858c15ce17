"""Each speed mechanism of the runner switched off (or forced) in turn: is it worth keeping?

    python scripts/bench_speed.py [--models logistic,stax_cnn,haiku_cnn] [--steps 400]
        [--e2e]   # also: the compilation cache, `python run.py` twice, cache on vs off
    python scripts/bench_speed.py --federated [--models logistic,haiku_cnn]
              # FedAvg rounds: algorithm.engine (scan / stepwise) and algorithm.lanes

Every row is the training loop of ``run.py`` (the objects it builds, ``loop.train``, the
embedded FEMNIST sample, batch 8, Adam). ``auto`` is the runner's default; each variant
overrides one trainer option. The variants of one model are timed in alternation in one
process (windows of ``--steps`` steps, ``--rounds`` rounds, compilation excluded), a fresh
process per model. Reported: median steps/s and auto / variant (> 1: the mechanism wins).
With ``--federated`` a step is a FedAvg round (``algorithm=fed_avg``: 10 clients of batch 10,
one local epoch) and the variants are the cohort engine's settings.
Figures: docs/performance-notes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

SCRIPTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = SCRIPTS_DIR.parent
VARIANTS = {
    "auto": [],
    "steps_per_dispatch=1": ["trainer.steps_per_dispatch=1"],
    "steps_per_dispatch=8": ["trainer.steps_per_dispatch=8"],
}
FEDERATED_VARIANTS = {
    "auto": ["algorithm=fed_avg"],
    "engine=scan": ["algorithm=fed_avg", "algorithm.engine=scan"],
    "engine=stepwise": ["algorithm=fed_avg", "algorithm.engine=stepwise"],
    "lanes=1": ["algorithm=fed_avg", "algorithm.lanes=1"],
    "lanes=2": ["algorithm=fed_avg", "algorithm.lanes=2"],
    "lanes=5": ["algorithm=fed_avg", "algorithm.lanes=5"],
}


def child(model_name: str, steps: int, rounds: int, federated: bool) -> None:
    """Steps/s of each variant, timed in alternation (``rounds`` windows of ``steps`` each)
    so that the machine's drift hits every variant alike; prints medians as JSON."""
    import statistics

    import jax
    from bench import ours
    from omegaconf import OmegaConf

    from fedjax_exp.datasets import sample
    from fedjax_exp.experiment import builders, loop, parallel

    train, _ = sample.load_data()
    runs = {}
    for name, overrides in (FEDERATED_VARIANTS if federated else VARIANTS).items():
        cfg = ours.compose(model_name, 8, overrides)
        alg = builders.build_algorithm(
            cfg, builders.build_model(cfg), builders.build_optimizer(cfg), train
        )
        speed = parallel.speed_up(alg, OmegaConf.to_container(cfg.trainer, resolve=True))
        init_rng, rng = jax.random.split(jax.random.PRNGKey(0))
        runs[name] = [alg, alg.init(init_rng), rng, speed.steps_per_dispatch, 0]
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(rounds + 1):  # Round 0 compiles (and is not counted).
        for name, run in runs.items():
            alg, state, rng, k, done = run
            settings = loop.LoopSettings(done + steps, steps, 0, 0, False, k)
            start = time.perf_counter()
            state, done, _ = loop.train(
                alg,
                state,
                start_step=done,
                seed=0,
                rng=rng,
                settings=settings,
                writers=[ours._TimingWriter()],
                evaluator=None,
                checkpointer=None,
                clock=loop.Clock(),
            )
            jax.block_until_ready(state)
            if round_:
                rates[name].append(steps / (time.perf_counter() - start))
            run[1], run[4] = state, done
    print(json.dumps({name: statistics.median(r) for name, r in rates.items()}))


def measure(model: str, steps: int, rounds: int, federated: bool) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))  # This checkout's fedjax_exp.
    command = [sys.executable, __file__, "--child", model, str(steps), str(rounds)]
    command += ["--federated"] if federated else []
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def e2e(cache: bool) -> float:
    """Wall time of a second ``run.py experiment=seed_logistic`` (the first fills the cache)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, FEDJAX_EXP_COMPILATION_CACHE=f"{tmp}/xla")
        args = ["experiment=seed_logistic", "trainer.steps=20", "logger=local"]
        args += ["trainer.progress_bar=false"]
        args += [] if cache else ["trainer.compilation_cache=null"]
        times = []
        for i in range(2):
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "run.py", *args, f"hydra.run.dir={tmp}/run{i}"],
                cwd=REPO_ROOT,
                env=env,
                check=True,
                capture_output=True,
            )
            times.append(time.perf_counter() - start)
        return times[1]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), "--federated" in sys.argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="logistic,stax_cnn,haiku_cnn")
    parser.add_argument("--steps", type=int, default=200, help="per window (CNNs: a tenth)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--e2e", action="store_true")
    parser.add_argument("--federated", action="store_true", help="FedAvg rounds (see above)")
    args = parser.parse_args()
    rows = []
    unit = "rounds/s" if args.federated else "steps/s"
    for model in args.models.split(","):
        steps = args.steps if model in ("logistic", "mlp") else max(8, args.steps // 10)
        if args.federated:  # A round is ~140 local steps.
            steps = max(2, steps // 10)
        rates = measure(model, steps, args.rounds, args.federated)
        for name, rate in rates.items():
            ratio = rates["auto"] / rate
            rows.append({"model": model, "variant": name, unit.replace("/", "_per_"): rate})
            rows[-1]["ratio"] = ratio
            print(f"{model:10s} {name:26s} {rate:9.2f} {unit}  auto/variant {ratio:.2f}x")
    if args.e2e:
        with_cache, without = e2e(True), e2e(False)
        rows.append({"e2e_cache_s": with_cache, "e2e_no_cache_s": without})
        print(f"run.py seed_logistic, 20 steps: {with_cache:.2f} s warm cache, {without:.2f} s off")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
