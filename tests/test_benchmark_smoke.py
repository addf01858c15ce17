"""Smoke tests of scripts/benchmark.py: its pieces on tiny data, and the shape of its output.

Timings are never asserted (they depend on the machine); structure, bookkeeping and the data
the benchmark feeds both libraries are.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

fedjax = pytest.importorskip("fedjax")
h5py = pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def bench(repo_root):
    scripts = str(repo_root / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import benchmark

    return benchmark


def _write_tff_h5(path, sizes, seed):
    """A TFF-layout file: examples/<writer>/pixels (n, 28, 28) float32 and label (n,)."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for i, n in enumerate(sizes):
            g = f.create_group(f"examples/f{i:04d}_0{i % 10}")
            g["pixels"] = rng.integers(0, 256, size=(n, 28, 28)).astype(np.float32) / 255
            g["label"] = rng.integers(0, 62, size=n).astype(np.int32)


@pytest.fixture(scope="module")
def tiny_femnist(tmp_path_factory):
    d = tmp_path_factory.mktemp("femnist")
    _write_tff_h5(d / "femnist_leaf_train.h5", [30, 5, 17, 40], seed=0)
    _write_tff_h5(d / "femnist_leaf_test.h5", [9, 13, 4], seed=1)
    return d


def test_load_tff_h5_applies_fedjax_preprocessing(bench, tiny_femnist):
    from bench import data

    cols = data.load_tff_h5(tiny_femnist / "femnist_leaf_train.h5")
    with h5py.File(tiny_femnist / "femnist_leaf_train.h5", "r") as f:
        names = sorted(f["examples"])
        pixels = np.concatenate([f["examples"][n]["pixels"][()] for n in names])
        labels = np.concatenate([f["examples"][n]["label"][()] for n in names])
    assert cols.client_ids == [n.encode() for n in names]
    assert cols.offsets.tolist() == [0, 30, 35, 52, 92]
    assert cols.x.shape == (92, 28, 28, 1) and cols.x.dtype == np.float32
    np.testing.assert_array_equal(cols.x[..., 0], 1 - pixels)
    np.testing.assert_array_equal(cols.y, labels)
    # FedJAX and fedjax_exp see the same clients and examples.
    theirs = data.fedjax_federated_data(cols)
    ours = data.ours_federated_data(cols)
    assert list(theirs.client_sizes()) == list(ours.client_sizes())
    cid = cols.client_ids[2]
    np.testing.assert_array_equal(
        theirs.get_client(cid).all_examples()["x"], ours.get_client(cid).all_examples()["x"]
    )


def test_missing_h5_is_one_clear_error(bench, tmp_path):
    from bench import data

    with pytest.raises(FileNotFoundError, match="--femnist-dir"):
        data.load_tff_h5(tmp_path / "nope.h5")


def test_synthetic_is_deterministic_and_sized(bench):
    from bench import data

    a = data.synthetic(num_clients=25, num_examples=1000, seed=3)
    b = data.synthetic(num_clients=25, num_examples=1000, seed=3)
    c = data.synthetic(num_clients=25, num_examples=1000, seed=4)
    assert a.num_examples == 1000 and a.num_clients == 25
    assert np.all(np.diff(a.offsets) >= 1)
    assert a.client_ids == sorted(a.client_ids) and len(set(a.client_ids)) == 25
    assert a.client_ids == b.client_ids
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)
    assert a.y.min() >= 0 and a.y.max() < data.NUM_CLASSES
    with pytest.raises(ValueError, match="num_examples >= num_clients"):
        data.synthetic(num_clients=10, num_examples=5)


def test_ratio_direction_and_goals(bench):
    from bench import sections

    rate = sections.make_row("data", "d", "c", "batches/s", 100.0, 1500.0, goal=10.0)
    assert rate["ratio"] == 15.0 and rate["meets_goal"] is True
    time_row = sections.make_row("e2e", "d", "c", "s", 30.0, 10.0, lower_is_better=True)
    assert time_row["ratio"] == 3.0 and time_row["meets_goal"] is None
    missing = sections.make_row("train", "d", "c", "steps/s", 5.0, None, goal=2.0)
    assert missing["ratio"] is None and missing["meets_goal"] is None
    assert sections.goal_for("train", "steps", "logistic", 8) == 3.0
    assert sections.goal_for("train", "steps", "logistic", 128) is None
    assert sections.goal_for("train", "steps", "stax_cnn", 8) == 2.0
    assert sections.goal_for("data", "shuffled", None, 128) == 10.0
    assert sections.goal_for("data", "padded", None, 8) is None


def test_timing_windows(bench):
    from bench import ours, timing

    assert timing.window_sizes(10, 3) == [4, 3, 3]
    assert timing.window_sizes(2, 5) == [1, 1]
    assert timing.window_sizes(0, 5) == []
    marks = [(0, 0.0), (50, 1.0), (100, 1.5), (150, 2.5), (160, 2.7)]
    rates = ours._window_rates(marks, 2)
    assert rates.samples == pytest.approx([100 / 1.5, 60 / 1.2])
    stream = timing.stream_rate(lambda: iter(range(7)), batches=5, repeats=3, warmup=1, fresh=True)
    assert len(stream.samples) == 3 and all(s > 0 for s in stream.samples)
    with pytest.raises(ValueError, match="batches must be a positive integer"):
        timing.stream_rate(lambda: iter(()), batches=0, repeats=1, warmup=0)


def test_within_noise(bench):
    from bench import sections

    # One seed each: 3 standard errors of a difference at p = 0.5 on 2048 examples ~ 0.047.
    assert sections.within_noise([0.50], [0.54]) is True
    assert sections.within_noise([0.50], [0.56]) is False
    assert sections.within_noise([], [0.5]) is None
    # Several seeds: the seed-to-seed spread is the noise (here std 0.05 per side, so 3
    # standard errors of the difference of two 3-seed means ~ 0.12).
    assert sections.within_noise([0.40, 0.45, 0.50], [0.50, 0.55, 0.60]) is True
    assert sections.within_noise([0.40, 0.45, 0.50], [0.60, 0.65, 0.70]) is False
    # Never below the evaluation's binomial noise, even when the seeds agree exactly.
    assert sections.within_noise([0.50, 0.50], [0.53, 0.53]) is True


def test_cli_rejects_bad_options(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--only", "bogus"])
    assert "unknown section bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "must be a positive integer" in capsys.readouterr().err
    args = bench.parse_args(["--quick", "--only", "data,train", "--steps", "7"])
    settings = bench.settings_from_args(args)
    assert args.only == ("data", "train") and settings.steps == 7 and settings.quick


def test_quick_run_structure(bench, tiny_femnist, tmp_path):
    from bench import report, sections

    settings = sections.Settings.quick_settings(
        batch_sizes=(8,),
        train_models=("logistic",),
        eval_models=("logistic",),
        synthetic_clients=6,
        synthetic_examples=300,
        steps=6,
        stream_batches=5,
    )
    result = bench.run_benchmark(
        settings,
        only=("data", "eval", "train", "memory"),
        femnist_dir=tiny_femnist,
        command="python scripts/benchmark.py --quick",
    )
    out = tmp_path / "r.json"
    report.write_json(result, out)
    loaded = json.loads(out.read_text())

    assert loaded["command"] == "python scripts/benchmark.py --quick"
    assert loaded["sections"] == ["data", "eval", "train", "memory"]
    for key in ("cpu", "cores", "backend", "versions", "load_average_start", "load_average_end"):
        assert key in loaded["machine"]
    assert loaded["machine"]["versions"]["fedjax"] == "0.0.17"
    assert [d["name"] for d in loaded["datasets"]] == ["femnist", "synthetic", "femnist_test"]
    assert [d["examples"] for d in loaded["datasets"]] == [92, 300, 26]

    rows = loaded["rows"]
    cases = [(r["section"], r["dataset"], r["case"]) for r in rows]
    assert cases == [
        ("data", "femnist", "shuffled batches, batch 8"),
        ("data", "femnist", "padded batches, batch 8"),
        ("data", "synthetic", "shuffled batches, batch 8"),
        ("data", "synthetic", "padded batches, batch 8"),
        ("eval", "test", "evaluate_model logistic, batch 128"),
        ("eval", "synthetic", "evaluate_model logistic, batch 128"),
        ("train", "femnist_leaf_train", "logistic, batch 8, 6 steps"),
        ("memory", "femnist_leaf_train", "load train+test h5, peak traced allocation"),
    ]
    for r in rows:
        assert set(r) >= {"unit", "fedjax", "fedjax_exp", "ratio", "goal", "meets_goal", "errors"}
        # Both sides measured every case, without errors.
        assert r["fedjax"] is not None and r["fedjax"] > 0, r
        assert r["fedjax_exp"] is not None and r["fedjax_exp"] > 0, r
        assert not r["errors"], r["errors"]
        expected = r["fedjax_exp"] / r["fedjax"]
        if r["lower_is_better"]:
            expected = 1 / expected
        assert math.isclose(r["ratio"], expected)
    data_rows = [r for r in rows if r["section"] == "data"]
    assert all(len(s) == settings.repeats for r in data_rows for s in r["samples"].values())
    # The evaluation counts real examples only: all 26 test examples fit in one batch of 128.
    assert rows[4]["examples"] == 26
    train = rows[6]
    assert train["steps"] == 6 and set(train["accuracy"]) == {"fedjax", "fedjax_exp"}
    assert 0.0 <= train["accuracy"]["fedjax"] <= 1.0
    assert loaded["missing"] == bench.missing_pieces(rows) == []

    text = report.print_report(result)
    assert "fedjax 0.0.17" in text and "shuffled batches, batch 8" in text
    page = report.markdown(result)
    assert "python scripts/benchmark.py --quick" in page
    assert page.count("\n| ") == len(rows) + 1  # header + one line per row


@pytest.mark.slow
def test_quick_end_to_end_section(bench, tiny_femnist):
    from bench import sections

    settings = sections.Settings.quick_settings(e2e_steps=3)
    result = bench.run_benchmark(settings, only=("e2e",), femnist_dir=tiny_femnist)
    wall, rss = result["rows"]
    assert wall["unit"] == "s" and rss["unit"] == "MiB"
    assert wall["fedjax"] > 0 and rss["fedjax"] > 0
    assert wall["lower_is_better"] and wall["command"].startswith("python run.py experiment=")


@pytest.fixture(scope="module")
def tiny_federated(tmp_path_factory):
    """Twelve writers: enough for FedAvg's 10 clients per round."""
    d = tmp_path_factory.mktemp("femnist_fed")
    sizes = [12, 3, 25, 7, 18, 10, 4, 30, 9, 15, 6, 21]
    _write_tff_h5(d / "femnist_leaf_train.h5", sizes, seed=2)
    _write_tff_h5(d / "femnist_leaf_test.h5", [9, 13, 4], seed=3)
    return d


def test_fed_schedule_is_whole_dispatches(bench):
    from bench import fed_section

    assert fed_section.aligned_schedule(300, 30, 5, 8) == (312, 32, 56)
    assert fed_section.aligned_schedule(24, 4, 5, 1) == (24, 4, 4)
    assert fed_section.aligned_schedule(5, 1, 2, 8) == (24, 8, 8)


def test_fed_noise_pools_seed_spread(bench):
    from bench import fed_section

    # One seed each on 10,000 examples: 3 binomial standard errors of the difference ~ 0.021.
    assert fed_section.within_noise([0.50], [0.52], 10_000) is True
    assert fed_section.within_noise([0.50], [0.53], 10_000) is False
    # The seed spread of the side that has several seeds is the noise of both (variance
    # 0.0025: 3 standard errors of the difference of a 3-seed and a 1-seed mean ~ 0.17).
    assert fed_section.within_noise([0.45, 0.50, 0.55], [0.62], 10_000) is True
    assert fed_section.within_noise([0.45, 0.50, 0.55], [0.70], 10_000) is False
    assert fed_section.within_noise([], [0.5], 100) is None


@pytest.mark.slow
def test_fed_section_quick(bench, tiny_federated):
    from bench import sections

    settings = sections.Settings.quick_settings(fed_sides=("run", "jit"), fed_rounds=5)
    result = bench.run_benchmark(settings, only=("fed",), femnist_dir=tiny_federated)
    run, jit = result["rows"]
    # 5 rounds, a quarter of them warm-up, grow to whole dispatches of 8 rounds: a warm-up of
    # 8 and 2 windows of 8.
    assert run["case"] == "FedAvg logistic, run.py (experiment loop), 24 rounds"
    assert jit["case"] == "FedAvg logistic, library, jit backend, 24 rounds"
    # FedJAX is measured once per model: both rows compare against the same figure.
    assert run["fedjax"] == jit["fedjax"] and run["samples"]["fedjax"] == jit["samples"]["fedjax"]
    for row in (run, jit):
        assert row["section"] == "fed" and row["unit"] == "rounds/s" and not row["errors"], row
        assert row["fedjax"] > 0 and row["fedjax_exp"] > 0
        assert math.isclose(row["ratio"], row["fedjax_exp"] / row["fedjax"])
        assert row["settings"]["server_optimizer"] == "adagrad"
        assert row["clients_per_round"] == 10 and row["client_batch_size"] == 10
        assert row["warmup_rounds"] == 8
        for side in ("fedjax", "fedjax_exp"):
            (accuracy,) = row["seed_accuracies"][side]
            assert 0.0 <= accuracy <= 1.0
    # The goal applies to the run.py path only.
    assert (run["goal"], jit["goal"]) == (20.0, None)


def test_fed_ceiling_counts_the_logistic_step_flops(bench):
    import bench_fed_ceiling

    result = bench_fed_ceiling.measure(clients=2, steps=3, batch_size=4, rounds=2, repeats=1)
    # Forward [4, 784] x [784, 62] and the weight gradient, 2 x 2 x 4 x 784 x 62 FLOP, plus
    # the softmax, bias and update arithmetic: XLA counts a little more than the two dots.
    dots = 2 * 2 * 4 * 784 * 62 / 1e6
    assert dots < result["mflop_per_local_step"] < 1.2 * dots
    assert result["rounds_per_s"] > 0
    expected = 2 * 3 * result["mflop_per_local_step"] * result["rounds_per_s"] / 1e3
    assert math.isclose(result["useful_gflop_per_s"], expected)
