"""Vectorized sweeps: trials trained in one vmapped program equal trials trained alone."""

from __future__ import annotations

import json
import logging
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    RecordingWriter,
    compose_config,
    dropout_logistic_model,
    random_image_clients,
    run_py,
)

from fedjax_exp.core import optimizers
from fedjax_exp.experiment import ConfigError, algorithms, loop, run, vectorized
from fedjax_exp.experiment.writers import read_metrics
from fedjax_exp.models import emnist


@pytest.fixture(scope="module")
def data():
    return random_image_clients(num_clients=5, examples=12)


# The dropout model consumes each step's rng: equality with it also checks the trials' keys.
@pytest.fixture(scope="module", params=["logistic", "dropout"])
def model(request):
    if request.param == "dropout":
        return dropout_logistic_model()
    return emnist.create_logistic_model(only_digits=True)


def _make_algorithm(model, data):
    return lambda optimizer: algorithms.CentralizedTraining(model, optimizer, data, 4, 2, 8)


def _train_alone(model, data, lr, seed, steps):
    """A lone run exactly as the runner does it: keys from the seed, the jitted step."""
    alg = _make_algorithm(model, data)(optimizers.adam(lr))
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    state = alg.init(init_rng)
    stream = alg.data_stream(seed, 0)
    losses = []
    for k in range(1, steps + 1):
        state, scalars = alg.step(state, next(stream), jax.random.fold_in(train_rng, k))
        losses.append(float(scalars["loss"]))
    return state, losses


def _train_sweep(training, steps, log_every, steps_per_dispatch=1):
    """The sweep through the experiment loop; returns (states, [(step, {name: (T,)})])."""
    init_rng, train_rng = vectorized.trial_keys(training.trials)
    writers = [RecordingWriter() for _ in training.trials]
    settings = loop.LoopSettings(
        steps=steps,
        log_every=log_every,
        eval_every=0,
        checkpoint_every=0,
        progress_bar=False,
        steps_per_dispatch=steps_per_dispatch,
    )
    states, _, diverged = loop.train(
        training,
        training.init(init_rng),
        start_step=0,
        seed=0,
        rng=train_rng,
        settings=settings,
        writers=writers,
        evaluator=None,
        checkpointer=None,
        clock=loop.Clock(),
    )
    assert diverged == {}
    logged = [
        (step, {"loss": np.asarray([w.records[i][1]["train/loss"] for w in writers])})
        for i, (step, _) in enumerate(writers[0].records)
    ]
    return states, logged


# --- trials -----------------------------------------------------------------------------------


def test_expand_trials_is_the_product_of_learning_rates_and_seeds():
    trials = vectorized.expand_trials([0.1, 0.01], [3, 4], 1e-3, 0)
    assert [(t.learning_rate, t.seed, t.name) for t in trials] == [
        (0.1, 3, "lr=0.1,seed=3"),
        (0.1, 4, "lr=0.1,seed=4"),
        (0.01, 3, "lr=0.01,seed=3"),
        (0.01, 4, "lr=0.01,seed=4"),
    ]
    only_lr = vectorized.expand_trials([1e-3, 3e-3], None, 0.5, 7)
    assert [(t.learning_rate, t.seed, t.name) for t in only_lr] == [
        (1e-3, 7, "lr=0.001"),
        (3e-3, 7, "lr=0.003"),
    ]
    only_seeds = vectorized.expand_trials(None, [1, 2], 0.5, 7)
    assert [(t.learning_rate, t.seed, t.name) for t in only_seeds] == [
        (0.5, 1, "seed=1"),
        (0.5, 2, "seed=2"),
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("learning_rates=[]", "learning_rates must be null or a non-empty list"),
        ("learning_rates=[0.1,0.1]", "list of distinct positive numbers"),
        ("learning_rates=[-0.1]", "list of distinct positive numbers"),
        ("seeds=[1.5]", "seeds[0] must be an integer"),
        ("seeds=[-1]", "list of distinct non-negative integers"),
        ("client_learning_rates=[0.0]", "client_learning_rates must be null or a non-empty list"),
    ],
)
def test_the_config_rejects_bad_lists(override, message):
    import yaml
    from omegaconf import OmegaConf

    from fedjax_exp.experiment.validation import validate_config

    cfg = OmegaConf.to_container(compose_config(), resolve=False)
    key, _, value = override.partition("=")
    cfg["trainer"]["vectorize"][key] = yaml.safe_load(value)  # Past Hydra's own type check.
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(cfg)


# --- learning rate in the optimizer state -----------------------------------------------------


def test_learning_rate_in_state_is_bitwise_the_plain_optimizer(model):
    params = model.init(jax.random.PRNGKey(0))
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.3) + p, params)
    plain = optimizers.adam(3e-3)
    injected = vectorized.learning_rate_in_state(optimizers.adam, 3e-3)
    state_a, state_b = plain.init(params), injected.init(params)
    assert float(state_b.learning_rate) == np.float32(3e-3)
    pa, pb = params, params
    for _ in range(3):
        state_a, pa = jax.jit(plain.apply)(grads, state_a, pa)
        state_b, pb = jax.jit(injected.apply)(grads, state_b, pb)
    for a, b in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- vectorized training vs trials alone ------------------------------------------------------


@pytest.mark.parametrize(
    ("lrs", "seeds"), [([1e-3, 1e-2, 1e-1], None), ([1e-2, 5e-2], [0, 5]), (None, [1, 2, 3])]
)
def test_vectorized_trials_equal_trials_alone(model, data, lrs, seeds):
    trials = vectorized.expand_trials(lrs, seeds, 2e-2, 0)
    training = vectorized.VectorizedTraining(_make_algorithm(model, data), optimizers.adam, trials)
    states, logged = _train_sweep(training, 6, 3)
    assert [s for s, _ in logged] == [3, 6]
    for i, trial in enumerate(trials):
        alone, losses = _train_alone(model, data, trial.learning_rate, trial.seed, 6)
        for a, b in zip(
            jax.tree_util.tree_leaves(alone.params),
            jax.tree_util.tree_leaves(training.eval_params(states, i)),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(logged[0][1]["loss"][i], np.mean(losses[:3]), rtol=1e-5)
        np.testing.assert_allclose(logged[1][1]["loss"][i], np.mean(losses[3:]), rtol=1e-5)


@pytest.mark.parametrize("seeds", [None, [0, 5]])
def test_multi_step_equals_the_plain_vectorized_step(model, data, seeds):
    """K steps per dispatch (chunks cut at the logging interval) and batches gathered on the
    device give the plain one-step-per-dispatch sweep's states and logs, bit for bit."""
    trials = vectorized.expand_trials([1e-2, 5e-2], seeds, None, 0)

    def train(steps_per_dispatch):
        training = vectorized.VectorizedTraining(
            _make_algorithm(model, data), optimizers.adam, trials
        )
        states, logged = _train_sweep(training, 11, 5, steps_per_dispatch)
        return jax.device_get(states), logged

    plain_states, plain_log = train(1)
    states, logged = train(4)
    assert [s for s, _ in logged] == [s for s, _ in plain_log] == [5, 10, 11]
    for (_, a), (_, b) in zip(logged, plain_log, strict=True):
        np.testing.assert_array_equal(a["loss"], b["loss"])
    for a, b in zip(
        jax.tree_util.tree_leaves(states), jax.tree_util.tree_leaves(plain_states), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_initial_states_are_bitwise_those_of_lone_runs(model, data):
    trials = vectorized.expand_trials([1e-3, 1e-2], [0, 9], None, 0)
    training = vectorized.VectorizedTraining(_make_algorithm(model, data), optimizers.adam, trials)
    states = training.init(vectorized.trial_keys(trials)[0])
    np.testing.assert_array_equal(
        np.asarray(states.opt_state.learning_rate), np.float32([1e-3, 1e-3, 1e-2, 1e-2])
    )
    for i, trial in enumerate(trials):
        init_rng = jax.random.split(jax.random.PRNGKey(trial.seed))[0]
        expected = model.init(init_rng)
        for a, b in zip(
            jax.tree_util.tree_leaves(expected),
            jax.tree_util.tree_leaves(training.eval_params(states, i)),
            strict=True,
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_trials_with_different_seeds_get_their_own_batches(model, data):
    trials = vectorized.expand_trials(None, [0, 1], 1e-2, 0)
    training = vectorized.VectorizedTraining(_make_algorithm(model, data), optimizers.adam, trials)
    stacked = next(training.data_stream(0, 2))
    alg = _make_algorithm(model, data)(optimizers.adam(1e-2))
    for i, seed in enumerate(training.seeds):
        np.testing.assert_array_equal(stacked["x"][i], next(alg.data_stream(seed, 2))["x"])
    assert not np.array_equal(stacked["y"][0], stacked["y"][1]) or not np.array_equal(
        stacked["x"][0], stacked["x"][1]
    )


def test_schedule_cannot_be_vectorized():
    cfg = compose_config(["optimizer/schedule=cosine"])
    with pytest.raises(ConfigError, match="use optimizer/schedule=constant"):
        vectorized.make_optimizer_factory(cfg)


# --- the runner's sweep mode ------------------------------------------------------------------

TINY = [
    "logger=local",
    "trainer.steps=4",
    "trainer.batch_size=4",
    "trainer.log_every=2",
    "trainer.eval_every=4",
    "trainer.eval_batch_size=64",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=1",
    "trainer.checkpoint_every=0",
    "trainer.progress_bar=false",
]


def _config(*overrides: str):
    return compose_config([*TINY, *overrides])


def test_a_sweep_logs_each_trial_like_a_lone_run(tmp_path, caplog):
    from fedjax_exp.experiment import runner

    cfg = _config("trainer.vectorize.learning_rates=[0.001,0.01]", "trainer.per_client_eval=true")
    with caplog.at_level(logging.INFO, logger=runner.__name__):
        best = run(cfg, output_dir=tmp_path / "sweep")
    sweep_log = [r.getMessage() for r in caplog.records if r.name == runner.__name__]
    status = json.loads((tmp_path / "sweep" / "status.json").read_text())
    assert status["status"] == "completed"
    assert [t["name"] for t in status["trials"]] == ["lr=0.001", "lr=0.01"]
    finals = []
    for lr, name in [(0.001, "lr=0.001"), (0.01, "lr=0.01")]:
        trial_dir = tmp_path / "sweep" / "trials" / name
        records = read_metrics(trial_dir / "metrics.jsonl")
        lone_dir = tmp_path / f"alone-{lr}"
        lone_cfg = _config(f"optimizer.learning_rate={lr}", "trainer.per_client_eval=true")
        run(lone_cfg, output_dir=lone_dir)
        lone = read_metrics(lone_dir / "metrics.jsonl")
        assert [r["step"] for r in records] == [r["step"] for r in lone]
        for mine, theirs in zip(records, lone, strict=True):
            assert set(mine) == set(theirs)
            for key, value in theirs.items():
                if key != "time":
                    assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        trial_status = json.loads((trial_dir / "status.json").read_text())
        assert trial_status["status"] == "completed"
        finals.append(trial_status["final"]["final/test/accuracy"])
        # trainer.per_client_eval applies to every trial, as to a lone run.
        assert "final/per_client/test/accuracy/mean" in trial_status["final"]
        assert any(f"trial {name}: final/test/accuracy=" in m for m in sweep_log)
        import yaml

        trial_cfg = yaml.safe_load((trial_dir / ".hydra" / "config.yaml").read_text())
        assert trial_cfg["optimizer"]["learning_rate"] == lr
        assert "vectorize" not in trial_cfg["trainer"]
    assert best == max(finals)
    assert "steps 1-4, batch 4; cpu backend" in sweep_log[0]
    assert "2 trials in one program (lr=0.001, lr=0.01)" in sweep_log[0]


def test_a_sweep_honours_the_progress_bar(tmp_path, capsys):
    sweep = ["trainer.vectorize.learning_rates=[0.001,0.01]"]
    run(_config(*sweep, "trainer.progress_bar=true"), output_dir=tmp_path / "bar")
    assert "train: 100%" in capsys.readouterr().err
    run(_config(*sweep), output_dir=tmp_path / "no-bar")
    assert "train:" not in capsys.readouterr().err


def test_an_interrupted_sweep_resumes_to_the_uninterrupted_results(tmp_path):
    sweep = ("trainer.vectorize.learning_rates=[0.001,0.01]", "trainer.checkpoint_every=2")
    run(_config(*sweep), output_dir=tmp_path / "whole")
    run(_config(*sweep, "trainer.steps=2"), output_dir=tmp_path / "resumed")
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["2"]
    run(_config(*sweep), output_dir=tmp_path / "resumed")  # Picks up at step 2.
    for name in ("lr=0.001", "lr=0.01"):
        whole, resumed = (tmp_path / d / "trials" / name for d in ("whole", "resumed"))
        expected = [
            {k: v for k, v in r.items() if k != "time"}
            for r in read_metrics(whole / "metrics.jsonl")
        ]
        got = [
            {k: v for k, v in r.items() if k != "time"}
            for r in read_metrics(resumed / "metrics.jsonl")
        ]
        assert [r["step"] for r in expected] == [2, 4, 4, 4]  # Train logs, eval, final.
        assert got == expected  # Bit for bit: the same programs from the same state.
        status = json.loads((resumed / "status.json").read_text())
        assert status["status"] == "completed" and status["step"] == 4
        assert status["final"] == json.loads((whole / "status.json").read_text())["final"]


def test_seed_sweep_rejects_seed_dependent_data(tmp_path):
    cfg = _config("dataset=synthetic", "trainer.vectorize.seeds=[0,1]")
    with pytest.raises(ConfigError, match="dataset config depends on seed"):
        run(cfg, output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.skipif(shutil.which("wandb") is None, reason="wandb CLI not found")
def test_each_trial_is_its_own_wandb_run_and_a_diverging_trial_fails_alone(tmp_path):
    from test_run_wandb import of_type, wandb_records

    run_dir = tmp_path / "sweep"
    sweep = ["optimizer=sgd", "trainer.vectorize.learning_rates=[0.1,1e38]", "logger=wandb"]
    overrides = [*TINY, *sweep, "trainer.checkpoint_every=2", f"hydra.run.dir={run_dir}"]
    proc = run_py(overrides, unset=["WANDB_MODE"])
    assert proc.returncode == 0, proc.stderr
    for name, ok in [("lr=0.1", True), ("lr=1e+38", False)]:
        trial_dir = run_dir / "trials" / name
        status = json.loads((trial_dir / "status.json").read_text())
        assert status["status"] == ("completed" if ok else "failed")
        assert ok or "non-finite train/loss" in status["error"]
        records = wandb_records(trial_dir)  # Its own offline run, written live.
        (run,) = of_type(records, "run")
        assert run["config"]["update"]["optimizer"]["learning_rate"] == float(name[3:])
        assert run["display_name"].endswith(f"/{name}")
        history = {}
        for h in of_type(records, "history"):
            history.setdefault(h["step"]["num"], {}).update(h["item"])
        local = read_metrics(trial_dir / "metrics.jsonl")
        assert sorted(history) == sorted({r["step"] for r in local})
        (exit_record,) = of_type(records, "exit")
        assert (exit_record.get("exit_code", 0) == 0) == ok
    sweep_status = json.loads((run_dir / "status.json").read_text())
    assert sweep_status["status"] == "completed"
    assert [t["error"] is None for t in sweep_status["trials"]] == [True, False]


# --- federated sweeps: server x client learning rates ---------------------------------------

FED_TINY = [
    *TINY,
    "trainer.steps=2",
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "algorithm=fed_avg",
    "algorithm.clients_per_round=3",
    "optimizer=adam",
]


def test_expand_trials_crosses_client_learning_rates():
    trials = vectorized.expand_trials([0.1, 1.0], None, 0.5, 3, [0.01, 0.03], 0.2)
    assert [t.name for t in trials] == [
        "lr=0.1,client_lr=0.01",
        "lr=0.1,client_lr=0.03",
        "lr=1,client_lr=0.01",
        "lr=1,client_lr=0.03",
    ]
    assert [(t.learning_rate, t.client_learning_rate, t.seed) for t in trials[1:3]] == [
        (0.1, 0.03, 3),
        (1.0, 0.01, 3),
    ]
    (only_client,) = vectorized.expand_trials(None, None, 0.5, 0, [0.01], 0.2)
    assert (only_client.name, only_client.learning_rate) == ("client_lr=0.01", 0.5)


def test_a_federated_grid_equals_its_trials_alone(tmp_path):
    grid = (
        "trainer.vectorize.learning_rates=[0.01,0.03]",
        "trainer.vectorize.client_learning_rates=[0.1,0.3]",
    )
    run(_config(*FED_TINY, *grid), output_dir=tmp_path / "grid")
    status = json.loads((tmp_path / "grid" / "status.json").read_text())
    names = [t["name"] for t in status["trials"]]
    assert names == [
        "lr=0.01,client_lr=0.1",
        "lr=0.01,client_lr=0.3",
        "lr=0.03,client_lr=0.1",
        "lr=0.03,client_lr=0.3",
    ]
    finals = set()
    for (lr, client_lr), name in zip(
        [(0.01, 0.1), (0.01, 0.3), (0.03, 0.1), (0.03, 0.3)], names, strict=True
    ):
        trial_dir = tmp_path / "grid" / "trials" / name
        lone_dir = tmp_path / f"alone-{name}"
        lone = _config(
            *FED_TINY,
            f"optimizer.learning_rate={lr}",
            f"algorithm.client_optimizer.learning_rate={client_lr}",
        )
        run(lone, output_dir=lone_dir)
        mine = read_metrics(trial_dir / "metrics.jsonl")
        theirs = read_metrics(lone_dir / "metrics.jsonl")
        assert [r["step"] for r in mine] == [r["step"] for r in theirs] == [1, 2, 2, 2]
        for a, b in zip(mine, theirs, strict=True):
            assert set(a) == set(b)
            for key, value in b.items():
                if key != "time":
                    assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
        finals.add(mine[-1]["final/test/loss"])
        import yaml

        trial_cfg = yaml.safe_load((trial_dir / ".hydra" / "config.yaml").read_text())
        assert trial_cfg["optimizer"]["learning_rate"] == lr
        assert trial_cfg["algorithm"]["client_optimizer"]["learning_rate"] == client_lr
    assert len(finals) == 4  # Every trial trained with its own pair of rates.


def test_client_learning_rates_need_a_federated_algorithm(tmp_path):
    cfg = _config("trainer.vectorize.client_learning_rates=[0.1,0.3]")
    with pytest.raises(ConfigError, match="needs a federated algorithm"):
        run(cfg, output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_federated_seed_sweep_draws_each_seeds_clients(tmp_path):
    sweep = ("trainer.vectorize.seeds=[0,1]", "trainer.eval_every=0")
    run(_config(*FED_TINY, *sweep), output_dir=tmp_path / "seeds")
    for seed in (0, 1):
        run(
            _config(*FED_TINY, "trainer.eval_every=0", f"seed={seed}"),
            output_dir=tmp_path / f"{seed}",
        )
        mine = read_metrics(tmp_path / "seeds" / "trials" / f"seed={seed}" / "metrics.jsonl")
        theirs = read_metrics(tmp_path / f"{seed}" / "metrics.jsonl")
        assert [r["step"] for r in mine] == [r["step"] for r in theirs] == [1, 2, 2]
        for a, b in zip(mine, theirs, strict=True):
            for key, value in b.items():
                if key != "time":
                    assert a[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (seed, key)
