"""training.Logger: JSON-lines records written and read back, no TensorFlow."""

from __future__ import annotations

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.training import Logger, read_metrics
from fedjax_exp.training.logging import METRICS_FILE_NAME


def test_records_are_written_one_json_line_each_and_read_back(tmp_path):
    logger = Logger(tmp_path / "run")
    logger.log("test_eval", "accuracy", jnp.array(0.8125, jnp.float32), 10)
    logger.log("test_eval", "loss", np.float64(1.5), 10)
    logger.log(".", "mean_round_duration_sec", 0.25, 10)
    logger.log("test_eval", "accuracy", np.array(0.875, np.float32), 20)
    logger.log("train", "count", np.int32(7), 20)
    logger.log("train", "histogram", np.array([[1, 2], [3, 4]], np.int64), 20)

    path = tmp_path / "run" / METRICS_FILE_NAME
    assert logger.path == str(path)
    lines = path.read_text().splitlines()
    assert len(lines) == 6
    assert json.loads(lines[0]) == {
        "writer": "test_eval",
        "metric": "accuracy",
        "round": 10,
        "value": 0.8125,
    }
    assert read_metrics(tmp_path / "run") == {
        ("test_eval", "accuracy"): {10: 0.8125, 20: 0.875},
        ("test_eval", "loss"): {10: 1.5},
        (".", "mean_round_duration_sec"): {10: 0.25},
        ("train", "count"): {20: 7},
        ("train", "histogram"): {20: [[1, 2], [3, 4]]},
    }
    assert isinstance(read_metrics(tmp_path / "run")[("train", "count")][20], int)


def test_a_second_logger_appends_and_the_latest_record_of_a_round_wins(tmp_path):
    Logger(tmp_path).log("eval", "loss", 2.0, 3)
    Logger(tmp_path).log("eval", "loss", 4.0, 4)
    # A resumed run replays round 4: its record is the one read back.
    Logger(tmp_path).log("eval", "loss", 3.5, 4)
    assert len((tmp_path / METRICS_FILE_NAME).read_text().splitlines()) == 3
    assert read_metrics(tmp_path) == {("eval", "loss"): {3: 2.0, 4: 3.5}}


def test_non_numeric_values_are_logged_but_not_written(tmp_path, caplog):
    logger = Logger(tmp_path)
    with caplog.at_level(logging.INFO, logger="fedjax_exp.training.logging"):
        logger.log("eval", "note", "hello", 1)
        logger.log("eval", "nothing", None, 1)
        logger.log("eval", "loss", float("nan"), 1)
    assert "round 1 eval: note = hello" in caplog.text
    metrics = read_metrics(tmp_path)
    assert list(metrics) == [("eval", "loss")]
    assert np.isnan(metrics[("eval", "loss")][1])


def test_without_root_dir_only_the_python_logger_gets_records(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logger = Logger()
    assert logger.path is None
    with caplog.at_level(logging.INFO, logger="fedjax_exp.training.logging"):
        logger.log("eval", "loss", 0.5, 2)
    assert "round 2 eval: loss = 0.5" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_read_metrics_tolerates_a_torn_last_line_only(tmp_path):
    assert read_metrics(tmp_path) == {}
    Logger(tmp_path).log("eval", "loss", 1.0, 1)
    path = tmp_path / METRICS_FILE_NAME
    with open(path, "a") as f:
        f.write('{"writer": "eval", "metric": "lo')  # Killed mid-write.
    assert read_metrics(tmp_path) == {("eval", "loss"): {1: 1.0}}
    path.write_text('not json\n{"writer": "eval", "metric": "loss", "round": 1, "value": 1}\n')
    with pytest.raises(ValueError, match="line 1 is not a JSON record"):
        read_metrics(tmp_path)
