"""Checks a run before it writes anything, each failure one ConfigError line naming the key,
the value and the fix: :func:`validate_config` (the schemas of :mod:`.config_schema`, then
what no schema says) and :func:`check_data_features` (the data against the model). No JAX
import: Hydra callbacks import this module in a multirun's parent process."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import logging
import math
import os
import pathlib
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from fedjax_exp.experiment.config_schema import SCHEMAS, integer
from fedjax_exp.experiment.errors import ConfigError

# What people type for a key -> this project's name for it (tried before the spelling).
ALIASES = {
    **dict.fromkeys(["lr", "learningrate", "step_size", "eta"], ("learning_rate",)),
    **dict.fromkeys(["epochs", "num_steps", "iterations", "rounds"], ("steps",)),
    "beta1": ("b1",),
    "beta2": ("b2",),
    "beta": ("momentum", "b1"),
    "momentum": ("b1",),
    "epsilon": ("eps",),
    "wd": ("weight_decay",),
    "bs": ("batch_size",),
}


def suggest_key(key: str, known: Iterable[str]) -> str | None:
    """The known key ``key`` most likely meant: an alias among its siblings (``optimizer.lr``
    -> ``optimizer.learning_rate``), else the closest by spelling, else None."""
    parent, _, leaf = key.rpartition(".")
    known = sorted(set(known))
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    alias = next((a for a in ALIASES.get(leaf.lower(), ()) if a in siblings), None)
    if alias or siblings:  # Spelling of leaves only: a shared prefix makes all alike (lr ~ b2).
        near = [alias] if alias else difflib.get_close_matches(leaf, list(siblings), 1, 0.6)
        return siblings[near[0]] if near else None
    near = difflib.get_close_matches(key, known, 1, 0.6)
    return near[0] if near else None


def unknown_key_message(key: str, known: Iterable[str]) -> str:
    near = suggest_key(key, known)
    hint = f"did you mean {near!r}?" if near else "`python run.py --cfg job` prints every key"
    return f"unknown config key {key!r}; {hint}"


def omegaconf_error_line(error: OmegaConfBaseException, known: Iterable[str] = ()) -> str:
    """OmegaConf's multi-line error as one line: the key, the value and what it must be."""
    key, first = str(error.full_key or error.key), str(error.msg or error).splitlines()[0]
    if isinstance(error, ConfigKeyError) and "not in" in first:
        return unknown_key_message(key, known)
    if isinstance(error, MissingMandatoryValue):
        return f"{key} is required but not set: add {key}=VALUE"
    types = {"bool": "true or false", "Float": "a number", "Integer": "an integer"}
    wanted = next((w for word, w in types.items() if word in first), None)
    if wanted:
        return f"{key} must be {wanted}, got {error.value!r}"
    return f"{key}={error.value!r} is not valid: {first}"


def check_section(schema: type, values: Any, prefix: str) -> dict[str, Any]:
    """``values`` checked against ``schema`` (unknown keys, types, each field's ``check``), as
    plain Python with counts as int (1e3 -> 1000)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix} must be a mapping of its settings, got {values!r}")
    base = OmegaConf.structured(schema)
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(base, values))
    except OmegaConfBaseException as e:
        e.full_key = f"{prefix}.{e.full_key}"
        known = [prefix + k for k, _ in walk(OmegaConf.to_container(base), ".")]
        raise ConfigError(omegaconf_error_line(e, known)) from None
    checked = {}
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(value):
            value = check_section(type(value), dataclasses.asdict(value), key)
        elif "schema" in f.metadata and value is not None:
            value = check_section(f.metadata["schema"], value, key)
        elif "check" in f.metadata:
            value = f.metadata["check"](key, value)
        checked[f.name] = value
    return checked


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain Python, resolved, without Hydra's node."""
    try:
        missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra"))
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            settings = " ".join(f"{k}=VALUE" for k in missing)
            raise ConfigError(f"{', '.join(missing)} {verb} required but not set: add {settings}")
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"the config does not resolve: {str(e).splitlines()[0]}") from None
    assert isinstance(container, dict)
    container.pop("hydra", None)
    return container


def validate_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Checks the config; returns it resolved as plain Python. Counts given as exact floats
    become ints in ``cfg`` too, so their interpolations are ints."""
    cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    resolve(cfg)  # Missing values and broken interpolations first: the sections need both.
    for section, (schema, option) in SCHEMAS.items():
        if cfg.get(section) is None:
            raise ConfigError(f"the config has no {section} section: add {option}")
        values = OmegaConf.to_container(cfg[section], resolve=True)
        _write_back(cfg, section, values, check_section(schema, values, section))
    # Non-negative: NumPy's generators refuse negative seeds.
    _write_back(cfg, "seed", cfg.get("seed"), integer("seed", cfg.get("seed"), 0))
    container = resolve(cfg)
    optimizer = container.get("optimizer")
    if not isinstance(optimizer, dict):
        raise ConfigError("the config has no optimizer section: add optimizer=adam (or another)")
    lr = optimizer.get("learning_rate", 1.0)  # A user optimizer may take no learning rate.
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise ConfigError(
            f"optimizer.learning_rate must be a positive number, got {lr!r}: "
            "set e.g. optimizer.learning_rate=1e-3"
        )
    _check_schedule(optimizer.get("schedule") or {})
    for key, value in walk(container):
        is_path = key.startswith("dataset.") and key.endswith("_path") and value is not None
        if is_path and (not isinstance(value, str) or not os.path.exists(value)):
            raise ConfigError(
                f"{key}={value!r} does not exist: give the path of an existing file "
                f"(relative paths are taken from {os.getcwd()})"
            )
        if key.endswith("_target_"):
            _import(key, value)
    metric, names = container.get("optimized_metric"), sorted(container.get("metrics") or {})
    parts = str(metric).split("/")
    if metric is not None and (
        len(parts) < 3 or parts[0] != "final" or (parts[1] == "test" and parts[2] not in names)
    ):
        options = ", ".join(f"final/test/{n}" for n in names)
        raise ConfigError(
            f"optimized_metric={metric!r} is not a final metric; use one of: {options}"
        )
    return container


def _write_back(cfg: DictConfig, key: str, old: Any, new: Any) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for name, value in new.items():
            _write_back(cfg, f"{key}.{name}", old.get(name), value)
    elif type(old) is not type(new) or old != new:
        OmegaConf.update(cfg, key, new)


def _check_schedule(schedule: dict[str, Any]) -> None:
    """Step counts of a learning-rate schedule (optax's errors name its internals)."""
    for key in ("decay_steps", "transition_steps", "warmup_steps"):
        if key in schedule:
            integer(f"optimizer.schedule.{key}", schedule[key], 0 if key[0] == "w" else 1)
    warmup, decay = schedule.get("warmup_steps", 0), schedule.get("decay_steps", math.inf)
    if warmup > decay:
        raise ConfigError(
            f"optimizer.schedule.warmup_steps={warmup} exceeds optimizer.schedule.decay_steps="
            f"{decay} (the whole schedule, by default trainer.steps): lower the warm-up or raise "
            "trainer.steps"
        )


def walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in node.items() if isinstance(node, dict) else ():
        yield f"{prefix}{key}", value
        yield from walk(value, f"{prefix}{key}.")


def _import(key: str, path: Any) -> Any:
    """``get_object(path)``; a failure as one ConfigError line (not also logged)."""
    hydra_log = logging.getLogger("hydra.utils")
    disabled, hydra_log.disabled = hydra_log.disabled, True
    try:
        return get_object(path)
    except Exception as e:  # noqa: BLE001 - any import error (ImportError, SyntaxError, ...).
        cause = e.__cause__ or e
        raise ConfigError(
            f"{key}={path!r} cannot be imported ({type(cause).__name__}: {cause}): check the "
            "dotted path and that its package is installed or on PYTHONPATH"
        ) from None
    finally:
        hydra_log.disabled = disabled


def check_writable_dir(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be an output dir, or None; creates it and writes a probe file
    (permission bits say nothing for root)."""
    try:
        pathlib.Path(path).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def _target_key(fn: Any) -> str | None:
    """The ``target_key`` default (or partial binding) of a loss function, or None."""
    try:
        default = inspect.signature(fn).parameters["target_key"].default
    except (KeyError, TypeError, ValueError):
        return None
    return default if isinstance(default, str) else None


def metric_feature_keys(metric: Any, path: str) -> list[tuple[str, str]]:
    """``(config key, feature)`` of every feature ``metric`` (at ``path``) reads: ``*_key``
    fields but ``pred_key``, nested metrics' and wrapped loss functions' ``target_key``."""
    keys: list[tuple[str, str]] = []
    for f in dataclasses.fields(metric) if dataclasses.is_dataclass(metric) else ():
        value, attribute = getattr(metric, f.name, None), f"{path}.{f.name}"
        if f.name.endswith("_key") and f.name != "pred_key" and isinstance(value, str):
            keys.append((attribute, value))
        elif hasattr(value, "evaluate_example"):
            keys.extend(metric_feature_keys(value, attribute))
        elif callable(value) and (key := _target_key(value)) is not None:
            keys.append((f"{attribute}.target_key", key))
    return keys


def check_data_features(
    model: Any,
    datasets: Mapping[str, Any],
    *,
    batch_size: int = 16,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> None:
    """Checks, before training, what would fail (or mislead) later: each split has examples of
    ``input_shape`` with the features the metrics (and loss) read, finite floats, domain ids
    its per-domain metrics cover and labels below ``num_classes``. Reads whole columns where
    the store keeps them, else the first 16 batches."""
    import numpy as np

    from fedjax_exp.core.typing import EXAMPLE_MASK_KEY
    from fedjax_exp.experiment.evaluation import first_padded_batches

    for split, fd in ((s, fd) for s, fd in datasets.items() if fd is not None):
        batches = first_padded_batches(fd, batch_size, 16)
        masks = [np.asarray(b[EXAMPLE_MASK_KEY], bool) for b in batches]
        columns = fd.columns if isinstance(getattr(fd, "columns", None), Mapping) else {}
        values = {
            k: np.asarray(columns[k])
            if k in columns
            else np.concatenate([np.asarray(b[k])[m] for b, m in zip(batches, masks, strict=True)])
            for k in (batches[0] if batches else ())
            if k != EXAMPLE_MASK_KEY
        }
        if not values or not len(next(iter(values.values()))):
            raise ConfigError(f"the {split} data has no examples: check the dataset settings")
        shape = values["x"].shape[1:] if "x" in values else None
        if input_shape is not None and shape is not None and shape != tuple(input_shape):
            raise ConfigError(
                f"the {split} data's examples have shape {list(shape)} (feature 'x') but "
                f"dataset.input_shape={list(input_shape)}: set dataset.input_shape={list(shape)} "
                "and pick a model for that shape (the EMNIST models take [28, 28, 1])"
            )
        needed = [
            ak
            for n, m in model.eval_metrics.items()
            for ak in metric_feature_keys(m, f"metrics.{n}")
        ]
        if split == "train" and (loss_key := _target_key(model.train_loss)) is not None:
            needed.append(("loss.fn.target_key", loss_key))
        for attribute, key in needed:
            if key not in values:
                fix = (
                    "use a dataset with domain ids (dataset=sample, emnist or synthetic) or "
                    "metrics without per-domain accuracy (metrics=default)"
                    if attribute.endswith("domain_id_key")
                    else f"set {attribute} to one of them"
                )
                raise ConfigError(
                    f"{attribute.rsplit('.', 1)[0]} reads the feature {key!r} ({attribute}), but "
                    f"the {split} data has only {sorted(values)}: {fix}"
                )
        for name, metric in model.eval_metrics.items():
            if hasattr(metric, "num_domains") and hasattr(metric, "domain_id_key"):
                _check_domains(f"metrics.{name}", metric, values[metric.domain_id_key], split)
        for key, value in values.items():  # Else the run "diverges" at once, blaming the lr.
            # One float64 sum, no temporary the size of the column: a NaN or inf in it spreads.
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(
                np.sum(value, dtype=np.float64)
            ):
                finite = np.isfinite(value.reshape(len(value), -1)).all(axis=1)
                if not finite.all():  # Else only the sum overflowed.
                    raise ConfigError(
                        f"the {split} data has NaN or infinite values in feature {key!r} (first "
                        f"at row {int(np.argmin(finite))}): clean or filter the data"
                    )
        label_key = _target_key(model.train_loss) or "y"
        labels = values.get(label_key, np.zeros(0, np.float32))
        if num_classes is not None and np.issubdtype(labels.dtype, np.integer):
            low, high = int(labels.min()), int(labels.max())
            if low < 0 or high >= num_classes:  # The loss would read no logit for them.
                raise ConfigError(
                    f"the {split} data has labels {low}..{high} (feature {label_key!r}) but "
                    f"dataset.num_classes={num_classes}: set dataset.num_classes={high + 1}"
                    + (" and use non-negative labels" if low < 0 else "")
                    + " or fix the data"
                )


def _check_domains(path: str, metric: Any, ids: Any, split: str) -> None:
    import numpy as np

    key, num_domains = metric.domain_id_key, metric.num_domains
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(
            f"{path} needs integer domain ids, but the {split} data's {key!r} is {ids.dtype}: "
            f"point {path}.domain_id_key at an integer feature"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_domains:  # PerDomainMetric drops such examples silently.
        raise ConfigError(
            f"{path}.num_domains={num_domains} does not cover the {split} data's domain ids "
            f"{low}..{high} (feature {key!r}): set {path}.num_domains={max(high + 1, 1)}"
            + (" and use non-negative domain ids" if low < 0 else "")
        )
    empty = sorted(set(range(num_domains)) - set(np.unique(ids).tolist()))
    if empty:  # An empty domain's accuracy reads 0, which looks like a result.
        warnings.warn(
            f"{path}.num_domains={num_domains} but the {split} data has no examples of domain(s) "
            f"{empty}: their results will read 0; set {path}.num_domains={high + 1} if the data "
            "has no more domains",
            RuntimeWarning,
            stacklevel=3,
        )
