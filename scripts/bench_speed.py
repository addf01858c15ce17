"""Each speed mechanism of the runner switched off (or forced) in turn: is it worth keeping?

    python scripts/bench_speed.py [--models logistic,stax_cnn,haiku_cnn] [--steps 400]
        [--e2e]   # also: the compilation cache, `python run.py` twice, cache on vs off

Every row is the training loop of ``run.py`` (the objects it builds, ``loop.train``, the
embedded FEMNIST sample, batch 8, Adam) in a fresh process, since host memory settings are
process-wide. ``auto`` is the runner's default; each variant overrides one trainer option.
Reported: median steps/s over timed windows after a warm-up (compilation excluded) and the
ratio auto / variant (> 1: the mechanism wins). Figures go to docs/performance-notes.md.
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
    "device_data=false": ["trainer.device_data=false"],
    "reuse_host_memory=false": ["trainer.reuse_host_memory=false"],
}


def child(model: str, overrides: list[str], steps: int) -> None:
    from bench import ours

    from fedjax_exp.datasets import sample

    train, _ = sample.load_data()
    _, run = ours.train(model, train, 8, steps, warmup=steps // 4, windows=3, overrides=overrides)
    print(json.dumps({"steps_per_s": run.rate.median, "spread": run.rate.spread}))


def measure(model: str, overrides: list[str], steps: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))  # This checkout's fedjax_exp.
    command = [sys.executable, __file__, "--child", model, str(steps), *overrides]
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
        child(sys.argv[2], sys.argv[4:], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="logistic,stax_cnn,haiku_cnn")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--e2e", action="store_true")
    args = parser.parse_args()
    rows = []
    for model in args.models.split(","):
        steps = args.steps if model in ("logistic", "mlp") else max(40, args.steps // 10)
        auto = None
        for name in args.variants.split(","):
            result = measure(model, VARIANTS[name], steps)
            auto = result["steps_per_s"] if name == "auto" else auto
            ratio = auto / result["steps_per_s"] if auto else float("nan")
            rows.append({"model": model, "variant": name, **result, "auto_over_variant": ratio})
            print(
                f"{model:10s} {name:26s} {result['steps_per_s']:9.1f} steps/s "
                f"(spread {result['spread']:.0%})  auto/variant {ratio:.2f}x",
                flush=True,
            )
    if args.e2e:
        with_cache, without = e2e(True), e2e(False)
        rows.append({"e2e_cache_s": with_cache, "e2e_no_cache_s": without})
        print(f"run.py seed_logistic, 20 steps: {with_cache:.2f} s warm cache, {without:.2f} s off")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
