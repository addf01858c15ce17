"""Checkpoints: exact round trip of a training state (params, optimizer state, RNG, data
position, clock), keep-last-K, atomic saves (an interrupted save is never restored, and the
next run in that dir removes it), and the three ways of naming what to resume from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_exp.core import optimizers
from fedjax_exp.experiment.checkpoints import (
    Checkpointer,
    Snapshot,
    find_checkpoint_dir,
)
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_files import CHECKPOINTS_DIR


def trained_state(seed: int = 0, width: int = 3):
    """Params and Adam state after two real updates (non-zero moments, count == 2)."""
    key = jax.random.PRNGKey(seed)
    params = {
        "dense": {"w": jax.random.normal(key, (4, width)), "b": jnp.zeros(width)},
        "scale": jnp.ones((), jnp.float32),
    }
    opt = optimizers.adam(learning_rate=0.1)
    opt_state = opt.init(params)
    for i in range(2):
        grads = jax.tree_util.tree_map(lambda p, i=i: jnp.full_like(p, 0.5 + i), params)
        opt_state, params = opt.apply(grads, opt_state, params)
    # A tuple with an empty node, as stax parameter lists and optax states have.
    return {"params": params, "opt_state": opt_state, "extra": (np.arange(3, dtype=np.int32), ())}


def snapshot(step: int, seed: int = 0) -> Snapshot:
    rng = np.asarray(jax.random.PRNGKey(100 + step))
    return Snapshot(trained_state(seed), step, rng, data_position=step * 2, elapsed=step / 3)


def assert_trees_equal(a, b) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def template():
    return trained_state(seed=99), np.zeros(2, np.uint32)


def test_round_trip_is_exact(tmp_path):
    saved = snapshot(7)
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(saved)
    restored = Checkpointer(tmp_path, keep=3).restore(*template())
    assert_trees_equal(restored.state, saved.state)
    assert restored.state["opt_state"] is not None
    np.testing.assert_array_equal(restored.rng, saved.rng)
    assert restored.rng.dtype == np.uint32
    assert (restored.step, restored.data_position) == (7, 14)
    assert restored.elapsed == pytest.approx(7 / 3, abs=0)
    ckpt.close()


def test_keeps_the_last_k_and_restores_any_kept_step(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(snapshot(step, seed=step))
    assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    latest = ckpt.restore(*template())
    assert latest.step == 4
    assert_trees_equal(latest.state, snapshot(4, seed=4).state)
    older = ckpt.restore(*template(), step=3)
    assert_trees_equal(older.state, snapshot(3, seed=3).state)
    ckpt.close()


def test_saving_a_step_again_replaces_it(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(snapshot(2, seed=0))
    ckpt.save(snapshot(2, seed=1))
    assert ckpt.all_steps() == [2]
    assert_trees_equal(ckpt.restore(*template()).state, snapshot(2, seed=1).state)
    ckpt.close()


def test_an_interrupted_save_is_never_restored(tmp_path, monkeypatch):
    atomicity = pytest.importorskip("orbax.checkpoint._src.path.atomicity")
    ckpt = Checkpointer(tmp_path, keep=5)
    ckpt.save(snapshot(1))
    ckpt.save(snapshot(2, seed=2))

    # Simulate a kill at the worst moment: every file of step 3 written (even orbax's
    # commit_success.txt), only the final rename of the step dir still to come.
    real_rename = atomicity.async_path.rename

    async def killed_before_rename(src, dst, *args, **kwargs):
        if dst.name.isdigit():
            raise KeyboardInterrupt("killed")
        return await real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(atomicity.async_path, "rename", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(snapshot(3, seed=3))
    monkeypatch.undo()

    leftovers = [p for p in tmp_path.iterdir() if p.name not in ("1", "2")]
    assert len(leftovers) == 1 and leftovers[0].name.startswith("3.orbax-checkpoint-tmp")
    assert (leftovers[0] / "commit_success.txt").exists()
    # The runner only counts digit-named dirs as checkpoints.
    assert not leftovers[0].name.isdigit()

    # Another run reading this dir leaves the half-written step alone (it may still be writing).
    Checkpointer(tmp_path, keep=5, own=False).close()
    assert leftovers[0].exists()
    # A fresh process (the resumed run) sees only the complete checkpoints and removes the rest.
    resumed = Checkpointer(tmp_path, keep=5)
    assert resumed.all_steps() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    restored = resumed.restore(*template())
    assert restored.step == 2
    assert_trees_equal(restored.state, snapshot(2, seed=2).state)
    with pytest.raises(ConfigError, match=r"no complete checkpoint of step 3 .*\[1, 2\]"):
        resumed.restore(*template(), step=3)
    # Saving step 3 again replaces the half-written dir.
    resumed.save(snapshot(3, seed=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3"]
    assert_trees_equal(resumed.restore(*template()).state, snapshot(3, seed=3).state)
    resumed.close()


def test_resume_path_may_be_a_run_dir_a_checkpoints_dir_or_a_step_dir(tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / CHECKPOINTS_DIR
    ckpt = Checkpointer(checkpoints, keep=3)
    ckpt.save(snapshot(2, seed=2))
    ckpt.save(snapshot(4, seed=4))
    ckpt.close()
    assert find_checkpoint_dir(run_dir) == (checkpoints, None)
    assert find_checkpoint_dir(checkpoints) == (checkpoints, None)
    assert find_checkpoint_dir(checkpoints / "2") == (checkpoints, 2)
    for path, expected_step in ((run_dir, 4), (checkpoints, 4), (checkpoints / "2", 2)):
        directory, step = find_checkpoint_dir(path)
        restored = Checkpointer(directory, keep=3).restore(*template(), step=step)
        assert restored.step == expected_step
        assert_trees_equal(restored.state, snapshot(expected_step, seed=expected_step).state)


def test_restore_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint in"):
        Checkpointer(tmp_path / "empty", keep=1).restore(*template())
    ckpt = Checkpointer(tmp_path / "c", keep=1)
    ckpt.save(snapshot(1))
    state, rng = template()
    fewer = {"params": state["params"]}
    with pytest.raises(ConfigError, match="holds 11 arrays but this config's state has 3"):
        ckpt.restore(fewer, rng)
    wider = trained_state(width=5)
    with pytest.raises(ConfigError, match=r"shape \(3,\) but this config's state expects \(5,\)"):
        ckpt.restore(wider, rng)
    ckpt.close()
