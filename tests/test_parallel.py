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
    import json
    import jax, jax.numpy as jnp, numpy as np
    from fedjax_exp.core import optimizers
    from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
    from fedjax_exp.experiment import algorithms, parallel
    from fedjax_exp.models import emnist

    rng = np.random.default_rng(0)
    clients = {
        f"c{i}".encode(): {
            "x": rng.random((10, 28, 28, 1), dtype=np.float32),
            "y": rng.integers(0, 62, 10).astype(np.int32),
        }
        for i in range(6)
    }
    data = InMemoryFederatedData(clients)
    model = emnist.create_logistic_model()

    def make():
        return algorithms.CentralizedTraining(model, optimizers.adam(1e-2), data, 8, 2, 16)

    def train(alg, steps=4):
        state = alg.init(jax.random.PRNGKey(0))
        stream = alg.data_stream(0, 0)
        losses = []
        for k in range(1, steps + 1):
            state, scalars = alg.step(state, next(stream), jax.random.PRNGKey(k))
            losses.append(float(scalars["loss"]))
        return state, losses

    single, single_losses = train(make())
    dp = parallel.DataParallelTraining(make())
    sharded, sharded_losses = train(dp)
    leaf = jax.tree_util.tree_leaves(sharded.params)[0]
    batch = dp.place_batch(next(dp.data_stream(0, 0)))
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree_util.tree_leaves(single), jax.tree_util.tree_leaves(sharded))
    ]
    try:
        parallel.DataParallelTraining(
            algorithms.CentralizedTraining(model, optimizers.adam(1e-2), data, 6, 2, 16)
        )
        error = None
    except ValueError as e:
        error = str(e)
    # The loop's fast paths (K steps per dispatch, device-resident data) on the mesh, with a
    # model that draws dropout masks from each step's key: as on one device.
    import sys
    sys.path.insert(0, TESTS_DIR)
    from helpers import dropout_logistic_model, train_with_loop

    dropout_model = dropout_logistic_model(62)

    def loop_train(alg, per_dispatch, device_data):
        if device_data:
            alg.enable_device_data()
        leaves, records = train_with_loop(alg, steps_per_dispatch=per_dispatch, prefetch=2)
        return leaves, [r[1]["train/loss"] for r in records]

    def make_dropout():
        return algorithms.CentralizedTraining(
            dropout_model, optimizers.adam(1e-2), data, 8, 2, 16
        )

    fast_paths = {}
    for per_dispatch, device_data in [(4, False), (4, True), (1, True)]:
        single_leaves, single_logged = loop_train(make_dropout(), per_dispatch, device_data)
        dp_leaves, dp_logged = loop_train(
            parallel.DataParallelTraining(make_dropout()), per_dispatch, device_data
        )
        fast_paths[f"{per_dispatch}-{device_data}"] = {
            "max_diff": max(
                float(np.max(np.abs(a - b))) for a, b in zip(single_leaves, dp_leaves)
            ),
            "single_losses": single_logged,
            "sharded_losses": dp_logged,
        }

    print(json.dumps({
        "fast_paths": fast_paths,
        "devices": jax.device_count(),
        "mesh": int(dp.mesh.devices.size),
        "param_devices": len(leaf.sharding.device_set),
        "param_replicated": leaf.sharding.is_fully_replicated,
        "batch_shard_shapes": sorted({tuple(s.data.shape) for s in batch["x"].addressable_shards}),
        "auto": parallel.resolve_data_parallel("auto"),
        "max_diff": max(diffs),
        "single_losses": single_losses,
        "sharded_losses": sharded_losses,
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


def test_sharded_training_matches_single_device(four_devices):
    assert four_devices["devices"] == 4
    assert four_devices["mesh"] == 4
    assert four_devices["max_diff"] < 1e-6
    np.testing.assert_allclose(
        four_devices["sharded_losses"], four_devices["single_losses"], rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("path", ["4-False", "4-True", "1-True"])
def test_sharded_fast_paths_match_single_device(four_devices, path):
    # K steps per dispatch and device-resident data, with per-step dropout keys.
    result = four_devices["fast_paths"][path]
    assert len(result["single_losses"]) == 2
    assert result["max_diff"] < 1e-6
    np.testing.assert_allclose(
        result["sharded_losses"], result["single_losses"], rtol=1e-6, atol=1e-7
    )


def test_state_is_replicated_and_batch_is_split(four_devices):
    assert four_devices["param_devices"] == 4
    assert four_devices["param_replicated"] is True
    # Batch of 8 over 4 devices: two examples of 28x28x1 each.
    assert four_devices["batch_shard_shapes"] == [[2, 28, 28, 1]]
    assert four_devices["auto"] is True


def test_indivisible_batch_is_a_clear_error(four_devices):
    assert "batch_size=6 does not divide over 4 devices" in four_devices["error"]


def test_check_batch_divisible_message():
    parallel.check_batch_divisible(8, 4)
    with pytest.raises(ValueError, match=r"use a multiple of 4 \(e.g. 8 or 12\)"):
        parallel.check_batch_divisible(10, 4)


def test_resolve_data_parallel():
    assert parallel.resolve_data_parallel("auto", num_devices=1) is False
    assert parallel.resolve_data_parallel(None, num_devices=2) is True
    assert parallel.resolve_data_parallel(True, num_devices=1) is True
    assert parallel.resolve_data_parallel(False, num_devices=8) is False
    with pytest.raises(ValueError, match="true, false or auto"):
        parallel.resolve_data_parallel("yes")


def test_single_device_data_parallel_is_bitwise_plain_training():
    from fedjax_exp.datasets import sample

    train, _ = sample.load_data()
    model = emnist.create_logistic_model()

    def make():
        return algorithms.CentralizedTraining(model, optimizers.sgd(0.1), train, 4, 2, 16)

    results = []
    for alg in (make(), parallel.DataParallelTraining(make())):
        state = alg.init(jax.random.PRNGKey(1))
        stream = alg.data_stream(3, 0)
        for k in range(3):
            state, _ = alg.step(state, next(stream), jax.random.PRNGKey(k))
        results.append(jax.tree_util.tree_leaves(state.params))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
