"""for_each_client: FedJAX's semantics, and every backend equal to the sequential one."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import fedjax
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_exp
from fedjax_exp.core import for_each_client as fec
from fedjax_exp.core import metrics, models, optimizers, parallel_for_each_client
from fedjax_exp.core.client_datasets import ClientDataset
from fedjax_exp.core.models import model_grad

TESTS_DIR = pathlib.Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("fedjax_on_current_jax")


# --- A counting computation (integers: every backend must agree exactly) -------------------


def count_init(shared_input, client_input):
    return {"limit": shared_input["limit"], "count": client_input["start"]}


def count_step(state, batch):
    num = jnp.sum(batch["x"] > state["limit"])
    return {"limit": state["limit"], "count": state["count"] + num}, {"num": num}


def count_final(shared_input, state):
    del shared_input
    return state["count"]


def count_clients():
    rng = np.random.RandomState(0)
    sizes = [2, 20, 1, 5, 3, 1, 7, 20, 4, 1, 2]  # 11 clients: blocks of 4 pad the last block.
    return [
        (
            f"c{i}".encode(),
            [{"x": rng.randint(0, 10, size=4)} for _ in range(n)],
            {"start": np.int32(i)},
        )
        for i, n in enumerate(sizes)
    ]


def run(backend, init, step, final, shared, clients, with_step_result=True):
    with fedjax_exp.for_each_client_backend(backend):
        func = fedjax_exp.for_each_client(init, step, final, with_step_result=with_step_result)
    return list(func(shared, clients))


def assert_same_results(ours, reference, exact=True):
    assert [r[0] for r in ours] == [r[0] for r in reference]
    for mine, theirs in zip(ours, reference, strict=True):
        assert len(mine) == len(theirs)
        if len(mine) == 3:
            assert len(mine[2]) == len(theirs[2])  # Padded steps are not reported.
        mine_leaves = jax.tree_util.tree_leaves(mine[1:])
        their_leaves = jax.tree_util.tree_leaves(theirs[1:])
        assert len(mine_leaves) == len(their_leaves)
        for a, b in zip(mine_leaves, their_leaves, strict=True):
            assert np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype
            if exact:
                np.testing.assert_array_equal(a, b)
            else:
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


BACKENDS = {
    "debug": "debug",
    "parallel": "parallel",
    "parallel-block1": parallel_for_each_client.ForEachClientParallelBackend(block_size=1),
    "parallel-block4": parallel_for_each_client.ForEachClientParallelBackend(block_size=4),
    "sharded-1-device": "sharded",
}


def test_matches_fedjax_sequential_results_with_step_results():
    clients = count_clients()
    shared = {"limit": np.int32(4)}
    ours = run("jit", count_init, count_step, count_final, shared, clients)
    theirs = list(
        fedjax.for_each_client(count_init, count_step, count_final, with_step_result=True)(
            shared, clients
        )
    )
    assert_same_results(ours, theirs)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backends_equal_sequential_exactly_on_integer_steps(name):
    clients = count_clients()
    shared = {"limit": np.int32(4)}
    reference = run("jit", count_init, count_step, count_final, shared, clients)
    assert_same_results(
        run(BACKENDS[name], count_init, count_step, count_final, shared, clients), reference
    )


@pytest.mark.parametrize("name", ["debug", "parallel-block4"])
def test_without_step_results_yields_pairs(name):
    def step(state, batch):
        return count_step(state, batch)[0]

    clients = count_clients()
    shared = {"limit": np.int32(4)}
    ours = run(BACKENDS[name], count_init, step, count_final, shared, clients, False)
    assert [len(r) for r in ours] == [2] * len(clients)
    expected = [
        int(client_input["start"]) + sum(int(np.sum(b["x"] > 4)) for b in batches)
        for _, batches, client_input in clients
    ]
    assert [int(output) for _, output in ours] == expected


def test_default_client_final_is_identity_and_generators_are_accepted():
    clients = ((cid, iter(batches), ci) for cid, batches, ci in count_clients()[:3])
    with fedjax_exp.for_each_client_backend("parallel"):
        func = fedjax_exp.for_each_client(count_init, lambda s, b: count_step(s, b)[0])
    results = list(func({"limit": np.int32(4)}, clients))
    assert set(results[0][1]) == {"limit", "count"}


# --- FedAvg-style local training with a model that draws dropout masks from its rng -------


def _dropout_linear_model():
    """A small linear classifier with input dropout in training: its steps consume the rng,
    so equality across backends also checks each client step gets the same key."""

    def forward(batch, is_train=True):
        x = batch["x"]
        if is_train:
            x = hk.dropout(hk.next_rng_key(), 0.5, x)
        return hk.Linear(NUM_CLASSES)(x)

    return models.create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward),
        sample_batch={"x": jnp.zeros((1, NUM_FEATURES)), "y": jnp.zeros((1,), jnp.int32)},
        train_loss=lambda batch, logits: metrics.unreduced_cross_entropy_loss(batch["y"], logits),
        eval_metrics={"loss": metrics.CrossEntropyLoss()},
        train_kwargs={"is_train": True},
        eval_kwargs={"is_train": False},
    )


NUM_FEATURES = 12
NUM_CLASSES = 4
MODEL = _dropout_linear_model()
OPTIMIZER = optimizers.sgd(0.1)
GRAD = model_grad(MODEL)


def train_init(shared_params, client_rng):
    return {"params": shared_params, "opt_state": OPTIMIZER.init(shared_params), "rng": client_rng}


def train_step(state, batch):
    rng, use_rng = jax.random.split(state["rng"])
    grads = GRAD(state["params"], batch, use_rng)
    opt_state, params = OPTIMIZER.apply(grads, state["opt_state"], state["params"])
    norm = fedjax_exp.tree_util.tree_l2_norm(grads)
    return {"params": params, "opt_state": opt_state, "rng": rng}, {"grad_norm": norm}


def train_final(shared_params, state):
    return jax.tree_util.tree_map(jnp.subtract, shared_params, state["params"])


def image_clients(sizes, batch_size=5, drop_remainder=True, seed=0, padded=False):
    rng = np.random.RandomState(seed)
    clients = []
    for i, n in enumerate(sizes):
        data = ClientDataset(
            {
                "x": rng.uniform(size=(n, NUM_FEATURES)).astype(np.float32),
                "y": rng.randint(0, NUM_CLASSES, size=n).astype(np.int32),
            }
        )
        if padded:
            batches = data.padded_batch(batch_size=batch_size, num_batch_size_buckets=4)
        else:
            batches = data.batch(batch_size=batch_size, drop_remainder=drop_remainder)
        clients.append((f"client{i}".encode(), batches, jax.random.PRNGKey(100 + i)))
    return clients


def train_results(backend, clients, with_step_result=True):
    params = MODEL.init(jax.random.PRNGKey(0))
    return run(backend, train_init, train_step, train_final, params, clients, with_step_result)


# 1 batch next to 20 batches; 9 clients so blocks of 4 get a padding client.
TRAIN_SIZES = [5, 100, 10, 35, 5, 60, 20, 5, 45]
TRAIN_STEPS = [1, 20, 2, 7, 1, 12, 4, 1, 9]


@pytest.fixture(scope="module")
def sequential_training():
    clients = image_clients(TRAIN_SIZES)
    return clients, train_results("jit", clients)


def test_training_client_results_match_fedjax_jit_backend(sequential_training):
    clients, reference = sequential_training
    params = MODEL.init(jax.random.PRNGKey(0))
    func = fedjax.for_each_client(train_init, train_step, train_final, with_step_result=True)
    assert_same_results(reference, list(func(params, clients)))


@pytest.mark.parametrize("name", ["parallel", "parallel-block4"])
def test_training_backends_equal_sequential_bit_for_bit(sequential_training, name):
    # Same arithmetic per client (vmapped lanes), so the same bits, dropout keys included.
    clients, reference = sequential_training
    results = train_results(BACKENDS[name], clients)
    assert [len(steps) for _, _, steps in results] == TRAIN_STEPS
    assert all(float(r["grad_norm"]) > 0 for _, _, steps in results for r in steps)
    assert_same_results(results, reference)


@pytest.mark.parametrize("padded", [False, True])
def test_ragged_last_batches_are_masked_to_the_same_result(padded):
    # Without drop_remainder the last batch of most clients is smaller (with padded batches,
    # smaller and already masked): the parallel backend pads it to the common size with
    # masked-out examples, which the masked-mean gradient ignores.
    clients = image_clients([7, 23, 5, 12], batch_size=8, drop_remainder=False, padded=padded)
    shapes = {np.shape(b["x"]) for _, batches, _ in clients for b in batches}
    assert len(shapes) > 1
    reference = train_results("jit", clients)
    assert_same_results(train_results("parallel", clients), reference, exact=False)


@pytest.mark.parametrize("name", ["parallel", "parallel-block4"])
def test_typed_prng_keys_in_client_input_and_state(name):
    def init(shared, key):
        return {"key": key, "total": shared}

    def step(state, batch):
        key, use = jax.random.split(state["key"])
        draw = jax.random.uniform(use, batch["x"].shape)
        return {"key": key, "total": state["total"] + jnp.sum(draw * batch["x"])}, draw[0]

    clients = [
        (cid, batches, jax.random.key(i)) for i, (cid, batches, _) in enumerate(count_clients())
    ]
    shared = jnp.float32(0.5)
    reference = run("jit", init, step, lambda _, s: s["total"], shared, clients)
    assert_same_results(
        run(BACKENDS[name], init, step, lambda _, s: s["total"], shared, clients), reference
    )


def test_unhashable_step_function_is_accepted():
    class Step:  # A callable without a hash (e.g. a dataclass holding arrays).
        __hash__ = None

        def __call__(self, state, batch):
            return state + jnp.sum(batch["x"])

    clients = [(b"a", [{"x": np.ones(3, np.float32)}] * 2, np.float32(2))]
    for backend in ("jit", "parallel"):
        results = run(
            backend,
            lambda s, c: s + c,
            Step(),
            fec._identity_final,
            np.float32(1),
            clients,
            with_step_result=False,
        )
        assert [(cid, float(out)) for cid, out in results] == [(b"a", 9.0)]


# --- Bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["jit", *BACKENDS])
def test_client_without_examples_is_rejected(name):
    clients = count_clients()[:2] + [(b"empty", [], {"start": np.int32(0)})]
    with pytest.raises(ValueError, match="client b'empty' has no batches"):
        run(
            BACKENDS.get(name, name),
            count_init,
            count_step,
            count_final,
            {"limit": np.int32(4)},
            clients,
        )


def test_parallel_rejects_mismatched_features():
    clients = count_clients()[:2]
    clients[1] = (clients[1][0], [{"z": np.zeros(4)}], clients[1][2])
    with pytest.raises(ValueError, match="same features"):
        run("parallel", count_init, count_step, count_final, {"limit": np.int32(4)}, clients)


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="Unsupported for_each_client backend 'gpu'"):
        fedjax_exp.set_for_each_client_backend("gpu")


def test_backend_choice_is_scoped_by_the_context_manager():
    assert isinstance(fedjax_exp.get_for_each_client_backend(), fec.ForEachClientJitBackend)
    with fedjax_exp.for_each_client_backend("pmap"):
        backend = fedjax_exp.get_for_each_client_backend()
        assert isinstance(backend, parallel_for_each_client.ForEachClientShardedBackend)
    assert isinstance(fedjax_exp.get_for_each_client_backend(), fec.ForEachClientJitBackend)


def test_debug_backend_wraps_errors_with_context():
    def failing_step(state, batch):
        raise RuntimeError("boom")

    with fedjax_exp.for_each_client_backend("debug"):
        func = fedjax_exp.for_each_client(count_init, failing_step)
    with pytest.raises(fec.ForEachClientError, match="Stage: client_step") as info:
        list(func({"limit": 1}, count_clients()[:1]))
    assert info.value.context["client_id"] == b"c0"


def test_padded_size_bounds_padding():
    padded = parallel_for_each_client.padded_size
    assert [padded(n, 4) for n in [1, 8, 9, 17, 33, 100]] == [1, 8, 10, 20, 40, 112]
    assert [padded(n, 1) for n in [1, 2, 3, 5, 17, 100]] == [1, 2, 4, 8, 32, 128]
    assert [padded(n, 2) for n in [4, 5, 7, 9, 13, 100]] == [4, 6, 8, 12, 16, 128]
    for granularity in (1, 2, 4):
        for n in range(1, 500):
            assert n <= padded(n, granularity) < n * (1 + 1 / granularity) + 1


# --- Sharded over 4 forced CPU devices -----------------------------------------------------

_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, TESTS_DIR)
    import test_fed_core_for_each_client as t
    from fedjax_exp.core import parallel_for_each_client as p

    def max_diff(ours, reference):
        leaves = lambda r: jax.tree_util.tree_leaves([x[1:] for x in r])
        return max(
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
            for a, b in zip(leaves(ours), leaves(reference))
        )

    clients = t.image_clients(t.TRAIN_SIZES)
    sequential = t.train_results("jit", clients)
    sharded = t.train_results(p.ForEachClientShardedBackend(block_size=4), clients)
    report = {
        "devices": jax.device_count(),
        "max_diff": max_diff(sharded, sequential),
        "steps": [len(r[2]) for r in sharded],
        "output_devices": sorted(
            {str(d) for r in sharded for leaf in jax.tree_util.tree_leaves(r[1:])
             for d in leaf.devices()}),
    }
    counts = t.count_clients()
    shared = {"limit": np.int32(4)}
    exact = t.run("sharded", t.count_init, t.count_step, t.count_final, shared, counts)
    t.assert_same_results(exact, t.run("jit", t.count_init, t.count_step, t.count_final,
                                       shared, counts))
    report["block_size_default"] = p.ForEachClientShardedBackend().block_size
    print(json.dumps(report))
    """
)


def test_sharded_over_four_devices_equals_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", f"TESTS_DIR = {str(TESTS_DIR)!r}\n{_SHARDED_SCRIPT}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=TESTS_DIR.parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    assert report["block_size_default"] == 8
    assert report["steps"] == [1, 20, 2, 7, 1, 12, 4, 1, 9]
    # Lanes split over devices run the same per-client arithmetic as the sequential backend.
    assert report["max_diff"] == 0.0
    assert report["output_devices"] == ["cpu:0"]


# --- A whole algorithm on the parallel backend ----------------------------------------------


def test_fed_avg_rounds_equal_on_parallel_and_sequential_backends():
    from fedjax_exp.algorithms import fed_avg

    rng = np.random.RandomState(1)
    examples = {
        f"c{i}".encode(): {
            "x": rng.uniform(size=(n, NUM_FEATURES)).astype(np.float32),
            "y": rng.randint(0, NUM_CLASSES, size=n).astype(np.int32),
        }
        for i, n in enumerate([3, 40, 17, 8, 25, 11])
    }
    data = fedjax_exp.InMemoryFederatedData(examples)
    hparams = fedjax_exp.ShuffleRepeatBatchHParams(batch_size=4, num_epochs=1, seed=0)

    def train(backend):
        # The backend in effect when the algorithm builds its for_each_client is the one used.
        with fedjax_exp.for_each_client_backend(backend):
            algorithm = fed_avg.federated_averaging(
                GRAD, optimizers.sgd(0.2), optimizers.sgd(1.0), hparams
            )
        state = algorithm.init(MODEL.init(jax.random.PRNGKey(0)))
        # Every client each round (in a new order): one program shape, one compilation.
        sampler = fedjax_exp.client_samplers.UniformGetClientSampler(data, 6, seed=0)
        for _ in range(2):
            state, diagnostics = algorithm.apply(state, sampler.sample())
        return state.params, diagnostics

    params, diagnostics = train("parallel")
    reference_params, reference_diagnostics = train("jit")
    assert diagnostics.keys() == reference_diagnostics.keys()
    assert_same_results([(0, params, diagnostics)], [(0, reference_params, reference_diagnostics)])
