"""The runner's fast paths give the simple path's results: several steps per dispatch,
resuming, and the speed settings through the runner."""

from __future__ import annotations

import json
import platform

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
from fedjax_exp.training import host_memory, steps
from fedjax_exp.training.host_memory import reuse_freed_memory

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


def _train(data, model=None, steps=8, log_every=4, **settings):
    model = model or emnist.create_logistic_model(only_digits=True)
    alg = algorithms.CentralizedTraining(model, optimizers.adam(1e-2), data, 4, 2, 8)
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
    assert steps.uses_convolution(lambda x, w: jax.jit(conv)(x, w).sum(), x, w)
    assert not steps.uses_convolution(lambda x, w: (x.sum(), w.sum()), x, w)


class _Probe:
    """An algorithm stand-in for the speed settings: a fixed convolution answer, meshes kept."""

    num_trials = 1

    def __init__(self, convolves):
        self.convolves, self.meshes = convolves, []

    def uses_convolution(self):
        return self.convolves

    def use_mesh(self, mesh):
        self.meshes.append(mesh)


@pytest.fixture(autouse=True)
def host_memory_calls(monkeypatch):
    """Records calls of the process-wide host memory setting instead of making them."""
    calls = []
    monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: calls.append(1) or True)
    return calls


def _resolve(trainer, backend="cpu", num_devices=1, uses_convolution=False):
    probe = _Probe(uses_convolution)
    settings = parallel.speed_up(probe, trainer, backend=backend, num_devices=num_devices)
    assert len(probe.meshes) == settings.data_parallel  # A mesh exactly when data-parallel.
    return settings


def test_auto_speed_settings_on_cpu_follow_the_model():
    dense = _resolve({})
    assert dense == parallel.SpeedSettings(
        steps_per_dispatch=parallel.STEPS_PER_DISPATCH,
        data_parallel=False,
        reuse_host_memory=True,
    )
    assert _resolve({}, uses_convolution=True).steps_per_dispatch == 1
    assert _resolve({}, uses_convolution=None).steps_per_dispatch == 1
    assert _resolve({}, num_devices=2).data_parallel


def test_auto_speed_settings_on_accelerators_and_explicit_values_win(host_memory_calls):
    gpu = _resolve({}, "gpu", uses_convolution=True)
    assert gpu.steps_per_dispatch == parallel.STEPS_PER_DISPATCH
    assert not gpu.reuse_host_memory and not host_memory_calls  # Off the CPU: untouched.
    explicit = {"steps_per_dispatch": 3, "data_parallel": False, "reuse_host_memory": False}
    assert _resolve(explicit, num_devices=4) == parallel.SpeedSettings(3, False, False)
    assert not host_memory_calls
    assert _resolve({"reuse_host_memory": True}, "gpu").reuse_host_memory
    assert host_memory_calls == [1]


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_host_memory_reuse_takes_effect_with_glibc():
    # Exercises the real mallopt calls (process-wide; the thresholds only keep freed blocks).
    assert reuse_freed_memory()  # The real function: the fixture patches the module.


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
        _config(*base, "trainer.data_parallel=true"),
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
    "override",
    [
        "trainer.steps_per_dispatch=0",
        "trainer.compute_dtype=int8",
        "trainer.batch_size=0",
    ],
)
def test_bad_speed_settings_fail_before_writing(tmp_path, override):
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    # Refused when the config is composed (its schema) or validated, naming the key.
    key = override.split("=")[0].split(".")[-1]
    out = tmp_path / "run"
    with pytest.raises((ConfigError, HydraException, OmegaConfBaseException), match=key):
        run(_config("trainer.steps=2", override), output_dir=out)
    assert not out.exists() or not any(out.iterdir())
