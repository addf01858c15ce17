"""Checkpoints of a training run: algorithm state, step, RNG, data position and clock.

Written with orbax-checkpoint's CheckpointManager: each step is written to
``<step>.orbax-checkpoint-tmp`` and renamed to ``<step>`` only when complete, so a run killed
mid-save leaves the previous checkpoints intact, and the half-written dir is neither listed nor
restored (the next run that writes there removes it). Only the last ``keep`` are kept.
Saves are synchronous: the states here are at most a few hundred MB, and a blocking save keeps
the order of saves and metrics lines simple.

The algorithm state is stored as its flat list of leaves and restored into the tree structure
of a freshly initialised state. That works for any pytree (optax states with empty tuples,
stax parameter lists, user dataclasses) without teaching orbax about each node type.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_files import CHECKPOINTS_DIR


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Everything a resumed run needs to continue exactly where a saved one was."""

    state: Any  # The algorithm state pytree (params, optimizer state, ...).
    step: int
    rng: np.ndarray  # Raw key data of the run's base PRNG key.
    data_position: int  # Number of training inputs consumed from the data stream.
    elapsed: float  # Seconds of training before this snapshot (for the metrics "time").


def _host_copy(tree: Any) -> Any:
    # A real copy: the train step donates its input buffers, and on CPU np.asarray may alias
    # device memory that the next step reuses.
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


def _to_item(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "state": _host_copy(jax.tree_util.tree_leaves(snapshot.state)),
        "step": np.asarray(snapshot.step, np.int64),
        "rng": np.asarray(snapshot.rng),
        "data_position": np.asarray(snapshot.data_position, np.int64),
        "elapsed": np.asarray(snapshot.elapsed, np.float64),
    }


def find_checkpoint_dir(path: str | os.PathLike[str]) -> tuple[pathlib.Path, int | None]:
    """Resolves ``trainer.resume=PATH`` to (checkpoints dir, step or None for the latest).

    PATH may be a run dir (holding ``checkpoints/``), a checkpoints dir, or one step's dir
    (a dir named by its step number). Anything else is taken as a checkpoints dir.
    """
    path = pathlib.Path(path)
    if (path / CHECKPOINTS_DIR).is_dir():
        return path / CHECKPOINTS_DIR, None
    if path.name.isdigit() and path.is_dir():
        return path.parent, int(path.name)
    return path, None


def resume_source(resume: Any, own_dir: pathlib.Path) -> tuple[pathlib.Path, int | None] | None:
    """Where ``trainer.resume`` resumes from: (checkpoints dir, step or None for the latest),
    or None for a fresh start; ``own_dir`` is the run's own checkpoints dir."""

    def has_checkpoints(d: pathlib.Path) -> bool:
        return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())

    if resume is True:
        return (own_dir, None) if has_checkpoints(own_dir) else None
    if resume is False or resume is None:
        if has_checkpoints(own_dir):
            raise ConfigError(
                f"{own_dir} already holds checkpoints and trainer.resume=false: resume with "
                "trainer.resume=true or pick a new hydra.run.dir"
            )
        return None
    directory, step = find_checkpoint_dir(resume)
    if not has_checkpoints(directory):
        raise ConfigError(
            f"trainer.resume={resume!r} holds no checkpoints: give a run dir with a checkpoints/ "
            "dir (or that dir, or one of its step dirs), or set trainer.resume=true to start "
            "fresh (and resume this run dir later)"
        )
    return directory, step


class Checkpointer:
    """Saves and restores :class:`Snapshot` s under one directory. ``own=True`` (a run's own
    dir) removes the half-written saves of a killed run there; another run's dir is only read
    (that run may still be writing to it)."""

    def __init__(self, directory: str | os.PathLike[str], keep: int, own: bool = True):
        import orbax.checkpoint as ocp  # Imported here: it is slow to import and JAX-heavy.

        # Orbax logs every save step by step at INFO through absl; keep run logs readable.
        logging.getLogger("absl").setLevel(logging.WARNING)

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        for unfinished in self.directory.glob("*.orbax-checkpoint-tmp*") if own else []:
            shutil.rmtree(unfinished, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        # The handler is named up front so that item_metadata() can read a checkpoint's shapes
        # before restoring it (see restore()).
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        return sorted(self._manager.all_steps())

    def save(self, snapshot: Snapshot) -> None:
        """Saves ``snapshot`` and waits until it is on disk.

        A checkpoint of the same step (e.g. from a run resumed from an earlier step) is
        replaced; that delete-then-write is the one non-atomic moment, and older steps are
        still there if it is interrupted.
        """
        if snapshot.step in self._manager.all_steps():
            self._manager.delete(snapshot.step)
        self._manager.save(snapshot.step, args=self._ocp.args.StandardSave(_to_item(snapshot)))
        self._manager.wait_until_finished()

    def restore(
        self, template_state: Any, template_rng: np.ndarray, step: int | None = None
    ) -> Snapshot:
        """Loads ``step`` (default: the latest) into the structures of the templates.

        Leaves are cast to the template's dtypes. Raises :class:`ConfigError` when there is
        no such checkpoint or when its arrays do not match the template's count and shapes
        (a checkpoint of another model or optimizer).
        """
        steps = self.all_steps()
        step = (steps[-1] if steps else None) if step is None else step
        if step is None:
            raise ConfigError(f"no complete checkpoint in {self.directory}: start a new run")
        if step not in steps:
            raise ConfigError(
                f"no complete checkpoint of step {step} in {self.directory} (it holds steps "
                f"{steps}): resume from one of those"
            )
        leaves, treedef = jax.tree_util.tree_flatten(template_state)
        # Compare with the saved arrays' metadata first: orbax's own errors for a mismatched
        # template are multi-line tree diffs, and it silently restores the saved shapes when
        # only shapes differ (which would fail later inside the jitted step).
        where = self.directory / str(step)
        saved = list(self._manager.item_metadata(step)["state"])
        if len(saved) != len(leaves):
            raise ConfigError(
                f"checkpoint {where} holds {len(saved)} arrays but this config's state has "
                f"{len(leaves)}: it was written by another model or optimizer; resume from a "
                "run with the same config or start a new run dir"
            )
        for i, (meta, expected) in enumerate(zip(saved, leaves, strict=True)):
            if tuple(meta.shape) != np.shape(expected):
                raise ConfigError(
                    f"checkpoint {where}: array {i} has shape {tuple(meta.shape)} but this "
                    f"config's state expects {np.shape(expected)}: it was written by another "
                    "model; resume from a run with the same config or start a new run dir"
                )
        template = _to_item(Snapshot(leaves, 0, np.asarray(template_rng), 0, 0.0))
        item = self._manager.restore(step, args=self._ocp.args.StandardRestore(template))
        return Snapshot(
            state=jax.tree_util.tree_unflatten(treedef, item["state"]),
            step=int(item["step"]),
            rng=np.asarray(item["rng"]),
            data_position=int(item["data_position"]),
            elapsed=float(item["elapsed"]),
        )

    def close(self) -> None:
        """Releases orbax's resources (no pending saves: saves are synchronous)."""
        self._manager.close()
