"""Data-parallel training over forced host devices and bf16 compute."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.core import optimizers
from fedjax_exp.experiment import algorithms, parallel
from fedjax_exp.models import emnist

# Runs in a fresh interpreter: the device count is fixed when JAX starts.
_SHARDED_VS_SINGLE = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from fedjax_exp.core import optimizers
    from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
    from fedjax_exp.experiment import algorithms, parallel
    sys.path.insert(0, TESTS_DIR)
    from helpers import dropout_logistic_model, train_with_loop

    rng = np.random.default_rng(0)
    clients = {
        f"c{i}".encode(): {
            "x": rng.random((10, 28, 28, 1), dtype=np.float32),
            "y": rng.integers(0, 62, 10).astype(np.int32),
        }
        for i in range(6)
    }
    data = InMemoryFederatedData(clients)
    # Dropout masks come from each step's key: equality also checks the keys on the mesh.
    model = dropout_logistic_model(62)

    def make(batch_size=8, mesh=False):
        alg = algorithms.CentralizedTraining(model, optimizers.adam(1e-2), data, batch_size, 2, 16)
        if mesh:
            alg.use_mesh(parallel.data_parallel_mesh())
        return alg

    def loop_train(alg, per_dispatch):
        leaves, records = train_with_loop(alg, steps_per_dispatch=per_dispatch)
        return leaves, [r[1]["train/loss"] for r in records]

    single_leaves, single_losses = loop_train(make(), 1)
    paths = {}
    for per_dispatch in (1, 4):
        leaves, losses = loop_train(make(mesh=True), per_dispatch)
        paths[per_dispatch] = {
            "max_diff": max(
                float(np.max(np.abs(a - b))) for a, b in zip(single_leaves, leaves)
            ),
            "losses": losses,
        }
    dp = make(mesh=True)
    leaf = jax.tree_util.tree_leaves(dp.init(jax.random.PRNGKey(0)).params)[0]
    block = dp.prepare([next(dp.data_stream(0, 0))])
    try:
        make(6, mesh=True)
        error = None
    except ValueError as e:
        error = str(e)
    print(json.dumps({
        "paths": paths,
        "single_losses": single_losses,
        "devices": jax.device_count(),
        "param_devices": len(leaf.sharding.device_set),
        "param_replicated": leaf.sharding.is_fully_replicated,
        "block_shard_shapes": sorted({tuple(s.data.shape) for s in block["x"].addressable_shards}),
        "error": error,
    }))
    """
)


@pytest.fixture(scope="module")
def four_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    tests_dir = str(pathlib.Path(__file__).resolve().parent)
    result = subprocess.run(
        [sys.executable, "-c", f"TESTS_DIR = {tests_dir!r}\n{_SHARDED_VS_SINGLE}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", ["1", "4"])
def test_sharded_training_matches_single_device(four_devices, path):
    # One step and K steps per dispatch, on 4 devices.
    assert four_devices["devices"] == 4
    result = four_devices["paths"][path]
    assert len(result["losses"]) == 2
    assert result["max_diff"] < 1e-6
    np.testing.assert_allclose(
        result["losses"], four_devices["single_losses"], rtol=1e-6, atol=1e-7
    )


def test_state_is_replicated_and_batch_is_split(four_devices):
    assert four_devices["param_devices"] == 4
    assert four_devices["param_replicated"] is True
    # One step's batch of 8 over 4 devices: two examples of 28x28x1 each.
    assert four_devices["block_shard_shapes"] == [[1, 2, 28, 28, 1]]


def test_indivisible_batch_is_a_clear_error(four_devices):
    assert "batch_size=6 does not divide over 4 devices" in four_devices["error"]


def test_check_batch_divisible_message():
    algorithms.check_batch_divisible(8, 4)
    with pytest.raises(ValueError, match=r"use a multiple of 4 \(e.g. 8 or 12\)"):
        algorithms.check_batch_divisible(10, 4)


def test_single_device_data_parallel_is_bitwise_plain_training():
    from helpers import train_with_loop

    from fedjax_exp.datasets import sample

    train, _ = sample.load_data()
    model = emnist.create_logistic_model()
    plain = algorithms.CentralizedTraining(model, optimizers.sgd(0.1), train, 4, 2, 16)
    meshed = algorithms.CentralizedTraining(model, optimizers.sgd(0.1), train, 4, 2, 16)
    meshed.use_mesh(parallel.data_parallel_mesh(jax.local_devices()[:1]))
    for a, b in zip(train_with_loop(plain)[0], train_with_loop(meshed)[0], strict=True):
        np.testing.assert_array_equal(a, b)


# --- bf16 compute ---------------------------------------------------------------------------


def _batch(seed: int = 0, n: int = 8):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.random((n, 28, 28, 1), dtype=np.float32),
        "y": rng.integers(0, 10, n).astype(np.int32),
    }


def test_bf16_forward_runs_in_bf16_and_returns_float32():
    model = emnist.create_logistic_model(only_digits=True)
    seen = []

    def spy(params, batch, rng=None):
        seen.append(
            (jax.tree_util.tree_leaves(params)[0].dtype, batch["x"].dtype, batch["y"].dtype)
        )
        return model.apply_for_train(params, batch, rng)

    wrapped = parallel.with_compute_dtype(model.replace(apply_for_train=spy), "bfloat16")
    params = model.init(jax.random.PRNGKey(0))
    out = wrapped.apply_for_train(params, _batch(), None)
    assert seen == [(jnp.bfloat16, jnp.bfloat16, jnp.int32)]
    assert out.dtype == jnp.float32
    assert parallel.with_compute_dtype(model, "float32") is model


def test_bf16_training_keeps_f32_params_and_loss_is_close():
    model = emnist.create_logistic_model(only_digits=True)
    batch = _batch()
    losses, dtypes = {}, {}
    for name in ("float32", "bfloat16"):
        update = jax.jit(
            algorithms.centralized_update(
                parallel.with_compute_dtype(model, name), optimizers.sgd(0.1)
            )
        )
        params = model.init(jax.random.PRNGKey(0))
        state = algorithms.TrainState(params=params, opt_state=optimizers.sgd(0.1).init(params))
        trace = []
        for k in range(5):
            state, scalars = update(state, batch, jax.random.PRNGKey(k))
            trace.append(float(scalars["loss"]))
        losses[name] = trace
        dtypes[name] = {x.dtype for x in jax.tree_util.tree_leaves(state.params)}
    assert dtypes["bfloat16"] == {jnp.dtype(jnp.float32)}
    assert losses["bfloat16"] != losses["float32"]  # The bf16 path really computes in bf16.
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
    assert losses["bfloat16"][-1] < losses["bfloat16"][0]


def test_unknown_compute_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="trainer.compute_dtype must be one of"):
        parallel.with_compute_dtype(emnist.create_logistic_model(), "int8")
