"""training.checkpoint: FedJAX's file names and keep-N, msgpack state dicts restored into the
exact pytree, atomic writes (a failed or killed write leaves the previous checkpoints)."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_exp.algorithms import apfl, scaffold
from fedjax_exp.core import (
    client_datasets,
    client_samplers,
    dataclasses,
    models,
    optimizers,
    serialization,
)
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.training import (
    FederatedExperimentConfig,
    checkpoint,
    load_latest_checkpoint,
    run_federated_experiment,
    save_checkpoint,
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class ServerState:
    params: dict
    opt_state: object
    round_index: int
    rng: jax.Array
    host_counts: np.ndarray


def _state(seed: int) -> ServerState:
    k = jax.random.PRNGKey(seed)
    params = {
        "linear": {
            "w": jax.random.normal(k, (4, 3)),
            "b": jnp.arange(3, dtype=jnp.float32) + seed,
        },
        "scale": jnp.array(seed, jnp.bfloat16),
    }
    opt_state = optax.adam(0.1).init(params)
    opt_state = jax.tree_util.tree_map(lambda x: x + 0.5 * seed, opt_state)
    return ServerState(
        params=params,
        opt_state=opt_state,
        round_index=seed,
        rng=jax.random.key(seed),
        host_counts=np.arange(5, dtype=np.int64) * seed,
    )


def _assert_same_state(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert type(x) is type(y)
        if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.random.key_impl(x) == jax.random.key_impl(y)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class _SameName:
    """Distinct dict keys that print alike."""

    def __init__(self, order: int):
        self.order = order

    def __lt__(self, other: _SameName) -> bool:
        return self.order < other.order

    def __str__(self) -> str:
        return "k"


def _names(root) -> list[str]:
    return sorted(os.listdir(root))


def test_round_trip_restores_the_exact_pytree(tmp_path):
    state = _state(3)
    save_checkpoint(tmp_path, state, round_num=12)
    assert _names(tmp_path) == ["checkpoint_00000012"]
    restored, round_num = load_latest_checkpoint(tmp_path, target=_state(0))
    assert round_num == 12
    _assert_same_state(restored, state)
    assert isinstance(restored, ServerState) and restored.round_index == 3
    # A restored run keeps computing on JAX arrays, and the host array stays writable.
    assert isinstance(restored.params["linear"]["w"], jax.Array)
    restored.host_counts[0] = 1


def test_without_target_the_state_dict_comes_back(tmp_path):
    state = _state(2)
    save_checkpoint(tmp_path, state, round_num=1)
    state_dict, round_num = load_latest_checkpoint(tmp_path)
    assert round_num == 1
    assert sorted(state_dict) == ["host_counts", "opt_state", "params", "rng", "round_index"]
    # optax's (ScaleByAdamState, EmptyState) tuple: items by index, empty nodes dropped.
    assert sorted(state_dict["opt_state"]) == ["0"]
    assert sorted(state_dict["opt_state"]["0"]) == ["count", "mu", "nu"]
    np.testing.assert_array_equal(state_dict["params"]["linear"]["w"], state.params["linear"]["w"])
    assert state_dict["params"]["scale"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(state_dict["rng"], jax.random.key_data(state.rng))
    assert state_dict["round_index"] == 2
    assert checkpoint.state_to_dict(state)["params"].keys() == state_dict["params"].keys()


def test_fedjax_reads_the_checkpoint_file(tmp_path):
    fedjax_serialization = pytest.importorskip("fedjax.core.serialization")
    state = _state(1)
    save_checkpoint(tmp_path, state, round_num=4)
    data = (tmp_path / "checkpoint_00000004").read_bytes()
    theirs = fedjax_serialization.msgpack_deserialize(data)
    ours = checkpoint.state_to_dict(state)
    assert jax.tree_util.tree_structure(theirs) == jax.tree_util.tree_structure(ours)
    for a, b in zip(
        jax.tree_util.tree_leaves(theirs), jax.tree_util.tree_leaves(ours), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And the bytes are FedJAX's encoding of the same state dict.
    assert data == fedjax_serialization.msgpack_serialize(ours)


def test_keep_n_latest_by_round_number(tmp_path):
    for round_num in [1, 3, 6, 9, 12]:
        save_checkpoint(tmp_path, _state(round_num), round_num, keep=3)
    assert _names(tmp_path) == ["checkpoint_00000006", "checkpoint_00000009", "checkpoint_00000012"]
    # Keep means the latest rounds, not the latest writes (FedJAX sorts by round too): an
    # older round written now is the one deleted.
    save_checkpoint(tmp_path, _state(2), 2, keep=3)
    assert _names(tmp_path) == ["checkpoint_00000006", "checkpoint_00000009", "checkpoint_00000012"]
    save_checkpoint(tmp_path, _state(13), 13, keep=1)
    assert _names(tmp_path) == ["checkpoint_00000013"]
    restored, round_num = load_latest_checkpoint(tmp_path, target=_state(0))
    assert round_num == 13
    _assert_same_state(restored, _state(13))


def test_listing_ignores_other_files(tmp_path):
    assert load_latest_checkpoint(tmp_path / "missing") is None
    for name in ["checkpoint_5", "checkpoint_000000077", "checkpoint_00000001.bak", "notes"]:
        (tmp_path / name).write_text("x")
    assert load_latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, _state(1), 1, keep=1)
    assert checkpoint.list_checkpoints(tmp_path) == [
        (1, os.path.join(str(tmp_path), "checkpoint_00000001"))
    ]


def test_failure_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, _state(1), 1, keep=1)
    before = (tmp_path / "checkpoint_00000001").read_bytes()
    written = []

    def failing_fsync(fd):
        written.append(os.fstat(fd).st_size)  # The new bytes were already in the temp file.
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, _state(2), 2, keep=1)
    assert written and written[0] > 0
    assert _names(tmp_path) == ["checkpoint_00000001"]  # No new file, no temp file left.
    assert (tmp_path / "checkpoint_00000001").read_bytes() == before
    restored, round_num = load_latest_checkpoint(tmp_path, target=_state(0))
    assert round_num == 1
    _assert_same_state(restored, _state(1))


def test_unserializable_state_leaves_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, _state(1), 1)
    with pytest.raises(TypeError, match="cannot store a leaf of type object"):
        save_checkpoint(tmp_path, {"params": object()}, 2)
    assert _names(tmp_path) == ["checkpoint_00000001"]


def test_killed_mid_write_leaves_the_previous_checkpoint_and_the_next_save_cleans_up(tmp_path):
    save_checkpoint(tmp_path, _state(1), 1, keep=2)
    before = (tmp_path / "checkpoint_00000001").read_bytes()
    # A real SIGKILL between writing the bytes and the rename: no Python cleanup runs.
    script = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np
        from fedjax_exp.training import checkpoint
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save_checkpoint({str(tmp_path)!r}, {{"w": np.ones(1000)}}, 2, keep=2)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    names = _names(tmp_path)
    assert names[-1] == "checkpoint_00000001"
    (partial,) = names[:-1]
    assert partial.startswith(".checkpoint_00000002.") and partial.endswith(".partial")
    assert (tmp_path / "checkpoint_00000001").read_bytes() == before
    assert load_latest_checkpoint(tmp_path)[1] == 1
    save_checkpoint(tmp_path, _state(3), 3, keep=2)
    assert _names(tmp_path) == ["checkpoint_00000001", "checkpoint_00000003"]


def test_state_that_does_not_match_the_target_is_one_clear_error(tmp_path):
    save_checkpoint(tmp_path, {"params": {"w": np.zeros((2, 3), np.float32)}}, 5)
    with pytest.raises(ValueError, match=r"checkpoint_00000005.*'params/w' is float32\[2, 3\]"):
        load_latest_checkpoint(tmp_path, target={"params": {"w": np.zeros((3, 3), np.float32)}})
    with pytest.raises(ValueError, match="float32.*but the target state has int32"):
        load_latest_checkpoint(tmp_path, target={"params": {"w": np.zeros((2, 3), np.int32)}})
    with pytest.raises(ValueError, match="no entry 'params/b'"):
        load_latest_checkpoint(
            tmp_path, target={"params": {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3)}}
        )
    with pytest.raises(ValueError, match="'params' is a container where the target"):
        load_latest_checkpoint(tmp_path, target={"params": np.zeros(1)})
    save_checkpoint(tmp_path, {"params": {"w": np.zeros(1), "b": np.zeros(1)}}, 6)
    with pytest.raises(ValueError, match="holds 1 entries the target state does not have"):
        load_latest_checkpoint(tmp_path, target={"params": {"w": np.zeros(1)}})


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"keep must be an int >= 1"):
        save_checkpoint(tmp_path, _state(1), 1, keep=0)
    with pytest.raises(ValueError, match=r"round_num must be in \[0, 99999999\]"):
        save_checkpoint(tmp_path, _state(1), 10**8)
    with pytest.raises(ValueError, match=r"round_num must be in"):
        save_checkpoint(tmp_path, _state(1), -1)
    with pytest.raises(TypeError, match="round_num must be an int"):
        save_checkpoint(tmp_path, _state(1), 1.0)
    with pytest.raises(ValueError, match="must be a container"):
        save_checkpoint(tmp_path, jnp.zeros(3), 1)
    with pytest.raises(ValueError, match="same entry 'k'"):
        checkpoint.state_to_dict({_SameName(0): np.zeros(1), _SameName(1): np.ones(1)})
    assert _names(tmp_path) == []
    # Loading checks the file's contents only through the target; the format itself is
    # FedJAX's msgpack, so a state dict written by hand loads too.
    (tmp_path / "checkpoint_00000002").write_bytes(
        serialization.msgpack_serialize({"w": np.arange(3, dtype=np.float32)})
    )
    restored, round_num = load_latest_checkpoint(tmp_path, target={"w": jnp.zeros(3)})
    assert round_num == 2
    np.testing.assert_array_equal(restored["w"], [0.0, 1.0, 2.0])


# --- Resuming algorithms with per-client state (SCAFFOLD, APFL) ----------------------------


def _regression_clients() -> InMemoryFederatedData:
    """Seven linear-regression clients of different sizes, keyed by bytes ids as FedJAX's."""
    rng = np.random.default_rng(5)
    data = {}
    for i, size in enumerate([3, 6, 2, 5, 4, 7, 1]):
        x = rng.normal(loc=0.3 * i, size=(size, 3)).astype(np.float32)
        y = (x @ np.array([1.0, -2.0, 0.5]) + 0.2 * i).astype(np.float32)
        data[f"client_{i}".encode()] = {"x": x, "y": y}
    return InMemoryFederatedData(data)


def _squared_error(params, batch, rng):
    del rng
    return 0.5 * (batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2


_RESUME_HPARAMS = client_datasets.ShuffleRepeatBatchHParams(batch_size=2, num_epochs=1, seed=3)


def _scaffold():
    return scaffold.scaffold(
        models.grad(_squared_error),
        client_learning_rate=0.05,
        server_optimizer=optimizers.adam(0.1),
        client_batch_hparams=_RESUME_HPARAMS,
        num_clients=7,
    )


def _apfl():
    return apfl.adaptive_personalized_federated_learning(
        models.grad(_squared_error),
        client_optimizer=optimizers.sgd(0.05),
        server_optimizer=optimizers.adam(0.1),
        client_batch_hparams=_RESUME_HPARAMS,
        client_coefficient=0.4,
    )


def _run_rounds(algorithm, root_dir, num_rounds: int):
    init_state = algorithm.init({"w": jnp.array([0.2, 0.1, -0.3]), "b": jnp.array(0.05)})
    # Three of seven clients a round, five rounds: clients recur, and some are trained before
    # the interruption and not after it (their entries must survive the restore as they are).
    sampler = client_samplers.UniformGetClientSampler(_regression_clients(), 3, seed=11)
    config = FederatedExperimentConfig(str(root_dir), num_rounds, checkpoint_frequency=1)
    return run_federated_experiment(algorithm, init_state, sampler, config)


def _per_client(state):
    if isinstance(state, scaffold.ServerState):
        return state.client_control_variates
    return state.client_states


@pytest.mark.parametrize("build", [_scaffold, _apfl], ids=["scaffold", "apfl"])
def test_resumed_run_with_per_client_state_equals_the_uninterrupted_run(tmp_path, build):
    uninterrupted = _run_rounds(build(), tmp_path / "straight", 5)
    stopped = _run_rounds(build(), tmp_path / "resumed", 2)
    assert load_latest_checkpoint(tmp_path / "resumed")[1] == 2
    assert len(_per_client(stopped)) >= 3  # The restore has client entries to fill in.
    resumed = _run_rounds(build(), tmp_path / "resumed", 5)
    _assert_same_state(resumed, uninterrupted)
    # The same clients (dict order aside: pytrees flatten dicts in sorted key order).
    assert sorted(_per_client(resumed)) == sorted(_per_client(uninterrupted))
    assert all(isinstance(cid, bytes) for cid in _per_client(resumed))
    # Resuming at the end (no rounds left) restores the same final state too.
    restored, round_num = load_latest_checkpoint(
        tmp_path / "resumed", target=build().init({"w": jnp.zeros(3), "b": jnp.zeros(())})
    )
    assert round_num == 5
    _assert_same_state(restored, uninterrupted)


def test_per_client_checkpoint_is_fedjax_msgpack_with_bytes_client_ids(tmp_path):
    fedjax_serialization = pytest.importorskip("fedjax.core.serialization")
    state = _run_rounds(_apfl(), tmp_path, 2)
    data = (tmp_path / "checkpoint_00000002").read_bytes()
    theirs = fedjax_serialization.msgpack_deserialize(data)
    assert sorted(theirs["client_states"]) == sorted(state.client_states)
    assert all(isinstance(cid, bytes) for cid in theirs["client_states"])
    cid = sorted(state.client_states)[0]
    np.testing.assert_array_equal(
        theirs["client_states"][cid]["params"]["w"], state.client_states[cid].params["w"]
    )
    assert data == fedjax_serialization.msgpack_serialize(checkpoint.state_to_dict(state))


@dataclasses.dataclass
class _UndeclaredState:
    params: dict
    per_client: dict


def test_an_undeclared_empty_mapping_is_filled_as_the_file_holds_it(tmp_path):
    state = _UndeclaredState(
        params={"w": jnp.ones(2)},
        per_client={
            b"a": {"v": jnp.arange(3, dtype=jnp.int32), "count": 2},
            b"b": {"v": jnp.zeros(3, jnp.int32), "count": 5},
        },
    )
    save_checkpoint(tmp_path, state, 1)
    restored, _ = load_latest_checkpoint(tmp_path, target=_UndeclaredState({"w": jnp.zeros(2)}, {}))
    assert list(restored.per_client) == [b"a", b"b"]
    assert restored.per_client[b"a"]["count"] == 2
    assert isinstance(restored.per_client[b"b"]["v"], jax.Array)
    _assert_same_state(restored, state)


def test_per_client_entries_that_do_not_match_the_template_are_one_clear_error(tmp_path):
    state = _run_rounds(_scaffold(), tmp_path, 1)
    cid = sorted(state.client_control_variates)[0]
    broken = state.replace(
        client_control_variates={cid: {"w": state.params["w"]}}  # No "b".
    )
    save_checkpoint(tmp_path, broken, 2)
    missing = re.escape(f'no entry "client_control_variates/{cid!r}/b"')
    with pytest.raises(ValueError, match=missing):
        load_latest_checkpoint(tmp_path, target=_scaffold().init(state.params))
    save_checkpoint(tmp_path, {**checkpoint.state_to_dict(state), "client_control_variates": 1}, 3)
    with pytest.raises(ValueError, match="'client_control_variates' is a leaf where the target"):
        load_latest_checkpoint(tmp_path, target=_scaffold().init(state.params))
