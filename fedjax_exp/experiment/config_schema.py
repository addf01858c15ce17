"""Schemas of the ``trainer`` and ``logger`` config groups, registered (on import) in Hydra's
ConfigStore as ``schema/trainer`` and ``schema/logger``, first in the defaults of their yaml
files: Hydra refuses unknown keys and wrong types while composing. What types cannot say
(ranges, ``auto`` or a number) is a ``check`` in a field's metadata, run by
:func:`~fedjax_exp.experiment.validation.check_section`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fedjax_exp.experiment.errors import ConfigError

# Counts are typed Any for OmegaConf: its integer node refuses a float even when it is exact
# (trainer.steps=1e3); their check accepts such floats and returns the int.
Int = Any
# Optional[...]: OmegaConf reads it, not `X | None`.
Floats, Ints = Optional[list[float]], Optional[list[int]]  # noqa: UP045
Check = Callable[[str, Any], Any]  # (dotted key, value) -> the value to use, or ConfigError


def integer(key: str, value: Any, minimum: int = 0, optional: bool = False) -> Any:
    """``value`` as an int >= ``minimum`` (1e3 -> 1000), or None when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key} must be {kind}, got {value!r}: set e.g. {key}={max(minimum, 1)}")
    return value


def checked(check: Check) -> Any:
    return dataclasses.field(default=MISSING, metadata={"check": check})


def count(minimum: int = 0, optional: bool = False) -> Any:
    return checked(lambda key, value: integer(key, value, minimum, optional))


def choice(*options: Any, other: Check | None = None) -> Any:
    """A field holding one of ``options`` (1 is not True), or what ``other`` accepts."""

    def check(key: str, value: Any) -> Any:
        if any(type(value) is type(o) and value == o for o in options):
            return value
        if other is not None:
            return other(key, value)
        names = ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
        raise ConfigError(f"{key} must be one of {names}; got {value!r}")

    return checked(check)


def _existing_path(key: str, value: Any) -> Any:
    if value == "latest":  # run.py swaps it for the run dir before Hydra composes.
        raise ConfigError(
            f"{key}=latest works on the command line only (python run.py ... {key}=latest): "
            "remove it from the config file"
        )
    if not isinstance(value, str) or not os.path.exists(value):
        raise ConfigError(
            f"{key}={value!r} does not exist: give a run dir, its checkpoints/ dir or one "
            "checkpoint step dir (or true/false)"
        )
    return value


def _sweep_list(kind: str, valid: Callable[[Any], bool]) -> Any:
    """An optional non-empty list of distinct values, each ``valid`` (OmegaConf checks types)."""

    def check(key: str, values: Any) -> Any:
        if values is None or (
            values and len(set(values)) == len(values) and all(map(valid, values))
        ):
            return values
        raise ConfigError(
            f"{key} must be null or a non-empty list of distinct {kind}, got {values}"
        )

    return checked(check)


@dataclasses.dataclass
class EvalBatchesConfig:
    train: Int = count(0, optional=True)
    test: Int = count(0, optional=True)


@dataclasses.dataclass
class VectorizeConfig:
    learning_rates: Floats = _sweep_list("positive numbers", lambda v: v > 0)
    client_learning_rates: Floats = _sweep_list("positive numbers", lambda v: v > 0)
    seeds: Ints = _sweep_list("non-negative integers", lambda v: v >= 0)


@dataclasses.dataclass
class TrainerConfig:
    """``trainer``: the training loop (conf/trainer/default.yaml documents each key)."""

    steps: Int = count(0)
    batch_size: Int = count(1)
    client_buffer_size: Int = count(1)
    example_buffer_size: Int = count(1)
    log_every: Int = count(1)
    eval_every: Int = count(0)
    eval_batch_size: Int = count(1)
    eval_batches: EvalBatchesConfig = dataclasses.field(default_factory=EvalBatchesConfig)
    per_client_eval: bool = MISSING
    per_client_max_clients: Int = count(1, optional=True)
    checkpoint_every: Int = count(0)
    keep_checkpoints: Int = count(1)
    resume: Any = choice(True, False, None, other=_existing_path)
    progress_bar: bool = MISSING
    steps_per_dispatch: Any = choice("auto", other=lambda key, value: integer(key, value, 1))
    data_parallel: Any = choice("auto", True, False)
    reuse_host_memory: Any = choice("auto", True, False)
    compilation_cache: Optional[str] = MISSING  # noqa: UP045
    compute_dtype: str = choice("float32", "bfloat16", "float16")
    vectorize: VectorizeConfig = dataclasses.field(default_factory=VectorizeConfig)


@dataclasses.dataclass
class WandbConfig:
    """``logger.wandb``: the arguments of ``wandb.init`` (conf/logger/wandb.yaml)."""

    mode: str = choice("offline", "online", "disabled", "shared")
    project: str = MISSING
    entity: Optional[str] = MISSING  # noqa: UP045
    group: Optional[str] = MISSING  # noqa: UP045
    job_type: str = MISSING
    name: Optional[str] = MISSING  # noqa: UP045
    tags: list[str] = MISSING
    notes: Optional[str] = MISSING  # noqa: UP045
    silent: bool = True


@dataclasses.dataclass
class LoggerConfig:
    """``logger``: W&B settings, or null for the local files only."""

    # Any, not Optional[WandbConfig]: OmegaConf cannot set a key below a null typed node
    # (logger=local logger.wandb.mode=online); the validator applies WandbConfig instead.
    wandb: Any = dataclasses.field(default=MISSING, metadata={"schema": WandbConfig})


# Config section -> (schema, the option that adds the section when it is missing).
SCHEMAS: dict[str, tuple[type, str]] = {
    "trainer": (TrainerConfig, "trainer=default"),
    "logger": (LoggerConfig, "logger=local"),
}

ConfigStore.instance().store(group="schema", name="trainer", node=TrainerConfig)
ConfigStore.instance().store(group="schema", name="logger", node=LoggerConfig)
