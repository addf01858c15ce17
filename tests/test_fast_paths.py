"""The runner's fast paths give the simple path's results: several steps per dispatch,
prefetching, device-resident data, resuming, and the speed settings through the runner."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import (
    compose_config,
    dropout_logistic_model,
    random_image_clients,
    train_with_loop,
)

from fedjax_exp.core import optimizers
from fedjax_exp.experiment import ConfigError, algorithms, loop, parallel, run
from fedjax_exp.experiment.writers import read_metrics
from fedjax_exp.models import emnist

# --- pipeline pieces --------------------------------------------------------------------------


def test_chunk_sizes_stop_at_every_interval():
    assert loop.chunk_sizes(0, 10, 4, [5]) == [4, 1, 4, 1]
    assert loop.chunk_sizes(3, 10, 8, [0, 4]) == [1, 4, 2]
    with pytest.raises(ValueError, match="positive integer"):
        loop.chunk_sizes(0, 4, 0, [])


# --- training equality ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return random_image_clients(num_clients=5, examples=9)


# The logistic model ignores the step's rng; the dropout model draws its masks from it, so
# equality with it also checks that every path gives step k the key fold_in(rng, k).
MODELS = {
    "logistic": lambda: emnist.create_logistic_model(only_digits=True),
    "dropout": dropout_logistic_model,
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def _train(data, model=None, steps=8, log_every=4, device_data=False, **settings):
    model = model or emnist.create_logistic_model(only_digits=True)
    alg = algorithms.CentralizedTraining(model, optimizers.adam(1e-2), data, 4, 2, 8)
    if device_data:
        alg.enable_device_data()
    return train_with_loop(alg, steps, log_every, **settings)


def _assert_same(a, b, exact=True):
    (params_a, logs_a), (params_b, logs_b) = a, b
    assert [s for s, _ in logs_a] == [s for s, _ in logs_b]
    for x, y in zip(params_a, params_b, strict=True):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    for (_, x), (_, y) in zip(logs_a, logs_b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == (y[k] if exact else pytest.approx(y[k], rel=1e-5))


def test_step_k_uses_the_key_fold_in_rng_k(data):
    # The reference: the plain jitted step by hand, step k with fold_in(train_rng, k).
    model = dropout_logistic_model()
    alg = algorithms.CentralizedTraining(model, optimizers.adam(1e-2), data, 4, 2, 8)
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
    state, stream, losses = alg.init(init_rng), alg.data_stream(0, 0), []
    for k in range(1, 9):
        state, scalars = alg.step(state, next(stream), jax.random.fold_in(train_rng, k))
        losses.append(float(scalars["loss"]))
    for per_dispatch in (1, 4):
        params, logs = _train(data, model, steps_per_dispatch=per_dispatch)
        for a, b in zip(params, jax.tree_util.tree_leaves(alg.eval_params(state)), strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
        assert [s for s, _ in logs] == [4, 8]
        assert logs[0][1]["train/loss"] == pytest.approx(np.mean(losses[:4]), rel=1e-6)
        assert logs[1][1]["train/loss"] == pytest.approx(np.mean(losses[4:]), rel=1e-6)
    # The masks do depend on the key: another train rng trains differently.
    state_b = alg.step(alg.init(init_rng), next(alg.data_stream(0, 0)), jax.random.PRNGKey(7))[0]
    state_a = alg.step(
        alg.init(init_rng), next(alg.data_stream(0, 0)), jax.random.fold_in(train_rng, 1)
    )[0]
    assert not np.array_equal(
        np.asarray(jax.tree_util.tree_leaves(state_a.params)[0]),
        np.asarray(jax.tree_util.tree_leaves(state_b.params)[0]),
    )


@pytest.mark.parametrize("per_dispatch", [2, 3, 8])
def test_several_steps_per_dispatch_equal_single_steps(data, model, per_dispatch):
    single = _train(data, model, steps_per_dispatch=1)
    multi = _train(data, model, steps_per_dispatch=per_dispatch)
    # lax.scan compiles the same arithmetic; on XLA:CPU the results are bit for bit equal.
    _assert_same(single, multi)


@pytest.mark.parametrize("per_dispatch", [1, 4])
def test_device_resident_data_equals_host_batches(data, model, per_dispatch):
    host = _train(data, model, steps_per_dispatch=per_dispatch)
    device = _train(data, model, steps_per_dispatch=per_dispatch, device_data=True)
    _assert_same(host, device)


def test_device_data_stream_yields_int32_indices_and_step_gathers(data):
    model = emnist.create_logistic_model(only_digits=True)
    alg = algorithms.CentralizedTraining(model, optimizers.sgd(0.1), data, 4, 2, 8)
    alg.enable_device_data()
    idx = next(alg.data_stream(0, 1))
    assert idx.dtype == np.int32 and idx.shape == (4,)
    host = algorithms.CentralizedTraining(model, optimizers.sgd(0.1), data, 4, 2, 8)
    batch = next(host.data_stream(0, 1))
    np.testing.assert_array_equal(data.gather(idx)["x"], batch["x"])
    state_a = alg.step(alg.init(jax.random.PRNGKey(0)), data.gather(idx), jax.random.PRNGKey(1))[0]
    state_b = host.step(host.init(jax.random.PRNGKey(0)), batch, jax.random.PRNGKey(1))[0]
    for a, b in zip(
        jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_b), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_device_data_applies_the_batch_preprocessor_once(data):
    model = emnist.create_logistic_model(only_digits=True)
    pre = data.preprocess_batch(lambda b: {**b, "x": 1 - b["x"]})
    alg = algorithms.CentralizedTraining(model, optimizers.sgd(0.1), pre, 4, 2, 8)
    alg.enable_device_data()
    np.testing.assert_array_equal(np.asarray(alg.device_columns["x"]), 1 - data.columns["x"])


def test_device_data_refuses_client_preprocessed_data(data):
    model = emnist.create_logistic_model(only_digits=True)
    pre = data.preprocess_client(lambda client_id, examples: examples)
    alg = algorithms.CentralizedTraining(model, optimizers.sgd(0.1), pre, 4, 2, 8)
    assert alg.device_data_bytes() is None
    with pytest.raises(ValueError, match="set trainer.device_data=false"):
        alg.enable_device_data()


# --- speed settings resolved per backend and model -------------------------------------------


def test_convolution_is_detected_in_the_train_step(data):
    found = {}
    for name in ("logistic", "stax_cnn", "conv", "dense"):
        model = getattr(emnist, f"create_{name}_model")(only_digits=True)
        alg = algorithms.CentralizedTraining(model, optimizers.adam(1e-3), data, 4, 2, 8)
        found[name] = alg.uses_convolution()
    assert found == {"logistic": False, "stax_cnn": True, "conv": True, "dense": False}


def test_convolution_detection_sees_nested_jits():
    conv = jax.jit(
        lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=None)
    )
    x = jax.ShapeDtypeStruct((1, 1, 4, 4), np.float32)
    w = jax.ShapeDtypeStruct((2, 1, 3, 3), np.float32)
    assert algorithms.uses_convolution(lambda x, w: jax.jit(conv)(x, w).sum(), x, w)
    assert not algorithms.uses_convolution(lambda x, w: (x.sum(), w.sum()), x, w)


def _resolve(trainer, backend="cpu", **kw):
    args = dict(
        num_devices=1,
        data_bytes=100 << 20,
        device_bytes=None,
        uses_convolution=False,
    )
    args.update(kw)
    conv = args["uses_convolution"]
    args["uses_convolution"] = lambda: conv
    return parallel.resolve_speed_settings(trainer, backend, **args)


def test_auto_speed_settings_on_cpu_follow_the_model():
    dense = _resolve({})
    assert dense == parallel.SpeedSettings(
        steps_per_dispatch=parallel.STEPS_PER_DISPATCH,
        device_data=True,
        data_parallel=False,
    )
    assert _resolve({}, uses_convolution=True).steps_per_dispatch == 1
    assert _resolve({}, uses_convolution=None).steps_per_dispatch == 1
    # Host memory is the CPU device: a big train set stays on the host path.
    assert not _resolve({}, data_bytes=parallel.CPU_DEVICE_DATA_BYTES + 1).device_data
    assert not _resolve({}, data_bytes=None).device_data  # Not an in-memory column store.
    assert _resolve({}, num_devices=2).data_parallel


def test_auto_speed_settings_on_accelerators_and_explicit_values_win():
    gpu = _resolve({}, "gpu", device_bytes=1000 << 20, uses_convolution=True)
    assert gpu.steps_per_dispatch == parallel.STEPS_PER_DISPATCH and gpu.device_data
    assert not _resolve({}, "gpu", device_bytes=300 << 20).device_data  # > a quarter
    explicit = {
        "steps_per_dispatch": 3,
        "device_data": False,
        "data_parallel": False,
    }
    assert _resolve(explicit, num_devices=4) == parallel.SpeedSettings(3, False, False)


def test_speed_up_applies_device_data_and_the_loop_gives_host_results(data):
    model = emnist.create_logistic_model(only_digits=True)
    alg = algorithms.CentralizedTraining(model, optimizers.adam(1e-2), data, 4, 2, 8)
    speed = parallel.speed_up(alg, {})
    assert alg.device_columns is not None
    assert speed.steps_per_dispatch == parallel.STEPS_PER_DISPATCH
    _assert_same(
        _train(data, steps=10, log_every=5),
        _train(
            data,
            steps=10,
            log_every=5,
            device_data=True,
            steps_per_dispatch=speed.steps_per_dispatch,
        ),
    )


# --- through the runner -----------------------------------------------------------------------

TINY = [
    "logger=local",
    "trainer.batch_size=4",
    "trainer.log_every=2",
    "trainer.eval_every=0",
    "trainer.eval_batch_size=64",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=1",
    "trainer.progress_bar=false",
]


def _config(*overrides):
    return compose_config([*TINY, *overrides])


def _final_and_losses(out):
    records = read_metrics(out / "metrics.jsonl")
    losses = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
    return json.loads((out / "status.json").read_text())["final"], losses


def test_resume_with_several_steps_per_dispatch_is_identical(tmp_path):
    common = ["trainer.steps_per_dispatch=3", "trainer.checkpoint_every=4"]
    run(_config(*common, "trainer.steps=8"), output_dir=tmp_path / "whole")
    run(_config(*common, "trainer.steps=4"), output_dir=tmp_path / "split")
    run(_config(*common, "trainer.steps=8"), output_dir=tmp_path / "split")
    assert _final_and_losses(tmp_path / "whole") == _final_and_losses(tmp_path / "split")
    single = ["trainer.steps_per_dispatch=1", "trainer.checkpoint_every=4", "trainer.steps=8"]
    run(_config(*single), output_dir=tmp_path / "single")
    assert _final_and_losses(tmp_path / "single") == _final_and_losses(tmp_path / "whole")


def test_runner_speed_options_run(tmp_path):
    base = ["trainer.steps=4", "trainer.checkpoint_every=0"]
    run(_config(*base), output_dir=tmp_path / "plain")
    run(
        _config(*base, "trainer.data_parallel=true", "trainer.device_data=true"),
        output_dir=tmp_path / "dp",
    )
    assert _final_and_losses(tmp_path / "dp") == _final_and_losses(tmp_path / "plain")
    run(_config(*base, "trainer.compute_dtype=bfloat16"), output_dir=tmp_path / "bf16")
    final_bf16, losses_bf16 = _final_and_losses(tmp_path / "bf16")
    _, losses = _final_and_losses(tmp_path / "plain")
    assert [s for s, _ in losses_bf16] == [s for s, _ in losses]
    for (_, a), (_, b) in zip(losses_bf16, losses, strict=True):
        assert a == pytest.approx(b, rel=2e-2)
    assert 0.0 <= final_bf16["final/test/accuracy"] <= 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.steps_per_dispatch=0", "steps_per_dispatch must be a positive integer or auto"),
        ("trainer.device_data=sometimes", "device_data must be true, false or auto"),
        ("trainer.reuse_host_memory=maybe", "reuse_host_memory must be true, false or auto"),
        ("trainer.compilation_cache=5", "compilation_cache must be a directory path or null"),
        ("trainer.compute_dtype=int8", "compute_dtype must be float32, bfloat16 or float16"),
        ("trainer.batch_size=0", "batch_size"),
    ],
)
def test_bad_speed_settings_fail_before_writing(tmp_path, override, message):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        run(_config("trainer.steps=2", override), output_dir=out)
    assert not (out / "metrics.jsonl").exists()
