"""for_each_client backends: FedAvg client training rounds per second, sequential vs parallel.

    python scripts/bench_for_each_client.py [--models logistic,dense] [--rounds 10]

Each round trains 10 clients (EMNIST-shaped 28x28 examples, 62 classes, client sizes 20-279
so ~2-28 local steps of batch 10, one epoch, SGD) from shared parameters and averages nothing:
the figure isolates ``for_each_client``. Clients differ every round, so the parallel backend's
step-count buckets are part of the measurement; compilation is excluded by a warm-up pass over
the same rounds. Prints rounds/s per model and backend, and the parallel backend's host-side
layout time per round, as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core import for_each_client as fec
from fedjax_exp.core import optimizers, parallel_for_each_client
from fedjax_exp.core.models import model_grad
from fedjax_exp.models import emnist


def _rounds(num_rounds: int, clients_per_round: int, batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rounds = []
    for r in range(num_rounds):
        clients = []
        for c in range(clients_per_round):
            n = int(rng.integers(20, 280)) // batch_size * batch_size
            x = rng.random((n, 28, 28, 1), dtype=np.float32)
            y = rng.integers(0, 62, n).astype(np.int32)
            batches = [
                {"x": x[i : i + batch_size], "y": y[i : i + batch_size]}
                for i in range(0, n, batch_size)
            ]
            clients.append((f"{r}/{c}".encode(), batches, jax.random.PRNGKey(c)))
        rounds.append(clients)
    return rounds


def _train_functions(model):
    grad_fn = model_grad(model)
    optimizer = optimizers.sgd(0.1)

    def init(params, rng):
        return params, optimizer.init(params), rng

    def step(state, batch):
        params, opt_state, rng = state
        rng, use_rng = jax.random.split(rng)
        opt_state, params = optimizer.apply(grad_fn(params, batch, use_rng), opt_state, params)
        return params, opt_state, rng

    def final(shared, state):
        return jax.tree_util.tree_map(jnp.subtract, shared, state[0])

    return init, step, final


def _rounds_per_second(backend, model, rounds) -> float:
    init, step, final = _train_functions(model)
    params = model.init(jax.random.PRNGKey(0))
    with fec.for_each_client_backend(backend):
        run = fec.for_each_client(init, step, final)
    for clients in rounds:  # Warm-up: compiles every program the timed pass needs.
        jax.block_until_ready([out for _, out in run(params, clients)])
    start = time.perf_counter()
    for clients in rounds:
        jax.block_until_ready([out for _, out in run(params, clients)])
    return len(rounds) / (time.perf_counter() - start)


def _layout_ms(rounds, block_size: int) -> float:
    parallel_for_each_client._prepare(rounds[0], block_size, (1, 2))  # Compiles the key stacking.
    start = time.perf_counter()
    for clients in rounds:
        parallel_for_each_client._prepare(clients, block_size, (1, 2))
    return 1000 * (time.perf_counter() - start) / len(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="logistic,dense")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--block-sizes", default="4,8,16")
    args = parser.parse_args()
    rounds = _rounds(args.rounds, args.clients, batch_size=10)
    backends = {"sequential": fec.ForEachClientJitBackend()}
    for size in map(int, args.block_sizes.split(",")):
        backend = parallel_for_each_client.ForEachClientParallelBackend(block_size=size)
        backends[f"parallel_block{size}"] = backend
    makers = {"logistic": emnist.create_logistic_model, "dense": emnist.create_dense_model}
    report = {
        "backend": jax.default_backend(),
        "steps_per_round": float(np.mean([sum(len(b) for _, b, _ in c) for c in rounds])),
        "longest_client_steps": float(np.mean([max(len(b) for _, b, _ in c) for c in rounds])),
        "layout_ms_per_round": _layout_ms(rounds, 8),
    }
    for name in args.models.split(","):
        model = makers[name]()
        for backend_name, backend in backends.items():
            report[f"{name}/{backend_name}"] = _rounds_per_second(backend, model, rounds)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
