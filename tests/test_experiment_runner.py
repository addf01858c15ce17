"""In-process runs of composed configs: every group option builds and trains a few steps,
the seed fixes the numbers, and W&B failing to start falls back to local logging."""

from __future__ import annotations

import json
import pathlib
import warnings

import pytest
from hydra import compose, initialize_config_dir

from fedjax_exp.experiment import ConfigError, run
from fedjax_exp.experiment.writers import read_metrics

CONF = pathlib.Path(__file__).resolve().parents[1] / "conf"

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
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def sample_files() -> list[str]:
    from fedjax_exp.datasets import sample

    paths = sample.paths()
    return [f"dataset.loader.train_path={paths['train']}", f"dataset.loader.test_path={paths['test']}"]


# group option -> extra overrides it needs to run here (no network, a few steps).
NEEDS = {
    ("dataset", "files"): sample_files,
    ("optimizer/schedule", "warmup_cosine"): lambda: ["optimizer.schedule.warmup_steps=1"],
    ("debug", "profile"): lambda: ["trainer.steps=2", "trainer.eval_every=0"],
}
# Options that download data: composed and validated only.
DOWNLOADS = {("dataset", "emnist"), ("dataset", "emnist_digits")}

CASES = [
    (group, option)
    for group in ["model", "loss", "optimizer", "optimizer/schedule", "metrics", "dataset"]
    + ["algorithm", "trainer", "logger", "debug"]
    for option in options(group)
]


def test_cases_cover_every_option():
    groups = {p.name for p in CONF.iterdir() if p.is_dir() and not p.is_symlink()}
    assert groups - {"hparams_search", "hydra"} <= {g.split("/")[0] for g, _ in CASES}
    assert ("model", "haiku_cnn") in CASES and ("loss", "hinge") in CASES


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_trains(tmp_path, group, option):
    extra = NEEDS.get((group, option), list)()
    # debug presets set their own trainer/logger: apply them after (on top of) TINY.
    cfg = make_config(f"{group}={option}", *extra)
    if (group, option) in DOWNLOADS:
        from fedjax_exp.experiment.validation import validate_config

        resolved = validate_config(cfg)
        assert resolved["dataset"]["loader"]["only_digits"] == (option == "emnist_digits")
        return
    value = run(cfg, output_dir=tmp_path)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "completed"
    assert status["step"] == cfg.trainer.steps
    final = status["final"]
    assert value == final[cfg.optimized_metric]
    assert 0.0 <= final["final/test/accuracy"] <= 1.0
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "train/loss" in r] == list(
        range(cfg.trainer.log_every, cfg.trainer.steps + 1, cfg.trainer.log_every)
    )
    if group == "metrics" and option == "full":
        assert {"final/test/top5_accuracy", "final/test/per_domain_accuracy/0"} <= set(final)
        assert final["final/test/top5_accuracy"] >= final["final/test/accuracy"]


def final_metrics(tmp_path: pathlib.Path, *overrides: str) -> tuple[list[dict], dict]:
    run(make_config(*overrides), output_dir=tmp_path)
    records = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path / "metrics.jsonl")]
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
