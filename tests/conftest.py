"""Shared pytest fixtures and settings for the fedjax_exp test suite."""

from __future__ import annotations

import os
import pathlib
import tempfile

import jax
import pytest

# W&B must never reach the network from tests, and must not print banners into test output.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Runs (in-process and run.py subprocesses) share a compilation cache of this test session
# only: tests neither read nor fill the user's ~/.cache.
os.environ.setdefault(
    "FEDJAX_EXP_COMPILATION_CACHE", tempfile.mkdtemp(prefix="fedjax_exp_test_xla_")
)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_FEMNIST = REPO_ROOT.parent / "shared" / "data" / "femnist"


@pytest.fixture(scope="session")
def repo_root() -> pathlib.Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_femnist_dir() -> pathlib.Path:
    """The real FEMNIST h5 files in ../shared; skips (with the reason) when they are absent."""
    train = SHARED_FEMNIST / "femnist_leaf_train.h5"
    test = SHARED_FEMNIST / "femnist_leaf_test.h5"
    if not (train.is_file() and test.is_file()):
        pytest.skip(f"shared FEMNIST files not found under {SHARED_FEMNIST}")
    return SHARED_FEMNIST


@pytest.fixture()
def fedjax_on_current_jax(monkeypatch):
    """Lets FedJAX 0.0.17, the parity tests' reference, run on current JAX: it calls
    ``jax.tree_map``, which JAX removed (``jax.tree_util.tree_map`` is the same function).
    Patched for the requesting test only; fedjax_exp itself never uses the old name."""
    monkeypatch.setattr(jax, "tree_map", jax.tree_util.tree_map, raising=False)
