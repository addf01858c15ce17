"""Schemas of the ``trainer`` and ``logger`` config groups, registered in Hydra's ConfigStore.

``conf/trainer/default.yaml`` and ``conf/logger/*.yaml`` list these schemas first in their
defaults (``base_trainer``, ``base_logger``), so Hydra refuses an unknown key or a value of the
wrong type while it composes the config. The schemas hold no values (the yaml files do, with
their documentation). What OmegaConf's types cannot say (ranges, ``auto`` or a number, an
existing path) is a ``check`` in a field's metadata; :func:`check_section` runs them all and
reports any problem as one line.

Importing this module registers the schemas (``fedjax_exp.experiment`` imports it, so a config
composed after importing the package finds them). It imports no JAX.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Iterable
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from fedjax_exp.experiment.errors import ConfigError

# Counts are typed Any for OmegaConf: its integer node refuses a float even when it is exact
# (trainer.steps=1e3); their check accepts such floats and returns the int.
Int = Any


def integer(key: str, value: Any, minimum: int = 0, optional: bool = False) -> Any:
    """``value`` as an int >= ``minimum`` (an exact float such as 1e3 is converted), or None
    when ``optional``; else a ConfigError naming ``key``."""
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key} must be {kind}, got {value!r}: set e.g. {key}={max(minimum, 1)}")
    return value


def _field(check: Callable[[str, Any], Any], default: Any = MISSING) -> Any:
    return dataclasses.field(default=default, metadata={"check": check})


def count(minimum: int = 0, optional: bool = False) -> Any:
    """A field holding an integer >= ``minimum`` (or None when ``optional``)."""
    return _field(lambda key, value: integer(key, value, minimum, optional))


def choice(*options: Any, other: Callable[[str, Any], Any] | None = None) -> Any:
    """A field holding one of ``options`` (compared with their types), or what ``other``
    accepts."""

    def check(key: str, value: Any) -> Any:
        if any(type(value) is type(o) and value == o for o in options):
            return value
        if other is not None:
            return other(key, value)
        names = ", ".join(str(o).lower() if isinstance(o, bool) else str(o) for o in options)
        raise ConfigError(f"{key} must be one of {names}; got {value!r}")

    return _field(check)


def _resume_path(key: str, value: Any) -> Any:
    if not isinstance(value, str) or not os.path.exists(value):
        raise ConfigError(
            f"{key}={value!r} does not exist: give a run dir, its checkpoints/ dir or one "
            "checkpoint step dir (or true/false)"
        )
    return value


@dataclasses.dataclass
class EvalBatchesConfig:
    """Padded batches of each split in a periodic evaluation (None: all of them)."""

    train: Int = count(0, optional=True)
    test: Int = count(0, optional=True)


@dataclasses.dataclass
class VectorizeConfig:
    """A vectorized sweep: every learning rate x every seed as one compiled program."""

    learning_rates: Optional[list[float]] = MISSING  # noqa: UP045 - OmegaConf reads Optional.
    seeds: Optional[list[int]] = MISSING  # noqa: UP045


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
    resume: Any = choice(True, False, None, other=_resume_path)
    progress_bar: bool = MISSING
    steps_per_dispatch: Any = choice("auto", other=lambda k, v: integer(k, v, 1))
    device_data: Any = choice("auto", True, False)
    data_parallel: Any = choice("auto", True, False)
    reuse_host_memory: Any = choice("auto", True, False)
    compilation_cache: Optional[str] = MISSING  # noqa: UP045
    compute_dtype: str = choice("float32", "bfloat16", "float16")
    vectorize: VectorizeConfig = dataclasses.field(default_factory=VectorizeConfig)


@dataclasses.dataclass
class WandbConfig:
    """``logger.wandb``: the arguments of ``wandb.init``."""

    mode: str = choice("offline", "online", "disabled", "shared")
    project: str = MISSING
    entity: Optional[str] = MISSING  # noqa: UP045
    group: Optional[str] = MISSING  # noqa: UP045
    job_type: str = MISSING
    name: Optional[str] = MISSING  # noqa: UP045
    tags: list[str] = MISSING
    notes: Optional[str] = MISSING  # noqa: UP045


@dataclasses.dataclass
class LoggerConfig:
    """``logger``: W&B settings (a :class:`WandbConfig`), or null for local files only."""

    # Any, not Optional[WandbConfig]: OmegaConf cannot set a key below a null typed node
    # (logger=local logger.wandb.mode=online); the check types it instead.
    wandb: Any = _field(lambda key, value: value and check_section(WandbConfig, value, key))


# Config section -> (schema, the option that adds the section when it is missing).
SCHEMAS: dict[str, tuple[type, str]] = {
    "trainer": (TrainerConfig, "trainer=default"),
    "logger": (LoggerConfig, "logger=local"),
}

# Names people type for a key -> what this project calls it (tried before edit distance).
ALIASES = {
    "lr": ("learning_rate",),
    "learningrate": ("learning_rate",),
    "step_size": ("learning_rate",),
    "beta1": ("b1",),
    "beta2": ("b2",),
    "momentum": ("b1",),
    "beta": ("momentum", "b1"),
    "epsilon": ("eps",),
    "wd": ("weight_decay",),
    "epochs": ("steps",),
    "num_steps": ("steps",),
    "iterations": ("steps",),
    "rounds": ("steps",),
    "bs": ("batch_size",),
}


def suggest_key(key: str, known: Iterable[str]) -> str | None:
    """The known dotted key that ``key`` most likely meant: a common alias of its last part
    among its siblings (``optimizer.lr`` -> ``optimizer.learning_rate``), else the closest
    sibling by spelling (the closest key anywhere when the parent is unknown), else None."""
    parent, _, leaf = key.rpartition(".")
    known = sorted(set(known))
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    for alias in ALIASES.get(leaf.lower(), ()):
        if alias in siblings:
            return siblings[alias]
    # Leaves only: the shared prefix would make every sibling look alike (lr ~ b2).
    if siblings:
        near = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        return siblings[near[0]] if near else None
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.6)  # A typo in the parent.
    return near[0] if near else None


def unknown_key_message(key: str, known: Iterable[str]) -> str:
    """``unknown config key 'K'; did you mean 'NEAR'?``"""
    near = suggest_key(key, known)
    hint = f"did you mean {near!r}?" if near else "`python run.py --cfg job` prints every key"
    return f"unknown config key {key!r}; {hint}"


_TYPE_WORDS = {"bool": "true or false", "Float": "a number", "Integer": "an integer"}


def omegaconf_error_line(error: OmegaConfBaseException, known: Iterable[str] = ()) -> str:
    """OmegaConf's multi-line error as one line naming the key, the value and what it must be
    (for an unknown key: the known key it most likely meant)."""
    key, first = str(error.full_key or error.key), str(error.msg or error).splitlines()[0]
    if isinstance(error, ConfigKeyError) and "not in" in first:
        return unknown_key_message(key, known)
    if isinstance(error, MissingMandatoryValue):
        return f"{key} is required but not set: add {key}=VALUE"
    wanted = next((w for word, w in _TYPE_WORDS.items() if word in first), None)
    if wanted:
        return f"{key} must be {wanted}, got {error.value!r}"
    return f"{key}={error.value!r} is not valid: {first}"


def _keys(node: Any, prefix: str) -> list[str]:
    if not isinstance(node, dict):
        return []
    return [
        k for name, v in node.items() for k in (f"{prefix}.{name}", *_keys(v, f"{prefix}.{name}"))
    ]


def check_section(schema: type, values: Any, prefix: str) -> dict[str, Any]:
    """``values`` (a plain dict, resolved) checked against ``schema``: unknown keys (also those
    added with ``+trainer.KEY=...``), types and every field's check. Returns plain Python,
    counts converted to int. Raises ConfigError naming ``prefix.KEY``."""
    base = OmegaConf.structured(schema)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(base, values))
    except OmegaConfBaseException as e:
        e.full_key = f"{prefix}.{e.full_key}"
        raise ConfigError(
            omegaconf_error_line(e, _keys(OmegaConf.to_container(base), prefix))
        ) from None
    return check_fields(obj, prefix)


def check_fields(obj: Any, prefix: str) -> dict[str, Any]:
    """Runs the ``check`` of every field of schema instance ``obj`` (nested ones too)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            value = check_fields(value, key)
        elif "check" in f.metadata:
            value = f.metadata["check"](key, value)
        values[f.name] = value
    return values


_store = ConfigStore.instance()
_store.store(group="trainer", name="base_trainer", node=TrainerConfig)
_store.store(group="logger", name="base_logger", node=LoggerConfig)
