"""Steps per dispatch: a Python loop of jitted steps vs ``lax.scan`` over K steps.

    python scripts/bench_dispatch.py [--models logistic,mlp,stax_cnn] [--k 1,8,32]

Measures the train step alone (Adam, batch 8, random data already on the device) so the
figure isolates dispatch: K=1 dispatches one donated jitted step per step; K>1 dispatches one
jitted ``lax.scan`` over K stacked batches. Compilation is excluded (one warm-up call per K).
Prints steps/s per model and K as JSON; the runner's default ``trainer.steps_per_dispatch``
per backend is chosen from these figures.
"""

from __future__ import annotations

import argparse
import json
import time
import types

import jax
import numpy as np


def _models():
    from fedjax_exp.models import emnist

    return {
        "logistic": emnist.create_logistic_model,
        "mlp": emnist.create_mlp_model,
        "dense": emnist.create_dense_model,
        "stax_cnn": emnist.create_stax_cnn_model,
        "conv": emnist.create_conv_model,
    }


def measure(model, k: int, steps: int, batch_size: int) -> float:
    from fedjax_exp.core import optimizers
    from fedjax_exp.experiment import algorithms

    alg = algorithms.CentralizedTraining(model, optimizers.adam(1e-3), None, batch_size, 1, 1)
    rng = np.random.default_rng(0)
    block = {
        "x": jax.device_put(rng.random((k, batch_size, 28, 28, 1), dtype=np.float32)),
        "y": jax.device_put(rng.integers(0, 62, (k, batch_size)).astype(np.int32)),
    }
    key = jax.random.PRNGKey(0)
    state = alg.init(key)
    run = algorithms.multi_step(alg.update, k)
    state, _ = run(state, block, key, 1)  # Compile.
    jax.block_until_ready(state)
    dispatches = max(1, steps // k)
    t0 = time.perf_counter()
    for i in range(dispatches):
        state, scalars = run(state, block, key, 1 + i * k)
    jax.block_until_ready(state)
    return dispatches * k / (time.perf_counter() - t0)


def auto_steps_per_dispatch(model) -> int:
    """What ``trainer.steps_per_dispatch=auto`` picks for ``model`` on this backend."""
    from fedjax_exp.experiment import parallel
    from fedjax_exp.training.steps import model_uses_convolution

    sample = {"x": np.zeros((8, 28, 28, 1), np.float32), "y": np.zeros(8, np.int32)}
    conv = model_uses_convolution(model, sample)
    probe = types.SimpleNamespace(num_trials=1, uses_convolution=lambda: conv)
    # Only the resolved K: leave the process's allocator as the measurements found it.
    settings = parallel.speed_up(probe, {"reuse_host_memory": False}, num_devices=1)
    return settings.steps_per_dispatch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="logistic,mlp,stax_cnn")
    parser.add_argument("--k", default="1,8,32")
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    ks = [int(k) for k in args.k.split(",")]
    results = {"backend": jax.default_backend(), "batch_size": args.batch_size, "steps_per_s": {}}
    for name in args.models.split(","):
        model = _models()[name]()
        steps = args.steps if name in ("logistic", "mlp", "dense") else max(ks) * 2
        results["steps_per_s"][name] = {
            str(k): round(measure(model, k, steps, args.batch_size), 1) for k in ks
        }
        results.setdefault("auto_steps_per_dispatch", {})[name] = auto_steps_per_dispatch(model)
        print(name, results["steps_per_s"][name], flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
