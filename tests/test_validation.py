"""Config and data validation: every rule rejects its bad input with one ConfigError line that
names the key, the value and the fix; good configs (every option of every group) pass."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import pytest
from helpers import CONF_DIR, compose_config
from omegaconf import OmegaConf

from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.experiment import builders
from fedjax_exp.experiment.cli import precheck_overrides
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.validation import (
    check_data_features,
    check_writable_dir,
    metric_feature_keys,
    suggest_key,
    validate_config,
)

# Small synthetic data: 8 clients of ~12 examples, 10 classes.
SMALL = [
    "dataset=synthetic",
    "+dataset.loader.num_clients=8",
    "+dataset.loader.mean_client_size=12",
    "+dataset.loader.num_classes=10",
    "dataset.only_digits=true",
]


def make_config(*overrides: str):
    return compose_config(["logger=local", *overrides])


def rejects(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(make_config(*overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_default_config_passes_and_resolves():
    for key in ("final/test/loss", "final/per_client/test/accuracy/p50", "null"):
        validate_config(make_config(f"optimized_metric={key}"))
    resolved = validate_config(make_config())
    assert resolved["trainer"]["batch_size"] == 8
    assert "hydra" not in resolved
    assert resolved["metrics"]["loss"] == {"_target_": "fedjax_exp.core.metrics.CrossEntropyLoss"}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optimizer.learning_rate=0"], "optimizer.learning_rate must be a positive number, got 0"),
        (["optimizer=sgd", "optimizer.learning_rate=-0.1"], "got -0.1: set e.g."),
        (["optimizer.learning_rate=nan"], "got nan"),
        (["optimizer.learning_rate=inf"], "got inf"),
        (["optimizer.learning_rate=fast"], "got 'fast'"),
        (["trainer.batch_size=0"], "trainer.batch_size must be a positive integer, got 0"),
        (["trainer.batch_size=8.5"], "trainer.batch_size must be a positive integer, got 8.5"),
        (["trainer.batch_size=true"], "trainer.batch_size must be a positive integer, got True"),
        (["trainer.steps=-1"], "trainer.steps must be an integer >= 0, got -1"),
        (["trainer.eval_every=-5"], "trainer.eval_every must be an integer >= 0, got -5"),
        (["trainer.eval_batches.test=-1"], "trainer.eval_batches.test must be an integer >= 0"),
        (["trainer.keep_checkpoints=0"], "trainer.keep_checkpoints must be a positive integer"),
        (["trainer.example_buffer_size=0"], "trainer.example_buffer_size must be a positive"),
        (["trainer.per_client_max_clients=0"], "trainer.per_client_max_clients must be a posi"),
        (["seed=-1"], "seed must be an integer >= 0, got -1"),
        (["seed=abc"], "seed must be an integer >= 0, got 'abc'"),
        (
            ["optimizer/schedule=warmup_cosine", "trainer.steps=50"],
            "optimizer.schedule.warmup_steps=100 exceeds optimizer.schedule.decay_steps=50",
        ),
        (
            ["optimizer/schedule=exponential", "optimizer.schedule.transition_steps=0"],
            "optimizer.schedule.transition_steps must be a positive integer, got 0",
        ),
        (
            [
                "dataset=files",
                "dataset.loader.train_path=/nope/a.h5",
                "+dataset.loader.test_path=x",
            ],
            "dataset.loader.train_path='/nope/a.h5' does not exist",
        ),
        (["dataset=files"], "dataset.loader.test_path, dataset.loader.train_path are required"),
        (["model._target_=no_such_pkg.make_model"], "model._target_='no_such_pkg.make_model'"),
        (
            ["model._target_=fedjax_exp.models.emnist.no_such_model"],
            "No module named 'fedjax_exp.models.emnist.no_such_model'",
        ),
        (["trainer.resume=/no/such/run"], "trainer.resume='/no/such/run' does not exist"),
        # `latest` is resolved by run.py from the command line; in a config file it is an error.
        (["trainer.resume=latest"], "trainer.resume=latest works on the command line only"),
        (["+trainer.oops=${nope}"], "the config does not resolve"),
        (
            ["optimized_metric=final/test/nope"],
            "optimized_metric='final/test/nope' is not a final metric; use one of: "
            "final/test/accuracy, final/test/loss",
        ),
        (["optimized_metric=eval/test/accuracy"], "is not a final metric"),
        # Keys added with + are refused too (Hydra lets + add a key to a schema's node).
        (["+trainer.stepz=3"], "unknown config key 'trainer.stepz'; did you mean 'trainer.steps'?"),
        (["+trainer.eval_batches.tset=3"], "did you mean 'trainer.eval_batches.test'?"),
        (["+logger.wandb.colour=red"], "unknown config key 'logger.wandb.colour'"),
        (
            ["logger=wandb", "logger.wandb.mode=offlin"],
            "logger.wandb.mode must be one of offline, online, disabled, shared; got 'offlin'",
        ),
        (["trainer.steps_per_dispatch=0"], "trainer.steps_per_dispatch must be a positive integer"),
        (["trainer.data_parallel=yes"], "trainer.data_parallel must be one of auto, true, false"),
        (["trainer.compute_dtype=int8"], "trainer.compute_dtype must be one of float32, bfloat16"),
        (["trainer.steps=1.5"], "trainer.steps must be an integer >= 0, got 1.5"),
        (["logger.wandb=3"], "logger.wandb must be a mapping of its settings, got 3"),
        (
            ["trainer.vectorize.learning_rates=[]"],
            "trainer.vectorize.learning_rates must be null or a non-empty list of distinct "
            "positive numbers, got []",
        ),
        (["trainer.vectorize.seeds=[1,1]"], "list of distinct non-negative integers, got [1, 1]"),
        (["trainer.vectorize.learning_rates=[0.1,-0.1]"], "positive numbers, got [0.1, -0.1]"),
        (["trainer.vectorize.seeds=[-1]"], "distinct non-negative integers, got [-1]"),
    ],
)
def test_each_rule_rejects_with_one_line(overrides, expected):
    message = rejects(*overrides)
    assert expected in message, message


def test_messages_say_how_to_fix():
    assert "set e.g. optimizer.learning_rate=1e-3" in rejects("optimizer.learning_rate=0")
    assert rejects("trainer.batch_size=0").endswith("set e.g. trainer.batch_size=1")
    assert "add dataset.loader.test_path=VALUE" in rejects("dataset=files")
    assert "check the dotted path" in rejects("loss.fn._target_=nowhere.loss")
    assert "lower the warm-up or raise trainer.steps" in rejects(
        "optimizer/schedule=warmup_cosine", "trainer.steps=50"
    )


def test_a_plain_dict_without_sections_is_rejected():
    with pytest.raises(ConfigError, match="no trainer section: add trainer=default"):
        validate_config({"seed": 0})
    with pytest.raises(ConfigError, match="trainer.batch_size is required but not set"):
        validate_config({"seed": 0, "trainer": {"steps": 3}})


def test_exact_float_counts_become_integers_everywhere():
    cfg = make_config("trainer.steps=1e3", "seed=2.0", "optimizer/schedule=cosine")
    resolved = validate_config(cfg)
    assert resolved["trainer"]["steps"] == 1000 and type(resolved["trainer"]["steps"]) is int
    assert type(resolved["seed"]) is int
    # Written back into the config, so interpolations of it are integers too; other
    # interpolations stay as they are.
    assert type(cfg.trainer.steps) is int and type(cfg.algorithm.batch_size) is int
    assert OmegaConf.to_container(cfg.trainer)["compilation_cache"].startswith("${oc.env:")
    assert resolved["optimizer"]["schedule"]["decay_steps"] == 1000
    assert type(resolved["optimizer"]["schedule"]["decay_steps"]) is int


@pytest.mark.parametrize(
    "group", ["trainer", "logger", "debug", "experiment", "dataset", "model", "optimizer"]
)
def test_every_option_of_the_groups_composes_and_validates(group):
    needs = {"dataset=files": [f"dataset.loader.{s}_path={CONF_DIR}" for s in ("train", "test")]}
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        validate_config(make_config(f"{group}={option}", *needs.get(f"{group}={option}", [])))


@pytest.mark.parametrize(
    ("key", "known", "expected"),
    [
        # A common alias first: by spelling alone, lr is closest to b2.
        (
            "optimizer.lr",
            ["optimizer.learning_rate", "optimizer.b1", "optimizer.b2"],
            "optimizer.learning_rate",
        ),
        ("optimizer.beta2", ["optimizer.learning_rate", "optimizer.b2"], "optimizer.b2"),
        ("trainer.epochs", ["trainer.steps", "trainer.eval_every"], "trainer.steps"),
        ("trainer.stpes", ["trainer.steps", "trainer.seed"], "trainer.steps"),
        ("trainr.steps", ["trainer", "trainer.steps", "seed"], "trainer.steps"),
        ("logger.wandb.colour", ["logger.wandb.mode", "logger.wandb.tags"], None),
    ],
)
def test_suggest_key(key, known, expected):
    assert suggest_key(key, known) == expected


def precheck(capsys, *overrides: str) -> str:
    """The one error line (and exit status 1) of the pre-check run.py does before Hydra."""
    with pytest.raises(SystemExit) as info:
        precheck_overrides(str(CONF_DIR), "config", list(overrides))
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_the_schemas_refuse_bad_overrides_before_hydra_runs(capsys):
    assert precheck(capsys, "optimizer.lr=0.1") == (
        "error: unknown config key 'optimizer.lr'; did you mean 'optimizer.learning_rate'?"
    )
    assert precheck(capsys, "trainer.stepz=3").endswith("did you mean 'trainer.steps'?")
    assert precheck(capsys, "trainer.progress_bar=maybe") == (
        "error: trainer.progress_bar must be true or false, got 'maybe'"
    )
    assert precheck(capsys, "trainer.vectorize.seeds=[1,x]") == (
        "error: trainer.vectorize.seeds[1] must be an integer, got 'x'"
    )
    # A swept key is checked with its first value.
    assert "true or false" in precheck(capsys, "-m", "trainer.progress_bar=maybe,true")
    precheck_overrides(str(CONF_DIR), "config", ["trainer.steps=1e3", "-m", "seed=0,1"])


def test_a_target_whose_module_fails_to_import(tmp_path, monkeypatch):
    (tmp_path / "broken_dep_mod.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "raising_mod.py").write_text("raise RuntimeError('bad module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    message = rejects("model._target_=broken_dep_mod.make")
    assert message.startswith("model._target_='broken_dep_mod.make' cannot be imported")
    assert "No module named 'no_such_dependency_xyz'" in message
    message = rejects("model._target_=raising_mod.make")
    assert "RuntimeError: bad module" in message
    for name in ("broken_dep_mod", "raising_mod"):
        sys.modules.pop(name, None)


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "new" / "run") is None
    assert list((tmp_path / "new" / "run").iterdir()) == []  # The probe file is gone.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    problem = check_writable_dir(blocker / "run")
    assert problem is not None and problem.startswith(("FileExistsError", "NotADirectoryError"))


# ---- the loaded data against the built model ------------------------------------------------


def built(*overrides: str):
    cfg = make_config(*SMALL, *overrides)
    return builders.build_model(cfg), builders.build_datasets(cfg)


def test_synthetic_data_satisfies_metrics_full():
    model, (train, test) = built(
        "metrics=full", "loss=hinge", "metrics.per_domain_accuracy.num_domains=2"
    )
    keys = {
        name: metric_feature_keys(metric, f"metrics.{name}")
        for name, metric in model.eval_metrics.items()
    }
    assert keys["per_domain_accuracy"] == [
        ("metrics.per_domain_accuracy.base.target_key", "y"),
        ("metrics.per_domain_accuracy.domain_id_key", "domain_id"),
    ]
    assert keys["loss"] == [("metrics.loss.loss_fn.target_key", "y")]  # Hinge: a wrapped loss.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_data_features(model, {"train": train, "test": test})


def without(fd: InMemoryFederatedData, feature: str):
    return fd.preprocess_batch(lambda batch: {k: v for k, v in batch.items() if k != feature})


def test_missing_domain_id_names_the_feature_and_the_fix():
    model, (train, test) = built("metrics=full")
    with pytest.raises(ConfigError) as info:
        check_data_features(model, {"test": without(test, "domain_id")})
    assert str(info.value) == (
        "metrics.per_domain_accuracy reads the feature 'domain_id' "
        "(metrics.per_domain_accuracy.domain_id_key), but the test data has only ['x', 'y']: "
        "use a dataset with domain ids (dataset=sample, emnist or synthetic) or metrics without "
        "per-domain accuracy (metrics=default)"
    )


def test_num_domains_must_cover_the_domain_ids():
    model, (train, test) = built("metrics=full", "dataset.loader.num_domains=5")
    assert int(test.columns["domain_id"].max()) == 4
    with pytest.raises(ConfigError) as info:
        check_data_features(model, {"test": test})
    assert str(info.value) == (
        "metrics.per_domain_accuracy.num_domains=2 does not cover the test data's domain ids "
        "0..4 (feature 'domain_id'): set metrics.per_domain_accuracy.num_domains=5"
    )
    model, _ = built("metrics=full", "metrics.per_domain_accuracy.num_domains=5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_data_features(model, {"test": test})


def test_a_domain_without_examples_is_a_warning():
    # The metric counts 3 domains; the data (its loader told so directly) has domains 0 and 1.
    model, (_, test) = built(
        "metrics=full", "dataset.num_domains=3", "dataset.loader.num_domains=2"
    )
    assert model.eval_metrics["per_domain_accuracy"].num_domains == 3
    with pytest.warns(RuntimeWarning, match=r"no examples of domain\(s\) \[2\]: .*=2 if"):
        check_data_features(model, {"test": test})


def test_domain_ids_from_batches_when_the_store_has_no_such_column():
    _, (_, test) = built()
    model, _ = built("metrics=full", "metrics.per_domain_accuracy.domain_id_key=dom")
    # A batch preprocessor derives the ids: they exist only in batches, not as a column.
    relabeled = test.preprocess_batch(lambda b: {**b, "dom": b["domain_id"] + 7})
    assert "dom" not in relabeled.columns
    with pytest.raises(ConfigError, match=r"domain ids 7\.\.8 \(feature 'dom'\): .*=9$"):
        check_data_features(model, {"test": relabeled})
    negative = test.preprocess_batch(lambda b: {**b, "dom": b["domain_id"] - 1})
    with pytest.raises(ConfigError, match=r"ids -1\.\.0 .*=1 and use non-negative domain ids$"):
        check_data_features(model, {"test": negative})
    floats = test.preprocess_batch(lambda b: {**b, "dom": b["domain_id"].astype(np.float32)})
    with pytest.raises(ConfigError, match="needs integer domain ids, but the test data's 'dom'"):
        check_data_features(model, {"test": floats})


def test_target_keys_of_metrics_and_loss():
    model, (train, test) = built("metrics=accuracy", "+metrics.accuracy.target_key=label")
    with pytest.raises(ConfigError) as info:
        check_data_features(model, {"test": test})
    assert str(info.value) == (
        "metrics.accuracy reads the feature 'label' (metrics.accuracy.target_key), but the test "
        "data has only ['domain_id', 'x', 'y']: set metrics.accuracy.target_key to one of them"
    )
    model, (train, test) = built("loss.fn.target_key=label", "metrics=accuracy")
    check_data_features(model, {"test": test})  # The loss reads only the train split.
    with pytest.raises(ConfigError, match=r"^loss\.fn reads the feature 'label' .* train data"):
        check_data_features(model, {"train": train, "test": test})


def test_non_finite_features_are_reported_with_their_first_row():
    model, (_, test) = built()
    x = test.columns["x"].copy()
    x[5, 3, 2, 0] = np.inf
    x[9, 0, 0, 0] = np.nan
    bad = InMemoryFederatedData.from_columns(
        list(test.client_ids()), test.offsets, {**test.columns, "x": x}
    )
    with pytest.raises(ConfigError) as info:
        check_data_features(model, {"test": bad})
    assert str(info.value) == (
        "the test data has NaN or infinite values in feature 'x' (first at row 5): clean or "
        "filter the data"
    )


def test_empty_data_is_reported():
    model, _ = built()
    empty = InMemoryFederatedData.from_columns(
        [b"a"], np.array([0, 0]), {"x": np.zeros((0, 28, 28, 1), np.float32)}
    )
    with pytest.raises(ConfigError, match="the test data has no examples"):
        check_data_features(model, {"test": empty})


def test_synthetic_with_metrics_full_runs_end_to_end(tmp_path):
    from fedjax_exp.experiment import run

    cfg = make_config(
        *SMALL,
        "metrics=full",
        "trainer.steps=2",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "trainer.eval_batch_size=16",
        "trainer.eval_batches.train=1",
        "trainer.eval_batches.test=1",
        "trainer.checkpoint_every=0",
        "trainer.progress_bar=false",
    )
    run(cfg, output_dir=tmp_path)
    final = json.loads((tmp_path / "status.json").read_text())["final"]
    assert {"final/test/per_domain_accuracy/0", "final/test/per_domain_accuracy/1"} <= set(final)
    _, test = builders.build_datasets(cfg)
    ids = test.columns["domain_id"]
    # Each client's examples carry its domain: client i is in domain i % 2.
    assert ids.dtype == np.int32 and set(np.unique(ids)) == {0, 1}
    sizes = [n for _, n in test.client_sizes()]
    np.testing.assert_array_equal(ids, np.repeat(np.arange(len(sizes)) % 2, sizes))
