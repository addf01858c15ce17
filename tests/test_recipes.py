"""The recipes in experiments/: they compose to their settings (the seed chapter's, FedJAX's
fed_avg experiment flags, Reddi et al.'s FedAdam) and they run."""

from __future__ import annotations

import json
import pathlib

import helpers
import pytest

# The seed chapter: Adam 1e-3, batch 8, client buffer 16, example buffer 1024, seed 0,
# evaluation on the first 16 padded test batches of 128 examples.
RECIPES = {
    "seed_logistic": ("logistic", 5000),
    "seed_mlp": ("mlp", 5000),
    "seed_cnn": ("cnn", 1000),
}


# Federated recipes: model, server optimizer settings, client SGD learning rate, client batch.
# 10 clients per round, 1 epoch, 1500 rounds, seed 0 for all.
FED_RECIPES = {
    "fedavg_emnist_logistic": (
        "logistic",
        {"_target_": "fedjax_exp.core.optimizers.adagrad", "learning_rate": 1.0, "eps": 1e-7},
        0.31622777,
        10,
    ),
    "fedavg_emnist_conv": (
        "haiku_cnn",
        {
            "_target_": "fedjax_exp.core.optimizers.adam",
            "learning_rate": 1.0,
            "b1": 0.9,
            "b2": 0.99,
            "eps": 0.01,
        },
        0.001,
        10,
    ),
    "fedadam_emnist": (
        "haiku_cnn",
        {
            "_target_": "fedjax_exp.core.optimizers.adam",
            "learning_rate": 10**-2.5,
            "b1": 0.9,
            "b2": 0.99,
            "eps": 1e-4,
        },
        10**-1.5,
        20,
    ),
}


def compose_config(repo_root: pathlib.Path, overrides: list[str]):
    return helpers.compose_config(overrides)


def test_every_recipe_is_tested(repo_root):
    names = sorted(p.stem for p in (repo_root / "experiments").glob("*.yaml"))
    assert names == sorted([*RECIPES, *FED_RECIPES])


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_composes_to_the_seed_settings(repo_root, name):
    model, steps = RECIPES[name]
    cfg = compose_config(repo_root, [f"experiment={name}"])
    # The recipe selects the same groups as the equivalent command line would.
    reference = compose_config(
        repo_root,
        [f"model={model}", "optimizer=adam", "optimizer.learning_rate=1e-3", "loss=cross_entropy"],
    )
    assert cfg.model == reference.model
    assert cfg.optimizer == reference.optimizer
    assert cfg.loss == reference.loss
    assert cfg.optimizer.learning_rate == 1e-3
    assert cfg.optimizer.schedule == {}  # optimizer/schedule=constant: no schedule.
    assert cfg.seed == 0
    assert cfg.task_name == name
    trainer = cfg.trainer
    assert (trainer.steps, trainer.batch_size) == (steps, 8)
    assert (trainer.client_buffer_size, trainer.example_buffer_size) == (16, 1024)
    assert (trainer.eval_batch_size, trainer.eval_batches.test) == (128, 16)
    # The last periodic evaluation falls on the last step: it is the seed chapter's figure.
    assert steps % trainer.eval_every == 0
    assert cfg.dataset.name == "sample"


def test_recipe_command_line_overrides_win(repo_root):
    cfg = compose_config(
        repo_root, ["experiment=seed_cnn", "trainer.steps=7", "optimizer.learning_rate=0.01"]
    )
    assert (cfg.trainer.steps, cfg.optimizer.learning_rate) == (7, 0.01)
    assert cfg.model == compose_config(repo_root, ["model=cnn"]).model


def test_recipe_with_shared_files_composes(repo_root):
    shared = repo_root.parent / "shared" / "data" / "femnist"
    cfg = compose_config(
        repo_root,
        [
            "experiment=seed_logistic",
            "dataset=files",
            f"dataset.loader.train_path={shared / 'femnist_leaf_train.h5'}",
            f"dataset.loader.test_path={shared / 'femnist_leaf_test.h5'}",
        ],
    )
    assert cfg.dataset.name == "files"
    assert cfg.trainer.steps == 5000


def run_recipes(repo_root: pathlib.Path, sweep_dir: pathlib.Path, *overrides: str):
    args = [
        "-m",
        "experiment=" + ",".join(sorted(RECIPES)),
        "trainer.steps=3",
        "trainer.log_every=1",
        "trainer.eval_every=3",
        "trainer.eval_batches.train=1",
        "trainer.eval_batches.test=1",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
        "logger=local",
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = helpers.run_py(args, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_recipe_jobs(sweep_dir: pathlib.Path) -> None:
    for num, name in enumerate(sorted(RECIPES)):
        job = sweep_dir / str(num)
        status = json.loads((job / "status.json").read_text())
        assert status["status"] == "completed", (name, status)
        assert status["step"] == 3
        lines = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3]
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        assert f"experiment={name}" in overrides


def test_each_recipe_runs_a_few_steps(repo_root, tmp_path):
    sweep_dir = tmp_path / "recipes"
    run_recipes(repo_root, sweep_dir)
    check_recipe_jobs(sweep_dir)


@pytest.mark.slow
@pytest.mark.shared_data
def test_each_recipe_runs_on_the_shared_files(repo_root, tmp_path, shared_femnist_dir):
    sweep_dir = tmp_path / "recipes"
    run_recipes(
        repo_root,
        sweep_dir,
        "dataset=files",
        f"dataset.loader.train_path={shared_femnist_dir / 'femnist_leaf_train.h5'}",
        f"dataset.loader.test_path={shared_femnist_dir / 'femnist_leaf_test.h5'}",
    )
    check_recipe_jobs(sweep_dir)


@pytest.mark.parametrize("name", sorted(FED_RECIPES))
def test_federated_recipe_composes_to_its_settings(repo_root, name):
    model, server, client_lr, batch_size = FED_RECIPES[name]
    cfg = compose_config(repo_root, [f"experiment={name}"])
    assert cfg.model == compose_config(repo_root, [f"model={model}"]).model
    assert cfg.loss == compose_config(repo_root, ["loss=cross_entropy"]).loss
    for key, value in server.items():
        assert cfg.optimizer[key] == pytest.approx(value) if key != "_target_" else value, key
    assert cfg.optimizer.schedule == {}
    algorithm = cfg.algorithm
    assert algorithm.name == "fed_avg"
    assert algorithm._target_ == "fedjax_exp.experiment.federated.FederatedTraining"
    assert algorithm.client_optimizer._target_ == "fedjax_exp.core.optimizers.sgd"
    assert algorithm.client_optimizer.learning_rate == pytest.approx(client_lr, rel=1e-7)
    assert (algorithm.clients_per_round, algorithm.client_batch_size) == (10, batch_size)
    assert (algorithm.client_epochs, algorithm.client_steps) == (1, None)
    assert (cfg.trainer.steps, cfg.seed, cfg.task_name) == (1500, 0, name)
    assert cfg.trainer.steps % cfg.trainer.eval_every == 0
    assert cfg.dataset.name == "sample"


def test_each_federated_recipe_runs_two_rounds(repo_root, tmp_path):
    sweep_dir = tmp_path / "fed_recipes"
    names = sorted(FED_RECIPES)
    proc = helpers.run_py(
        [
            "-m",
            "experiment=" + ",".join(names),
            "trainer.steps=2",
            "trainer.log_every=1",
            "trainer.eval_every=2",
            "trainer.eval_batches.train=1",
            "trainer.eval_batches.test=1",
            "trainer.checkpoint_every=0",
            "trainer.progress_bar=false",
            # Two local steps per client keep the CNN recipes' rounds short.
            "++algorithm.client_steps=2",
            "logger=local",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for num, name in enumerate(names):
        job = sweep_dir / str(num)
        status = json.loads((job / "status.json").read_text())
        assert status["status"] == "completed" and status["step"] == 2, (name, status)
        records = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "train/loss" in r] == [1, 2], name
        final = [r for r in records if "final/test/accuracy" in r]
        assert len(final) == 1 and 0.0 <= final[0]["final/test/accuracy"] <= 1.0, name
        assert f"experiment={name}" in (job / ".hydra" / "overrides.yaml").read_text()
