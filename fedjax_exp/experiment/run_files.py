"""The layout of a run directory, in one place, and the one reader of its metrics file.

::

    <run dir>/metrics.jsonl      one JSON object a line: {"step": int, "time": float, "<ns>/<name>":
                                 value, ...}; non-finite values are null (strict JSON)
    <run dir>/status.json        how the run ended: {"status": completed|failed|interrupted,
                                 "step", "error", "final", ...}
    <run dir>/run_config.json    the config and overrides the run was started with
    <run dir>/wandb_run_id.txt   the W&B run id, so that a resumed run continues its W&B run
    <run dir>/run.log            Hydra's job log: the run, each evaluation, why it stopped
    <run dir>/checkpoints/       one dir per saved step
    <run dir>/trials/<name>/     a vectorized sweep's trials, each laid out like a run dir
    <run dir>/wandb/             W&B's files (offline runs: wandb/offline-run-*/run-*.wandb)
    <run dir>/.hydra/            Hydra's composed config.yaml and overrides.yaml
"""

from __future__ import annotations

import json
import os
from typing import Any

METRICS_FILE = "metrics.jsonl"
STATUS_FILE = "status.json"
RUN_CONFIG_FILE = "run_config.json"
WANDB_ID_FILE = "wandb_run_id.txt"
RUN_LOG_FILE = "run.log"
CHECKPOINTS_DIR = "checkpoints"
TRIALS_DIR = "trials"
HYDRA_DIR = ".hydra"
# Metrics whose name contains one of these are better when smaller; all others when larger.
_LOWER_IS_BETTER = ("loss", "error", "perplexity", "regret")


def lower_is_better(metric: str) -> bool:
    """Whether smaller values of ``metric`` (``"final/test/loss"``) are better."""
    return any(word in metric.rsplit("/", 1)[-1].lower() for word in _LOWER_IS_BETTER)


class MetricsFileError(ValueError):
    """A metrics file that is not one JSON object with an integer ``"step"`` per line."""


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file in file order (null for non-finite values); blank lines
    and a malformed last line (a killed write) are skipped, other bad lines raise."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):
                continue
            raise MetricsFileError(
                f"{path}:{lineno}: not a JSON object ({e.msg}); every line of {METRICS_FILE} "
                "must be one JSON object: delete that line or the file"
            ) from e
        if not isinstance(record, dict) or type(record.get("step")) is not int:
            raise MetricsFileError(
                f'{path}:{lineno}: each record needs an integer "step", got {line[:80]!r}'
            )
        records.append(record)
    return records
