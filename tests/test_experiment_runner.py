"""In-process runs of composed configs: every group option builds and trains a few steps,
the seed fixes the numbers, and W&B failing to start falls back to local logging."""

from __future__ import annotations

import json
import pathlib
import warnings

import pytest
from helpers import CONF_DIR, compose_config

from fedjax_exp.experiment import ConfigError, run
from fedjax_exp.experiment.writers import read_metrics

CONF = CONF_DIR

TINY = [
    "logger=local",
    "trainer.steps=2",
    "trainer.log_every=1",
    "trainer.eval_every=2",
    "trainer.eval_batch_size=64",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=1",
    "trainer.checkpoint_every=0",
    "trainer.progress_bar=false",
]


def make_config(*overrides: str):
    return compose_config([*TINY, *overrides])


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def sample_files() -> list[str]:
    from fedjax_exp.datasets import sample

    paths = sample.paths()
    return [
        f"dataset.loader.train_path={paths['train']}",
        f"dataset.loader.test_path={paths['test']}",
    ]


# Extra overrides some options need to run here (no network, a few steps).
NEEDS = {
    "dataset=files": sample_files,
    "optimizer/schedule=warmup_cosine": lambda: ["optimizer.schedule.warmup_steps=1"],
    # Fewer clients: SCAFFOLD keeps a control variate per client (clients x parameters).
    "dataset=synthetic": lambda: ["+dataset.loader.num_clients=12"],
}
# Options that download data: composed and validated only.
DOWNLOADS = ["dataset=emnist", "dataset=emnist_digits"]
GROUPS = ["model", "loss", "optimizer", "optimizer/schedule", "metrics", "dataset"]
GROUPS += ["algorithm", "trainer", "logger", "debug"]


def _runnable(group: str) -> list[str]:
    return [f"{group}={o}" for o in options(group) if f"{group}={o}" not in DOWNLOADS]


# Every option of every group appears in at least one run; each run combines one option of
# every group (cycling through the shorter lists, each group shifted by its position so equal-
# length groups do not always pair the same options), so a handful of runs covers them all.
_WIDTH = max(len(_runnable(g)) for g in GROUPS)
COMBOS = [
    [_runnable(g)[(i + k) % len(_runnable(g))] for k, g in enumerate(GROUPS)] for i in range(_WIDTH)
]


def test_combos_cover_every_option():
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and not p.is_symlink()}
    assert groups - {"hparams_search", "hydra"} <= {g.split("/")[0] for g in GROUPS}
    covered = {o for combo in COMBOS for o in combo} | set(DOWNLOADS)
    assert covered == {f"{g}={o}" for g in GROUPS for o in options(g)}
    assert len(COMBOS) == len(options("model"))


@pytest.mark.parametrize("download_option", DOWNLOADS)
def test_download_options_compose_and_validate(download_option):
    from fedjax_exp.experiment.validation import validate_config

    resolved = validate_config(make_config(download_option))
    assert resolved["dataset"]["loader"]["only_digits"] == download_option.endswith("_digits")
    assert resolved["dataset"]["num_classes"] == (10 if download_option.endswith("_digits") else 62)


@pytest.mark.parametrize("combo", COMBOS, ids=[c[0] for c in COMBOS])
def test_every_group_option_composes_and_trains(tmp_path, combo):
    extra = [o for option in combo for o in NEEDS.get(option, list)()]
    # The options first, then TINY again: debug presets must not lengthen the run.
    cfg = make_config(*combo, *extra, *(o for o in TINY if not o.startswith("logger=")))
    value = run(cfg, output_dir=tmp_path)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "completed"
    assert status["step"] == cfg.trainer.steps == 2
    final = status["final"]
    assert value == final[cfg.optimized_metric]
    assert 0.0 <= final["final/test/accuracy"] <= 1.0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/test/accuracy" in r] == [2]
    if "metrics=full" in combo:
        assert {"final/test/top5_accuracy", "final/test/per_domain_accuracy/0"} <= set(final)
        assert final["final/test/top5_accuracy"] >= final["final/test/accuracy"]
    assert cfg.logger.wandb is None or "logger=wandb" in combo
    if cfg.logger.wandb is not None:
        assert len(list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def final_metrics(tmp_path: pathlib.Path, *overrides: str) -> tuple[list[dict], dict]:
    run(make_config(*overrides), output_dir=tmp_path)
    records = [
        {k: v for k, v in r.items() if k != "time"}
        for r in read_metrics(tmp_path / "metrics.jsonl")
    ]
    return records, json.loads((tmp_path / "status.json").read_text())["final"]


def test_the_seed_fixes_every_number(tmp_path):
    a = final_metrics(tmp_path / "a", "seed=5", "trainer.steps=3")
    b = final_metrics(tmp_path / "b", "seed=5", "trainer.steps=3")
    c = final_metrics(tmp_path / "c", "seed=6", "trainer.steps=3")
    assert a == b
    assert a[0][0]["train/loss"] != c[0][0]["train/loss"]


def test_per_client_evaluation_summarises_each_test_client(tmp_path):
    _, final = final_metrics(tmp_path, "trainer.per_client_eval=true")
    prefix = "final/per_client/test/accuracy"
    from fedjax_exp.datasets import sample

    _, test = sample.load_data()
    assert final["final/per_client/test/num_clients"] == sum(
        1 for _, n in test.client_sizes() if n > 0
    )
    assert final[f"{prefix}/min"] <= final[f"{prefix}/p10"] <= final[f"{prefix}/p50"]
    assert final[f"{prefix}/p50"] <= final[f"{prefix}/p90"] <= final[f"{prefix}/max"]


def test_wandb_failing_to_start_falls_back_to_local_logging(tmp_path, monkeypatch):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("no W&B today")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = make_config("logger=wandb")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg, output_dir=tmp_path)
    assert any("W&B failed to start" in str(w.message) for w in caught)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"
    assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "wandb").exists()


def test_optimized_metric_must_be_a_final_metric(tmp_path):
    with pytest.raises(ConfigError, match="optimized_metric='final/test/nope'"):
        run(make_config("optimized_metric=final/test/nope"), output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("num_domains", [2, 3])
def test_full_metrics_on_synthetic_data_report_each_domain(tmp_path, num_domains):
    cfg = make_config("metrics=full", "dataset=synthetic", f"dataset.num_domains={num_domains}")
    assert cfg.metrics.per_domain_accuracy.num_domains == num_domains  # Follows the dataset.
    run(cfg, output_dir=tmp_path)
    final = json.loads((tmp_path / "status.json").read_text())["final"]
    domains = sorted(k for k in final if k.startswith("final/test/per_domain_accuracy/"))
    assert domains == [f"final/test/per_domain_accuracy/{d}" for d in range(num_domains)]
    assert all(0.0 <= final[k] <= 1.0 for k in domains)


def test_a_feature_missing_from_the_data_fails_before_training(tmp_path):
    cfg = make_config("metrics=full", "metrics.per_domain_accuracy.domain_id_key=writer")
    with pytest.raises(ConfigError, match="reads the feature 'writer'"):
        run(cfg, output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_more_domains_in_the_data_than_the_metric_covers_fails_before_training(tmp_path):
    cfg = make_config(
        "metrics=full",
        "dataset=synthetic",
        "dataset.num_domains=3",
        "metrics.per_domain_accuracy.num_domains=2",
    )
    with pytest.raises(ConfigError, match=r"set metrics.per_domain_accuracy.num_domains=3"):
        run(cfg, output_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cleanup_errors_never_hide_the_runs_own_error(caplog):
    from fedjax_exp.experiment.runner import _end_run

    done = []

    def broken():
        raise OSError("W&B service gone")

    # The run failed: its error propagates (here: none raised), the clean-up error is logged.
    with caplog.at_level("WARNING"):
        _end_run([broken, lambda: done.append(1)], True)
    assert done == [1]
    assert "clean-up failed (OSError: W&B service gone)" in caplog.text
    # The run succeeded: the first clean-up error is raised once every action ran.
    with pytest.raises(OSError, match="W&B service gone"):
        _end_run([broken, lambda: done.append(2)], False)
    assert done == [1, 2]


def test_diverged_survives_pickling_with_its_step_and_message():
    # Parallel launchers (joblib, submitit) send a failed job's exception back pickled; the
    # runner also rewrites the message to name the last good checkpoint.
    import pickle

    from fedjax_exp.experiment.loop import Diverged

    error = Diverged("non-finite loss at step 7", 7)
    error.args = (f"{error}; last good checkpoint: none",)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is Diverged
    assert copy.step == 7
    assert str(copy) == "non-finite loss at step 7; last good checkpoint: none"


def _h5_with_an_empty_client(
    path: pathlib.Path, label: int = 3, side: int = 28, nan_at: int | None = None
) -> str:
    import h5py
    import numpy as np

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for client, n in (("f0000_00", 20), ("f0001_00", 0), ("f0002_00", 12)):
            group = f.create_group(f"examples/{client}")
            pixels = rng.random((n, side, side), dtype=np.float32)
            if nan_at is not None and n:
                pixels[nan_at, 3, 4] = np.nan
            group["pixels"] = pixels
            group["label"] = np.full((n,), label, dtype=np.int32)
    return str(path)


def test_empty_clients_stop_the_run_unless_dropped_as_the_message_says(tmp_path):
    data = _h5_with_an_empty_client(tmp_path / "data.h5")
    files = ["dataset=files", f"dataset.loader.train_path={data}"]
    files.append(f"dataset.loader.test_path={data}")
    with pytest.raises(ValueError, match="dataset.loader.empty_clients=drop"):
        run(make_config(*files), output_dir=tmp_path / "refused")
    run(make_config(*files, "dataset.loader.empty_clients=drop"), output_dir=tmp_path / "run")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "completed"


@pytest.mark.parametrize(
    "label, needle", [(100, "set dataset.num_classes=101"), (-1, "non-negative")]
)
def test_labels_outside_the_classes_fail_before_training(tmp_path, label, needle):
    data = _h5_with_an_empty_client(tmp_path / "data.h5", label=label)
    overrides = ["dataset=files", f"dataset.loader.train_path={data}"]
    overrides += [f"dataset.loader.test_path={data}", "dataset.loader.empty_clients=drop"]
    with pytest.raises(ConfigError, match=f"dataset.num_classes=62.*{needle}"):
        run(make_config(*overrides), output_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_readme_form_swaps_the_haiku_modules_kwargs(tmp_path):
    # README: model=haiku model.module=... '~model.module_kwargs' '+model.module_kwargs={...}'
    cfg = make_config(
        "model=haiku",
        "model.module=haiku.nets.MLP",
        "~model.module_kwargs",
        "+model.module_kwargs={output_sizes:[16,62],activate_final:false}",
    )
    assert dict(cfg.model.module_kwargs) == {"output_sizes": [16, 62], "activate_final": False}
    import jax

    from fedjax_exp.experiment import builders

    params = builders.build_model(cfg).init(jax.random.PRNGKey(0))
    shapes = sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(params))
    assert shapes == [(16,), (16, 62), (62,), (784, 16)]  # The swapped-in MLP's layers.
    run(cfg, output_dir=tmp_path)
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "completed"


def test_examples_of_another_shape_fail_before_training_naming_the_setting(tmp_path):
    data = _h5_with_an_empty_client(tmp_path / "data.h5", side=32)
    overrides = ["dataset=files", f"dataset.loader.train_path={data}"]
    overrides += [f"dataset.loader.test_path={data}", "dataset.loader.empty_clients=drop"]
    with pytest.raises(ConfigError, match=r"shape \[32, 32, 1\].*input_shape=\[28, 28, 1\]"):
        run(make_config(*overrides), output_dir=tmp_path / "run")


def test_nan_in_the_data_fails_before_training_naming_the_feature(tmp_path):
    data = _h5_with_an_empty_client(tmp_path / "data.h5", nan_at=5)
    overrides = ["dataset=files", f"dataset.loader.train_path={data}"]
    overrides += [f"dataset.loader.test_path={data}", "dataset.loader.empty_clients=drop"]
    with pytest.raises(ConfigError, match="NaN or infinite values in feature 'x'"):
        run(make_config(*overrides), output_dir=tmp_path / "run")


def test_validation_split_is_evaluated_at_the_end_and_leaves_test_alone(tmp_path):
    _, plain = final_metrics(tmp_path / "plain")
    _, held = final_metrics(tmp_path / "held", "dataset.validation.mode=examples")
    assert set(held) == set(plain) | {"final/validation/accuracy", "final/validation/loss"}
    assert 0.0 <= held["final/validation/accuracy"] <= 1.0
    # Test is the same split either way (training differs, so only its presence is compared).
    assert "final/test/accuracy" in held


def test_bad_validation_fraction_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="fraction"):
        run(
            make_config("dataset.validation.mode=clients", "dataset.validation.fraction=1.5"),
            output_dir=tmp_path,
        )
