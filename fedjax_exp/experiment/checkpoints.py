"""Checkpoints of a training run (orbax, synchronous): a step is renamed into place once
complete, so a killed save leaves the earlier ones intact; the last ``keep`` are kept. The
state is stored as its flat list of leaves and restored into a fresh state's tree structure,
which works for any pytree without teaching orbax about its node types."""

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

    state: Any
    step: int
    rng: np.ndarray  # Raw key data of the run's base PRNG key.
    data_position: int  # Training inputs consumed from the data stream.
    elapsed: float  # Seconds of training before this snapshot.


def _to_item(snapshot: Snapshot) -> dict[str, Any]:
    # Real copies: the train step donates its buffers, which np.asarray may alias on CPU.
    return {
        "state": [np.array(x, copy=True) for x in jax.tree_util.tree_leaves(snapshot.state)],
        "step": np.asarray(snapshot.step, np.int64),
        "rng": np.asarray(snapshot.rng),
        "data_position": np.asarray(snapshot.data_position, np.int64),
        "elapsed": np.asarray(snapshot.elapsed, np.float64),
    }


def find_checkpoint_dir(path: str | os.PathLike[str]) -> tuple[pathlib.Path, int | None]:
    """``trainer.resume=PATH`` (a run dir, its checkpoints dir or one step's dir) as
    (checkpoints dir, step or None for the latest)."""
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
    """Saves and restores :class:`Snapshot` s in ``directory``; ``own`` (the run's own dir):
    removes a killed run's half-written saves there (another run's dir is only read)."""

    def __init__(self, directory: str | os.PathLike[str], keep: int, own: bool = True):
        import orbax.checkpoint as ocp  # Slow to import.

        logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax logs each save at INFO.

        self._ocp = ocp
        self.directory = pathlib.Path(directory).absolute()
        for unfinished in self.directory.glob("*.orbax-checkpoint-tmp*") if own else []:
            shutil.rmtree(unfinished, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        # A named handler: restore() reads a checkpoint's shapes (item_metadata) first.
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, snapshot: Snapshot) -> None:
        """Saves ``snapshot`` (replacing one of the same step) and waits until it is on disk."""
        if snapshot.step in self._manager.all_steps():
            self._manager.delete(snapshot.step)
        self._manager.save(snapshot.step, args=self._ocp.args.StandardSave(_to_item(snapshot)))
        self._manager.wait_until_finished()

    def restore(
        self, template_state: Any, template_rng: np.ndarray, step: int | None = None
    ) -> Snapshot:
        """Loads ``step`` (default: the latest) into the templates' structures and dtypes;
        ConfigError for no such step or arrays unlike the template's (another model)."""
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
        # Orbax's own errors are tree diffs, and it restores other shapes silently.
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
        self._manager.close()
