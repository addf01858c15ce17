"""``run_config.json``: the resolved config and overrides a run dir was started with, written
before anything else. Rerunning the dir resumes only the same training: only settings that
do not change the trajectory (:data:`RESUMABLE_CHANGES`) may differ; ``trainer.resume=PATH``
from another dir is a deliberate fork and not checked. ``trainer.resume=latest`` and
``fedjax-compare`` read it too (Hydra rewrites ``.hydra/`` even for a rejected run)."""

from __future__ import annotations

import glob
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from fedjax_exp.core.atomic_file import atomic_write_text
from fedjax_exp.experiment.errors import ConfigError
from fedjax_exp.experiment.run_files import RUN_CONFIG_FILE

# Dotted keys that may change between a run and its resumption (a key covers its subtree).
# trainer.reuse_host_memory is an option since removed: runs recorded with it still resume.
RESUMABLE_CHANGES = frozenset(
    ["task_name", "optimized_metric", "logger", "metrics"]
    + [
        f"trainer.{key}"
        for key in "steps log_every eval_every eval_batch_size eval_batches per_client_eval "  # noqa: SIM905
        "per_client_max_clients checkpoint_every keep_checkpoints resume progress_bar "
        "steps_per_dispatch data_parallel reuse_host_memory "
        "compilation_cache".split()
    ]
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Flattens nested mappings to dotted keys; lists and empty mappings are leaf values."""
    if not isinstance(tree, Mapping):
        return {prefix: tree} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def _defining(config: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened settings that define the training (all but :data:`RESUMABLE_CHANGES`)."""

    def resumable(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in RESUMABLE_CHANGES for i in range(1, len(parts) + 1))

    return {k: v for k, v in flatten(config).items() if not resumable(k)}


def differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for each defining setting that differs (sorted by key)."""
    old, new = _defining(recorded), _defining(current)
    missing = object()
    changed = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            shown = ["(unset)" if v is missing else json.dumps(v) for v in (a, b)]
            changed.append(f"{key}: {shown[0]} -> {shown[1]}")
    return changed


def read(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The run's record ``{"config": ..., "overrides": [...]}`` or None; ConfigError for a
    file that is not one."""
    path = pathlib.Path(run_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}): restore it or start a new run dir") from e
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ConfigError(f"{path} is not a run record: restore it or start a new run dir")
    return record


def check_resumable(run_dir: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
    """ConfigError when ``config`` is not the run recorded in ``run_dir`` (if any)."""
    record = read(run_dir)
    if record is None:
        return
    changed = differences(record["config"], config)
    if changed:
        shown = "; ".join(changed[:4]) + (
            f"; and {len(changed) - 4} more" if len(changed) > 4 else ""
        )
        raise ConfigError(
            f"{run_dir} holds a run of another config ({shown}), and re-running a dir resumes "
            "its run: use a new hydra.run.dir, or start one from this run's checkpoint with "
            f"trainer.resume={run_dir}"
        )


def write(
    run_dir: str | os.PathLike[str], config: Mapping[str, Any], overrides: Sequence[str]
) -> None:
    """Records ``config`` and ``overrides`` as the run of ``run_dir`` (atomically)."""
    record = {"config": dict(config), "overrides": list(overrides)}
    run_dir = pathlib.Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / RUN_CONFIG_FILE, json.dumps(record, indent=1) + "\n")


def latest_run(pattern: str, config: Mapping[str, Any]) -> pathlib.Path | None:
    """The most recently started run dir matching the glob ``pattern`` that holds a run of
    ``config`` (what ``trainer.resume=latest`` resumes), or None."""
    records = glob.glob(os.path.join(pattern, RUN_CONFIG_FILE))
    for path in sorted(records, key=os.path.getmtime, reverse=True):
        try:
            record = read(pathlib.Path(path).parent)
        except ConfigError:
            continue  # Not a run of this config either.
        if record is not None and not differences(record["config"], config):
            return pathlib.Path(path).parent
    return None
