"""The run record: what a run dir was started with, checked before the dir is resumed, and
how trainer.resume=latest finds the newest run of a config."""

from __future__ import annotations

import json
import os

import pytest

from fedjax_exp import compare
from fedjax_exp.experiment import ConfigError, run_files, run_record

CONFIG = {
    "seed": 0,
    "model": {"_target_": "fedjax_exp.models.emnist.create_logistic_model"},
    "optimizer": {"learning_rate": 0.001},
    "logger": {"wandb": {"mode": "offline"}},
    "metrics": {"accuracy": {"_target_": "fedjax_exp.metrics.Accuracy"}},
    "trainer": {"steps": 20, "batch_size": 8, "log_every": 10, "eval_batches": {"test": 1}},
}


def changed(**changes):
    config = json.loads(json.dumps(CONFIG))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return config


def test_settings_that_keep_the_trajectory_may_change():
    config = changed(
        trainer__steps=40,
        trainer__log_every=5,
        trainer__eval_batches={"test": 16, "train": 2},
        logger={"wandb": {"mode": "disabled"}},
        metrics={},
    )
    assert run_record.differences(CONFIG, config) == []


def test_settings_that_define_the_run_are_each_reported():
    config = changed(seed=5, optimizer__learning_rate=0.5, trainer__batch_size=64)
    config["model"]["hidden_units"] = 128
    assert run_record.differences(CONFIG, config) == [
        "model.hidden_units: (unset) -> 128",
        "optimizer.learning_rate: 0.001 -> 0.5",
        "seed: 0 -> 5",
        "trainer.batch_size: 8 -> 64",
    ]


def test_check_resumable_names_the_differences_and_the_ways_out(tmp_path):
    run_record.check_resumable(tmp_path, CONFIG)  # No record yet: nothing to check.
    run_record.write(tmp_path, CONFIG, ["seed=0"])
    run_record.check_resumable(tmp_path, changed(trainer__steps=100))
    with pytest.raises(ConfigError) as e:
        run_record.check_resumable(tmp_path, changed(seed=1))
    message = str(e.value)
    assert "seed: 0 -> 1" in message
    assert "new hydra.run.dir" in message and f"trainer.resume={tmp_path}" in message


def test_a_broken_record_is_one_clear_error(tmp_path):
    (tmp_path / run_files.RUN_CONFIG_FILE).write_text('{"config": ')
    with pytest.raises(ConfigError, match="cannot read .*run_config.json"):
        run_record.check_resumable(tmp_path, CONFIG)


def test_compare_reads_the_record_not_hydras_latest_config(tmp_path):
    # Hydra rewrites .hydra/ on every invocation, also one the runner then rejects.
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 99\n")
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- seed=99\n")
    run_record.write(tmp_path, CONFIG, ["seed=0"])
    config, overrides = compare.read_config(tmp_path)
    assert config["seed"] == 0 and config["optimizer.learning_rate"] == 0.001
    assert overrides == ["seed=0"]


def test_latest_run_is_the_newest_dir_of_the_same_config(tmp_path):
    def started(name: str, config: dict, at: int):
        run_record.write(tmp_path / "outputs" / name, config, [])
        os.utime(tmp_path / "outputs" / name / run_files.RUN_CONFIG_FILE, (at, at))

    pattern = str(tmp_path / "outputs" / "*")
    assert run_record.latest_run(pattern, CONFIG) is None
    started("a", CONFIG, 100)
    started("b", changed(trainer__steps=100), 200)  # The same run, to train longer.
    started("c", changed(seed=1), 300)  # Another run.
    (tmp_path / "outputs" / "d").mkdir()
    (tmp_path / "outputs" / "d" / run_files.RUN_CONFIG_FILE).write_text("{")  # Unreadable.
    assert run_record.latest_run(pattern, CONFIG) == tmp_path / "outputs" / "b"
    assert run_record.latest_run(pattern, changed(seed=1)) == tmp_path / "outputs" / "c"
    assert run_record.latest_run(pattern, changed(seed=2)) is None
