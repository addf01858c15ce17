"""Federated runs through the runner: every algorithm option from the command line, a run equal
to the library algorithm round for round, stop and resume equal to an uninterrupted run, the
clients sharded over 4 devices equal to one device, and bad settings refused in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import compose_config, run_py

from fedjax_exp.experiment import ConfigError, run
from fedjax_exp.experiment.writers import read_metrics

ALGORITHMS = ["fed_avg", "fed_prox", "scaffold", "dp_fed_avg", "mime", "mime_lite"]

# ++ (set or add): a multirun's parent composes the default (centralized) algorithm first.
TINY = [
    "logger=local",
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "trainer.eval_batch_size=64",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=1",
    "trainer.progress_bar=false",
    "++algorithm.clients_per_round=4",
    "++algorithm.client_batch_size=20",
]


def records(run_dir: pathlib.Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k != "time"} for r in read_metrics(run_dir / "metrics.jsonl")
    ]


def test_every_algorithm_runs_from_the_command_line(tmp_path):
    """One multirun: each option trains 2 rounds and writes train, eval and final metrics;
    DP-FedAvg logs its privacy spent, eval_clients and per-client evaluation work."""
    overrides = [
        "-m",
        f"algorithm={','.join(ALGORITHMS)}",
        *TINY,
        "trainer.steps=2",
        "trainer.checkpoint_every=0",
        "++algorithm.eval_clients=3",
        "trainer.per_client_eval=true",
        f"hydra.sweep.dir={tmp_path}",
    ]
    proc = run_py(overrides, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, name in enumerate(ALGORITHMS):
        run_dir = tmp_path / str(job)
        assert f"algorithm={name}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
        log_lines = (run_dir / "run.log").read_text().splitlines()
        described = log_lines[0]
        assert any("finished round 2 after" in line for line in log_lines), log_lines
        assert f"algorithm={name} seed=0: rounds 1-2, 4 clients per round, client batch 20;" in (
            described
        ), described
        history = records(run_dir)
        train = [r for r in history if "train/loss" in r]
        assert [r["step"] for r in train] == [1, 2], name
        assert all(np.isfinite(r["train/loss"]) and r["train/delta_l2_norm"] > 0 for r in train)
        assert [r["step"] for r in history if "eval/test/accuracy" in r] == [2]
        final = history[-1]
        assert 0 <= final["final/test/accuracy"] <= 1
        assert final["final/per_client/test/num_clients"] == 40
        if name == "dp_fed_avg":
            from fedjax_exp.algorithms.dp_fed_avg import epsilon_spent

            spent = [epsilon_spent(0.1, 4 / 40, step, 1e-5) for step in (1, 2)]
            assert [r["privacy/epsilon"] for r in train] == pytest.approx(spent)
        else:
            assert "privacy/epsilon" not in train[0]


def test_a_run_equals_the_library_algorithm_round_for_round(tmp_path):
    """fed_avg from the config (server Adagrad) against fed_avg.federated_averaging with the
    same sampler, seed and data: the logged mean client delta norm of every round and the
    final test metrics."""
    import jax

    from fedjax_exp.algorithms import fed_avg
    from fedjax_exp.core import client_samplers, cohort, models, optimizers
    from fedjax_exp.core.client_datasets import ShuffleRepeatBatchHParams
    from fedjax_exp.core.federated_data import padded_batch_federated_data
    from fedjax_exp.datasets import sample
    from fedjax_exp.models import emnist

    cfg = compose_config(
        [
            "algorithm=fed_avg",
            *TINY,
            "trainer.steps=3",
            "trainer.checkpoint_every=0",
            "optimizer=adagrad",
            "optimizer.learning_rate=0.5",
            "seed=4",
        ]
    )
    run(cfg, output_dir=tmp_path)
    history = records(tmp_path)

    train, test = sample.load_data()
    model = emnist.create_logistic_model()
    server = optimizers.adagrad(0.5, initial_accumulator_value=0.1, eps=1e-6)
    hparams = ShuffleRepeatBatchHParams(batch_size=20, num_epochs=1)
    sampler = client_samplers.UniformGetClientSampler(train, 4, 4)
    init_rng = jax.random.split(jax.random.PRNGKey(4))[0]  # The runner's init key.
    state = None
    for round_num in range(3):
        round_hparams = dataclasses.replace(hparams, seed=cohort.round_shuffle_seed(4, round_num))
        algorithm = fed_avg.federated_averaging(
            models.model_grad(model), optimizers.sgd(0.1), server, round_hparams
        )
        state = algorithm.init(model.init(init_rng)) if state is None else state
        state, diagnostics = algorithm.apply(state, sampler.sample())
        norms = [float(d["delta_l2_norm"]) for d in diagnostics.values()]
        logged = next(r for r in history if r["step"] == round_num + 1 and "train/loss" in r)
        assert logged["train/delta_l2_norm"] == pytest.approx(np.mean(norms), rel=1e-5)
    expected = models.evaluate_model(
        model, state.params, padded_batch_federated_data(test, batch_size=64)
    )
    assert history[-1]["final/test/loss"] == pytest.approx(float(expected["loss"]), rel=1e-4)
    assert history[-1]["final/test/accuracy"] == pytest.approx(float(expected["accuracy"]))


@pytest.mark.parametrize("name", ["scaffold", "dp_fed_avg"])
def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path, name):
    """A run stopped after round 3 (mid checkpoint interval) and rerun to round 6 logs
    exactly what the uninterrupted run logs: the same clients, batches, keys and state."""
    common = [f"algorithm={name}", *TINY, "trainer.checkpoint_every=2", "trainer.eval_every=3"]
    run(compose_config([*common, "trainer.steps=6"]), output_dir=tmp_path / "whole")
    run(compose_config([*common, "trainer.steps=3"]), output_dir=tmp_path / "parts")
    run(compose_config([*common, "trainer.steps=6"]), output_dir=tmp_path / "parts")
    assert records(tmp_path / "parts") == records(tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "status.json").read_text())
    assert json.loads((tmp_path / "parts" / "status.json").read_text())["final"] == whole["final"]


_SHARDED_VS_SINGLE = """
import json, jax, numpy as np
from fedjax_exp.core import optimizers
from fedjax_exp.datasets import sample
from fedjax_exp.experiment.federated import FederatedTraining
from fedjax_exp.experiment.parallel import data_parallel_mesh
from fedjax_exp.models import emnist

assert jax.local_device_count() == 4
train, _ = sample.load_data()
model = emnist.create_logistic_model()
out = {}
for name, settings in [("fed_avg", {}), ("scaffold", {"client_learning_rate": 0.1})]:
    states = []
    for sharded in (False, True):
        training = FederatedTraining(
            model, optimizers.adagrad(0.5), train, name=name, clients_per_round=6,
            client_batch_size=20, client_optimizer=optimizers.sgd(0.1), lanes=2, engine="scan",
            **settings)
        if sharded:
            training.use_mesh(data_parallel_mesh())
        state = training.init(jax.random.PRNGKey(0))
        stream = training.data_stream(1, 0)
        block = training.prepare([next(stream), next(stream)])
        state, _ = training.run_steps(state, block, None, 1)
        states.append(jax.device_get(state))
        out[name + "_lanes"] = training.planner.lanes
    diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), *states)
    out[name] = max(jax.tree_util.tree_leaves(diffs))
print(json.dumps(out))
"""


def test_clients_sharded_over_four_devices_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_VS_SINGLE],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["fed_avg_lanes"] == out["scaffold_lanes"] == 4  # 2 asked, a whole lane per device.
    assert out["fed_avg"] < 1e-6 and out["scaffold"] < 1e-6, out


BAD_SETTINGS = {
    "too-many-clients": (
        ["algorithm=fed_avg", "algorithm.clients_per_round=41"],
        "algorithm.clients_per_round=41 but the train data has 40 clients",
    ),
    "batch0": (
        ["algorithm=fed_prox", "algorithm.client_batch_size=0"],
        "algorithm.client_batch_size must be a positive integer, got 0",
    ),
    "noise-without-clip": (
        ["algorithm=dp_fed_avg", "algorithm.clip_norm=null"],
        "noise_multiplier=0.1 needs a clip_norm",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, case):
    overrides, message = BAD_SETTINGS[case]
    with pytest.raises(ConfigError, match=message):
        run(compose_config([*TINY, "trainer.steps=2", *overrides]), output_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_a_bad_setting_fails_in_one_line_from_the_command_line(tmp_path):
    overrides, message = BAD_SETTINGS["too-many-clients"]
    proc = run_py([*TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {message}: set algorithm.clients_per_round between 1 and 40"
    ]
    assert not (tmp_path / "run").exists()
