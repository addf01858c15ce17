"""run_federated_experiment: rounds, the evaluation and checkpoint schedule, resume (after an
exception and after SIGKILL) equal to an uninterrupted run, FedJAX 0.0.17's loop semantics,
bad input. A tiny federated algorithm (a weighted mean of noisy client targets) keeps it fast;
it uses each client's data, example count and rng, so a wrong client, round or key shows."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.core import client_samplers, dataclasses
from fedjax_exp.core.federated_algorithm import FederatedAlgorithm
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.training import (
    EvaluationFn,
    FederatedExperimentConfig,
    TrainClientsEvaluationFn,
    load_latest_checkpoint,
    read_metrics,
    run_federated_experiment,
    set_tf_cpu_only,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_CLIENTS_PER_ROUND = 3
SEED = 17


@dataclasses.dataclass
class TinyState:
    params: dict
    rounds_done: jax.Array


def _client_data() -> dict[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    sizes = [1, 4, 9, 2, 7, 3, 12, 5]
    return {
        f"client_{i}".encode(): {"x": rng.normal(size=(n, 3)).astype(np.float32)}
        for i, n in enumerate(sizes)
    }


def _fd() -> InMemoryFederatedData:
    return InMemoryFederatedData(_client_data())


def _sampler(fd=None) -> client_samplers.UniformGetClientSampler:
    return client_samplers.UniformGetClientSampler(
        fd if fd is not None else _fd(), NUM_CLIENTS_PER_ROUND, SEED
    )


def _tiny_algorithm(crash_at_round: int | None = None, kill_at_round: int | None = None):
    """Each client pulls w towards its data mean plus rng noise; the server moves half way to
    the example-weighted mean. Optionally fails (exception or SIGKILL) in a given round."""

    def init(w):
        return TinyState(params={"w": w}, rounds_done=jnp.zeros((), jnp.int32))

    def apply(state, clients):
        round_num = int(state.rounds_done) + 1
        if round_num == crash_at_round:
            raise RuntimeError(f"crash in round {round_num}")
        if round_num == kill_at_round:
            os.kill(os.getpid(), signal.SIGKILL)
        w = state.params["w"]
        total, weight, diagnostics = jnp.zeros_like(w), 0.0, {}
        for client_id, dataset, rng in clients:
            x = jnp.asarray(dataset.all_examples()["x"])
            delta = w - (jnp.mean(x, axis=0) + 0.1 * jax.random.normal(rng, w.shape))
            total, weight = total + len(dataset) * delta, weight + len(dataset)
            diagnostics[client_id] = {"delta_l2_norm": jnp.linalg.norm(delta)}
        new_state = TinyState(params={"w": w - 0.5 * total / weight}, rounds_done=round_num)
        return new_state.replace(rounds_done=jnp.asarray(round_num, jnp.int32)), diagnostics

    return FederatedAlgorithm(init, apply)


def _init_state() -> TinyState:
    return _tiny_algorithm().init(jnp.array([1.0, -2.0, 0.5], jnp.float32))


def _reference(num_rounds: int) -> tuple[list[TinyState], list[list]]:
    """States after rounds 0..num_rounds, and each round's clients, by calling apply by hand
    on the sampler's round r (FedJAX's rounds count from 1)."""
    algorithm, sampler = _tiny_algorithm(), _sampler()
    states, clients_per_round = [_init_state()], [[]]
    for round_num in range(1, num_rounds + 1):
        sampler.set_round_num(round_num)
        clients = sampler.sample()
        states.append(algorithm.apply(states[-1], clients)[0])
        clients_per_round.append(clients)
    return states, clients_per_round


def _assert_states_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _recording_fns(evaluation_base=EvaluationFn, train_clients_base=TrainClientsEvaluationFn):
    """A recording EvaluationFn and TrainClientsEvaluationFn (subclassing the given bases, so
    FedJAX's loop accepts them too)."""

    class RecordingEval(evaluation_base):
        def __init__(self, metrics: bool = True):
            self.calls, self._metrics = [], metrics

        def __call__(self, state, round_num):
            self.calls.append((round_num, np.asarray(state.params["w"])))
            if not self._metrics:
                return {}
            return {"w0": float(state.params["w"][0]), "round": round_num}

    class RecordingTrainClientsEval(train_clients_base):
        def __init__(self):
            self.calls = []

        def __call__(self, state, round_num, train_clients):
            ids = [client_id for client_id, _, _ in train_clients]
            sizes = [len(dataset) for _, dataset, _ in train_clients]
            self.calls.append((round_num, np.asarray(state.params["w"]), ids, sizes))
            return {"num_examples": sum(sizes)}

    return RecordingEval, RecordingTrainClientsEval


def _run(root, num_rounds, algorithm=None, sampler=None, **config_kwargs):
    RecordingEval, RecordingTrainClientsEval = _recording_fns()
    periodic = {"test": RecordingEval(), "train": RecordingTrainClientsEval()}
    final = {"final": RecordingEval()}
    state = run_federated_experiment(
        algorithm or _tiny_algorithm(),
        _init_state(),
        sampler or _sampler(),
        FederatedExperimentConfig(str(root), num_rounds, **config_kwargs),
        periodic_eval_fn_map=periodic,
        final_eval_fn_map=final,
    )
    return state, periodic, final


def test_rounds_and_evaluation_schedule_with_the_right_params(tmp_path):
    states, clients = _reference(7)
    state, periodic, final = _run(tmp_path, 7, eval_frequency=3)
    _assert_states_equal(state, states[7])
    # Periodic evaluation after the first round and every third: state.params of that round.
    assert [r for r, _ in periodic["test"].calls] == [1, 3, 6]
    for round_num, w in periodic["test"].calls:
        np.testing.assert_array_equal(w, states[round_num].params["w"])
    # Train-clients evaluation gets exactly the clients the round trained on.
    for round_num, w, ids, sizes in periodic["train"].calls:
        np.testing.assert_array_equal(w, states[round_num].params["w"])
        assert ids == [c[0] for c in clients[round_num]]
        assert sizes == [len(c[1]) for c in clients[round_num]]
    assert [c[0] for c in periodic["train"].calls] == [1, 3, 6]
    # Final evaluation once, on the final state, written as FedJAX's tsv.
    ((final_round, final_w),) = final["final"].calls
    assert final_round == 7
    np.testing.assert_array_equal(final_w, states[7].params["w"])
    w0 = float(states[7].params["w"][0])
    assert (tmp_path / "final.tsv").read_text() == f"w0\tround\n{w0}\t7"
    # The logged metrics: evaluations at their rounds, round durations every round.
    metrics = read_metrics(tmp_path)
    assert metrics[("test", "round")] == {1: 1, 3: 3, 6: 6}
    assert metrics[("test", "w0")] == {r: float(states[r].params["w"][0]) for r in (1, 3, 6)}
    sizes = {r: sum(len(c[1]) for c in clients[r]) for r in (1, 3, 6)}
    assert metrics[("train", "num_examples")] == sizes
    assert sorted(metrics[(".", "periodic_eval_duration_sec")]) == [1, 3, 6]
    assert sorted(metrics[(".", "mean_round_duration_sec")]) == list(range(1, 8))
    assert sorted(metrics) == sorted(
        [
            ("test", "round"),
            ("test", "w0"),
            ("train", "num_examples"),
            (".", "periodic_eval_duration_sec"),
            (".", "mean_round_duration_sec"),
        ]
    )
    assert load_latest_checkpoint(tmp_path) is None  # checkpoint_frequency=0: none.


@pytest.mark.parametrize("frequency", [0, -1])
def test_no_periodic_evaluation_or_checkpoint_when_frequency_is_not_positive(tmp_path, frequency):
    # FedJAX documents "<= 0: never"; its code checkpointed every round for negative values.
    _, periodic, final = _run(tmp_path, 3, eval_frequency=frequency, checkpoint_frequency=frequency)
    assert periodic["test"].calls == [] and periodic["train"].calls == []
    assert [r for r, _ in final["final"].calls] == [3]
    assert load_latest_checkpoint(tmp_path) is None


def test_checkpoint_schedule_and_keep(tmp_path):
    states, _ = _reference(7)
    _run(tmp_path, 7, checkpoint_frequency=3, num_checkpoints_to_keep=2)
    # Saved after rounds 1, 3 and 6; the latest two kept.
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == [
        "checkpoint_00000003",
        "checkpoint_00000006",
    ]
    restored, round_num = load_latest_checkpoint(tmp_path, target=_init_state())
    assert round_num == 6
    _assert_states_equal(restored, states[6])


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path):
    states, _ = _reference(9)
    with pytest.raises(RuntimeError, match="crash in round 6"):
        _run(tmp_path, 9, algorithm=_tiny_algorithm(crash_at_round=6), checkpoint_frequency=2)
    assert load_latest_checkpoint(tmp_path)[1] == 4
    # The same call again, with a fresh sampler: continues after round 4.
    state, periodic, final = _run(tmp_path, 9, checkpoint_frequency=2, eval_frequency=3)
    _assert_states_equal(state, states[9])
    # The resumed run evaluates its first round (5) and every third, as FedJAX does.
    assert [r for r, _ in periodic["test"].calls] == [5, 6, 9]
    for round_num, w in periodic["test"].calls:
        np.testing.assert_array_equal(w, states[round_num].params["w"])
    assert [r for r, _ in final["final"].calls] == [9]
    # Checkpoints after the resumed run's first round (5) and rounds 6, 8; keep 1.
    assert load_latest_checkpoint(tmp_path)[1] == 8


def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path):
    states, _ = _reference(8)
    script = (
        "import sys; sys.path.insert(0, 'tests'); import test_fed_training_loop as t; "
        f"t._run({str(tmp_path)!r}, 8, algorithm=t._tiny_algorithm(kill_at_round=6), "
        "checkpoint_frequency=2, num_checkpoints_to_keep=3)"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [r for r in range(1, 9) if (tmp_path / f"checkpoint_{r:08d}").exists()] == [1, 2, 4]
    state, _, _ = _run(tmp_path, 8, checkpoint_frequency=2, num_checkpoints_to_keep=3)
    _assert_states_equal(state, states[8])
    # The metrics file holds both runs; round 5 was logged by each, the latest is read back.
    durations = read_metrics(tmp_path)[(".", "mean_round_duration_sec")]
    assert sorted(durations) == list(range(1, 9))


def test_resumed_run_with_no_rounds_left_returns_the_checkpoint(tmp_path):
    states, _ = _reference(4)
    _run(tmp_path, 4, checkpoint_frequency=4)
    state, periodic, final = _run(tmp_path, 4, checkpoint_frequency=4, eval_frequency=1)
    _assert_states_equal(state, states[4])
    assert periodic["test"].calls == []
    # Final evaluation still runs, at the checkpoint's round (FedJAX fails here).
    assert [r for r, _ in final["final"].calls] == [4]


def test_shuffled_sampler_runs_fresh_but_cannot_resume(tmp_path):
    fd = _fd()
    sampler = client_samplers.UniformShuffledClientSampler(
        fd.shuffled_clients(buffer_size=8, seed=0), NUM_CLIENTS_PER_ROUND
    )
    state, _, _ = _run(tmp_path, 2, sampler=sampler, checkpoint_frequency=1)
    assert int(state.rounds_done) == 2
    sampler = client_samplers.UniformShuffledClientSampler(
        fd.shuffled_clients(buffer_size=8, seed=0), NUM_CLIENTS_PER_ROUND
    )
    with pytest.raises(ValueError, match="cannot resume at round 3.*UniformGetClientSampler"):
        _run(tmp_path, 4, sampler=sampler, checkpoint_frequency=1)


def test_bad_input_fails_before_training(tmp_path):
    def run(config=None, periodic=None, final=None, init_state=None):
        return run_federated_experiment(
            _tiny_algorithm(crash_at_round=1),  # Training would raise RuntimeError.
            init_state if init_state is not None else _init_state(),
            _sampler(),
            config or FederatedExperimentConfig(str(tmp_path), 2),
            periodic_eval_fn_map=periodic,
            final_eval_fn_map=final,
        )

    RecordingEval, RecordingTrainClientsEval = _recording_fns()
    with pytest.raises(TypeError, match=r"periodic_eval_fn_map\['acc'\] is a function"):
        run(periodic={"acc": lambda state, round_num: {}})
    with pytest.raises(TypeError, match="TrainClientsEvaluationFns belong in periodic"):
        run(final={"train": RecordingTrainClientsEval()})
    with pytest.raises(ValueError, match="num_rounds must be >= 0, got -1"):
        run(FederatedExperimentConfig(str(tmp_path), -1))
    with pytest.raises(TypeError, match="num_rounds must be an int, got float"):
        run(FederatedExperimentConfig(str(tmp_path), 2.0))
    with pytest.raises(ValueError, match="num_checkpoints_to_keep must be >= 1, got 0"):
        run(FederatedExperimentConfig(str(tmp_path), 2, checkpoint_frequency=1,
                                      num_checkpoints_to_keep=0))  # fmt: skip
    with pytest.raises(TypeError, match="config must be a FederatedExperimentConfig"):
        run({"root_dir": str(tmp_path), "num_rounds": 2})
    assert os.listdir(tmp_path) == []


def test_evaluating_a_state_without_params_names_the_problem(tmp_path):
    from fedjax_exp.core.client_datasets import PaddedBatchHParams
    from fedjax_exp.training import ModelTrainClientsEvaluationFn

    fn = ModelTrainClientsEvaluationFn(None, PaddedBatchHParams(batch_size=4))
    with pytest.raises(TypeError, match=r"state.params.*\(dict\) has no 'params' attribute"):
        fn({"params": {"w": jnp.zeros(3)}}, 1, [])


def test_set_tf_cpu_only_is_a_no_op():
    assert set_tf_cpu_only() is None


# ---- FedJAX 0.0.17's loop on the same inputs -----------------------------------------------


@pytest.fixture()
def fedjax_loop(fedjax_on_current_jax, monkeypatch):
    """FedJAX's run_federated_experiment on current JAX without TensorFlow: its
    TensorFlow-backed logger replaced by a recorder and checkpoint loading stubbed (it needs
    tf.io.gfile)."""
    fedjax = pytest.importorskip("fedjax")
    from fedjax.training import federated_experiment as theirs

    logged = []
    monkeypatch.setattr(
        theirs.fedjax_logging.Logger,
        "log",
        lambda self, writer, metric, value, round_num: logged.append((writer, metric, round_num)),
    )
    latest = {"value": None}
    monkeypatch.setattr(theirs.checkpoint, "load_latest_checkpoint", lambda _: latest["value"])
    return fedjax, theirs, logged, latest


def _run_fedjax(fedjax_loop, num_rounds, eval_frequency):
    fedjax, theirs, logged, _ = fedjax_loop
    fd = fedjax.InMemoryFederatedData(_client_data())
    sampler = fedjax.client_samplers.UniformGetClientSampler(fd, NUM_CLIENTS_PER_ROUND, SEED)
    RecordingEval, RecordingTrainClientsEval = _recording_fns(
        theirs.EvaluationFn, theirs.TrainClientsEvaluationFn
    )
    periodic = {"test": RecordingEval(), "train": RecordingTrainClientsEval()}
    final = {"final": RecordingEval(metrics=False)}  # FedJAX writes final metrics with tf.
    state = theirs.run_federated_experiment(
        _tiny_algorithm(),
        _init_state(),
        sampler,
        theirs.FederatedExperimentConfig("", num_rounds, eval_frequency=eval_frequency),
        periodic_eval_fn_map=periodic,
        final_eval_fn_map=final,
    )
    return state, periodic, final, sorted(logged)


def _assert_same_calls(ours, theirs):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a[0] == b[0]
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2:] == b[2:]


def test_loop_matches_fedjax(fedjax_loop, tmp_path):
    their_state, their_periodic, their_final, their_logged = _run_fedjax(fedjax_loop, 7, 2)
    state, periodic, final = _run(tmp_path, 7, eval_frequency=2)
    _assert_states_equal(state, their_state)
    for name in periodic:
        _assert_same_calls(periodic[name].calls, their_periodic[name].calls)
    _assert_same_calls(final["final"].calls, their_final["final"].calls)
    metrics = read_metrics(tmp_path)
    ours_logged = sorted((w, m, r) for (w, m), rounds in metrics.items() for r in rounds)
    assert ours_logged == their_logged


def test_resume_matches_fedjax(fedjax_loop, tmp_path):
    _run(tmp_path, 3, checkpoint_frequency=3)
    fedjax_loop[3]["value"] = load_latest_checkpoint(tmp_path, target=_init_state())
    their_state, their_periodic, _, their_logged = _run_fedjax(fedjax_loop, 8, 2)
    (tmp_path / "metrics.jsonl").unlink()
    state, periodic, _ = _run(tmp_path, 8, checkpoint_frequency=3, eval_frequency=2)
    _assert_states_equal(state, their_state)
    assert [c[0] for c in periodic["test"].calls] == [4, 6, 8]
    for name in periodic:
        _assert_same_calls(periodic[name].calls, their_periodic[name].calls)
    metrics = read_metrics(tmp_path)
    assert sorted((w, m, r) for (w, m), rs in metrics.items() for r in rs) == their_logged
