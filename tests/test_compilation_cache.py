"""trainer.compilation_cache: a second run loads every program from the cache, same results."""

from __future__ import annotations

import logging
import os

from helpers import TINY_RUN, run_py

from fedjax_exp.experiment import compilation_cache
from fedjax_exp.experiment.writers import read_metrics


def _entries(cache):
    return sorted(p.name for p in cache.iterdir() if p.name.endswith("-cache"))


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "time"} for r in records]


def test_a_second_run_compiles_nothing_and_gives_the_same_results(tmp_path):
    cache = tmp_path / "xla"
    runs = []
    for name in ("first", "second"):
        out = tmp_path / name
        proc = run_py([*TINY_RUN, f"trainer.compilation_cache={cache}", f"hydra.run.dir={out}"])
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(read_metrics(out / "metrics.jsonl"))
        if name == "first":
            first_entries = _entries(cache)
            assert first_entries, "the first run stored no compiled program"
    # Every program of the second run was found in the cache: nothing new was stored.
    assert _entries(cache) == first_entries
    assert _without_time(runs[0]) == _without_time(runs[1])


def test_null_turns_the_cache_off(tmp_path):
    out = tmp_path / "run"
    env = {"FEDJAX_EXP_COMPILATION_CACHE": str(tmp_path / "unused")}
    proc = run_py([*TINY_RUN, "trainer.compilation_cache=null", f"hydra.run.dir={out}"], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "unused").exists()


def test_an_unwritable_directory_only_costs_the_speed_up(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING):
        assert compilation_cache.enable(blocker / "xla") is None
    assert "compilation cache" in caplog.text and "not used" in caplog.text
    assert compilation_cache.enable(None) is None
    assert compilation_cache.enable(os.devnull + "/sub") is None
