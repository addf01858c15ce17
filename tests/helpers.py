"""Set-up shared by several test files: `python run.py` in a subprocess, configs composed
in-process, tiny random client data and a recording metric writer.

Imported as ``from helpers import ...``: pytest puts this folder on ``sys.path`` (rootdir
conftest, no ``__init__.py``), both in plain runs and under pytest-xdist workers.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"

# What every subprocess run gets: no W&B network, no banners, CPU only.
_CHILD_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "JAX_PLATFORMS": "cpu"}


# A tiny run: the logistic model, a few steps, one small eval batch, no progress bar, no W&B.
TINY_RUN = [
    "logger=local",
    "trainer.steps=4",
    "trainer.log_every=2",
    "trainer.eval_every=2",
    "trainer.eval_batch_size=32",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=1",
    "trainer.checkpoint_every=2",
    "trainer.progress_bar=false",
]


def run_py(
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    unset: Iterable[str] = (),
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Runs ``python run.py ARGS`` from the repo root and captures its output as text.

    The child's environment is this one without ``HYDRA_FULL_ERROR`` (so errors take their
    one-line form), plus offline/silent W&B and ``JAX_PLATFORMS=cpu``, plus ``env``, minus the
    names in ``unset``.
    """
    child = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    child.update(_CHILD_ENV)
    child.update(env or {})
    for name in unset:
        child.pop(name, None)
    return subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=REPO_ROOT,
        env=child,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_config(overrides: Sequence[str] = (), return_hydra_config: bool = False):
    """The config ``python run.py OVERRIDES`` would get, composed in-process from conf/."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import fedjax_exp.experiment  # noqa: F401 - registers the config schemas conf/ refers to.

    # A test that failed inside `initialize_config_dir` can leave Hydra initialized.
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="config",
            overrides=list(overrides),
            return_hydra_config=return_hydra_config,
        )


def random_image_clients(num_clients: int, examples: int, num_classes: int = 10, seed: int = 0):
    """``InMemoryFederatedData`` of ``num_clients`` clients ``c0, c1, ...``, each with
    ``examples`` uniform-random 28x28x1 images and random int32 labels below ``num_classes``."""
    from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData

    rng = np.random.default_rng(seed)
    clients = {
        f"c{i}".encode(): {
            "x": rng.random((examples, 28, 28, 1), dtype=np.float32),
            "y": rng.integers(0, num_classes, examples).astype(np.int32),
        }
        for i in range(num_clients)
    }
    return InMemoryFederatedData(clients)


class RecordingWriter:
    """A MetricWriter that keeps every ``write_scalars`` call as ``(step, scalars)``."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict]] = []

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.records.append((step, dict(scalars)))

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        pass

    def write_summary(self, summary: Mapping) -> None:
        pass

    def close(self, exit_code: int) -> None:
        pass


def dropout_logistic_model(num_classes: int = 10):
    """A logistic model with dropout (rate 0.5) on its inputs in training: unlike the zoo's
    logistic model it consumes ``apply_for_train``'s rng, so equality tests with it also check
    that every code path gives each step the same key."""
    import haiku as hk
    import jax.numpy as jnp

    from fedjax_exp.core import metrics, models

    def forward(batch, is_train=True):
        x = hk.Flatten()(batch["x"])
        if is_train:
            x = hk.dropout(hk.next_rng_key(), 0.5, x)
        return hk.Linear(num_classes)(x)

    return models.create_model_from_haiku(
        transformed_forward_pass=hk.transform(forward),
        sample_batch={"x": jnp.zeros((1, 28, 28, 1)), "y": jnp.zeros((1,), jnp.int32)},
        train_loss=lambda batch, logits: metrics.unreduced_cross_entropy_loss(batch["y"], logits),
        eval_metrics={"loss": metrics.CrossEntropyLoss(), "accuracy": metrics.Accuracy()},
        train_kwargs={"is_train": True},
        eval_kwargs={"is_train": False},
    )


def train_with_loop(algorithm, steps: int = 8, log_every: int = 4, **settings):
    """Trains ``algorithm`` with the experiment loop from ``split(PRNGKey(0))`` keys, no
    evaluation or checkpoints; returns (parameter leaves as NumPy, logged records).

    ``settings``: more ``loop.LoopSettings`` fields (steps_per_dispatch).
    """
    import jax

    from fedjax_exp.experiment import loop

    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))
    writer = RecordingWriter()
    state, last, _ = loop.train(
        algorithm,
        algorithm.init(init_rng),
        start_step=0,
        seed=0,
        rng=train_rng,
        settings=loop.LoopSettings(
            steps=steps,
            log_every=log_every,
            eval_every=0,
            checkpoint_every=0,
            progress_bar=False,
            **settings,
        ),
        writers=[writer],
        evaluator=None,
        checkpointer=None,
        clock=loop.Clock(),
    )
    assert last == steps
    leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(algorithm.eval_params(state))]
    return leaves, writer.records
