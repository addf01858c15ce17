"""The arithmetic ceiling of a FedAvg logistic round on this machine.

    python scripts/bench_fed_ceiling.py [--clients 10] [--steps 15] [--batch-size 10]

Times the bare work of one round of ``experiment=fedavg_emnist_logistic``: every client's
local SGD steps on the EMNIST logistic model (784 -> 62), the clients vmapped side by side and
the steps scanned, with random inputs already on the device and nothing else: no batch
gather, no padding masks, no aggregation, no server optimizer. Many rounds run in one program,
so dispatch costs nothing either. No real round can be faster, which bounds the rounds/s any
FedAvg engine reaches here (FEMNIST clients average ~14 steps of batch 10 a round). Prints
rounds/s and the useful GFLOP/s (XLA's cost analysis of one local step) as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES, FEATURES, LEARNING_RATE = 62, 784, 0.316


def _loss(weights: jax.Array, bias: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    log_probs = jax.nn.log_softmax(x @ weights + bias)
    return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def _local_step(params: tuple[jax.Array, jax.Array], batch: tuple[jax.Array, jax.Array]):
    grads = jax.grad(_loss, argnums=(0, 1))(*params, *batch)
    return tuple(p - LEARNING_RATE * g for p, g in zip(params, grads, strict=True))


def measure(clients: int, steps: int, batch_size: int, rounds: int, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((steps, clients, batch_size, FEATURES)), jnp.float32)
    y = jnp.asarray(rng.integers(0, NUM_CLASSES, (steps, clients, batch_size)), jnp.int32)
    params = (jnp.zeros((clients, FEATURES, NUM_CLASSES)), jnp.zeros((clients, NUM_CLASSES)))

    def one_round(params: tuple[jax.Array, jax.Array], _: None) -> tuple[tuple, None]:
        def step(params: tuple, batch: tuple) -> tuple[tuple, None]:
            return jax.vmap(_local_step)(params, batch), None

        return jax.lax.scan(step, params, (x, y))[0], None

    run = jax.jit(lambda p: jax.lax.scan(one_round, p, None, length=rounds)[0])
    jax.block_until_ready(run(params))  # Compilation.
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run(params))
        times.append((time.perf_counter() - start) / rounds)
    one = (params[0][0], params[1][0])
    batch = (x[0, 0], y[0, 0])
    cost = jax.jit(_local_step).lower(one, batch).compile().cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    best = min(times)
    return {
        "clients": clients,
        "steps_per_client": steps,
        "batch_size": batch_size,
        "rounds_per_s": 1 / best,
        "mflop_per_local_step": flops / 1e6,
        "useful_gflop_per_s": clients * steps * flops / best / 1e9,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--steps", type=int, default=15, help="local steps per client")
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--rounds", type=int, default=50, help="rounds per timed program")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(json.dumps(measure(args.clients, args.steps, args.batch_size, args.rounds, args.repeats)))


if __name__ == "__main__":
    main()
