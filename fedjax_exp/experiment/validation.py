"""Checks a run before it writes anything, so bad input fails in one line.

Two stages: :func:`validate_config` checks the composed config before anything is built, and
:func:`check_data_features` checks the loaded data against the built model (the features its
loss and metrics read) before training starts. Every check raises :class:`ConfigError` with a
message that names the offending key, the bad value and the fix.

This module itself imports no JAX (Hydra callbacks import it in a multirun's parent process);
:func:`check_targets` does import the modules that ``_target_`` s name, and those usually do.
Nothing here writes files except a probe file in the output dir (removed at once).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import itertools
import os
import pathlib
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fedjax_exp.experiment.errors import ConfigError

# Config subtrees that describe Hydra itself, not the experiment.
_SKIPPED_ROOTS = ("hydra",)


def check_writable_dir(path: str | os.PathLike[str]) -> str | None:
    """Returns why ``path`` cannot be used as an output dir, or None when it can.

    The dir is created if missing (Hydra would create it next anyway) and a probe file is
    written and removed: permission bits alone say nothing when running as root.
    """
    try:
        directory = pathlib.Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_probe_"):
            pass
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    return None


def locate(dotted_path: str) -> Any:
    """Imports ``pkg.module.attr`` (attributes may nest); raises ImportError with the reason."""
    if not isinstance(dotted_path, str) or not dotted_path:
        raise ImportError(f"expected a dotted path string, got {dotted_path!r}")
    parts = dotted_path.split(".")
    # Longest importable module prefix, then attribute lookups for the rest.
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            # The path itself not being a module (e.name is this prefix or one of its parents)
            # means: try a shorter prefix. A module that exists but imports a missing
            # dependency is a real error worth reporting.
            if e.name is not None and not _is_dotted_prefix(e.name, module_name):
                raise ImportError(f"importing {module_name!r} failed: {e}") from e
            continue
        except Exception as e:  # noqa: BLE001 - a module that raises on import (SyntaxError...)
            raise ImportError(f"importing {module_name!r} failed: {type(e).__name__}: {e}") from e
        for attr in parts[split:]:
            if not hasattr(obj, attr):
                raise ImportError(f"module {module_name!r} has no attribute path {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module named {parts[0]!r}")


def _is_dotted_prefix(prefix: str, name: str) -> bool:
    """Whether module ``prefix`` is ``name`` or one of its parent packages."""
    return name == prefix or name.startswith(prefix + ".")


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) for every leaf and container of a resolved plain container."""
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            yield path, value
            yield from _walk(value, path)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            path = f"{prefix}[{i}]"
            yield path, value
            yield from _walk(value, path)


def resolved_container(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain Python values, interpolations resolved, Hydra's own node dropped."""
    try:
        missing = [k for k in OmegaConf.missing_keys(cfg) if not k.startswith(_SKIPPED_ROOTS)]
    except OmegaConfBaseException as e:  # missing_keys resolves interpolations on its way.
        raise ConfigError(f"the config does not resolve: {str(e).splitlines()[0]}") from e
    if missing:
        keys = sorted(missing)
        verb = "is" if len(keys) == 1 else "are"
        settings = " ".join(f"{k}=VALUE" for k in keys)
        raise ConfigError(f"{', '.join(keys)} {verb} required but not set: add {settings}")
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        message = str(e).splitlines()[0]
        raise ConfigError(f"the config does not resolve: {message}") from e
    assert isinstance(container, dict)
    for root in _SKIPPED_ROOTS:
        container.pop(root, None)
    return container


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require_int(cfg: dict[str, Any], key: str, minimum: int, *, optional: bool = False) -> None:
    value = _select(cfg, key)
    if value is None and optional:
        return
    if not _is_int(value) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{key} must be {kind}, got {value!r}: set e.g. {key}={max(minimum, 1)}")


def _select(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# Every key of conf/trainer/default.yaml (a test keeps the two equal): the runner reads these
# and nothing else, so a key added with +trainer.KEY would be silently ignored.
TRAINER_KEYS = frozenset(
    {
        "steps",
        "batch_size",
        "client_buffer_size",
        "example_buffer_size",
        "log_every",
        "eval_every",
        "eval_batch_size",
        "eval_batches",
        "per_client_eval",
        "per_client_max_clients",
        "checkpoint_every",
        "keep_checkpoints",
        "resume",
        "progress_bar",
        "steps_per_dispatch",
        "prefetch",
        "device_data",
        "data_parallel",
        "reuse_host_memory",
        "compilation_cache",
        "compute_dtype",
        "vectorize",
    }
)
WANDB_MODES = ("offline", "online", "disabled", "shared")


def check_trainer(cfg: dict[str, Any]) -> None:
    """Only known trainer keys; step counts, batch sizes and intervals are integers in range."""
    if not isinstance(cfg.get("trainer"), dict):
        raise ConfigError("the config has no trainer section: add trainer=default")
    for key in sorted(set(cfg["trainer"]) - TRAINER_KEYS):
        near = difflib.get_close_matches(key, sorted(TRAINER_KEYS), n=1, cutoff=0.6)
        hint = f"did you mean trainer.{near[0]}?" if near else f"known: {sorted(TRAINER_KEYS)}"
        raise ConfigError(f"unknown key trainer.{key} (nothing reads it): {hint}")
    _require_int(cfg, "trainer.steps", 0)
    for key in ("batch_size", "client_buffer_size", "example_buffer_size", "eval_batch_size"):
        _require_int(cfg, f"trainer.{key}", 1)
    _require_int(cfg, "trainer.log_every", 1)
    _require_int(cfg, "trainer.keep_checkpoints", 1)
    for key in ("eval_every", "checkpoint_every"):
        _require_int(cfg, f"trainer.{key}", 0)
    for split in ("train", "test"):
        _require_int(cfg, f"trainer.eval_batches.{split}", 0, optional=True)
    _require_int(cfg, "trainer.per_client_max_clients", 1, optional=True)
    # Non-negative: NumPy's generators (data shuffling, synthetic data) reject negative seeds.
    _require_int(cfg, "seed", 0)


def check_logger(cfg: dict[str, Any]) -> None:
    """A W&B mode W&B knows (W&B itself only warns and turns logging off)."""
    mode = _select(cfg, "logger.wandb.mode")
    if mode is not None and mode not in WANDB_MODES:
        raise ConfigError(
            f"logger.wandb.mode must be one of {list(WANDB_MODES)}, got {mode!r}: e.g. "
            "logger.wandb.mode=offline (or logger=local for no W&B)"
        )


def check_learning_rate(cfg: dict[str, Any]) -> None:
    """A configured learning rate (and schedule peak) is a positive finite number."""
    optimizer = cfg.get("optimizer")
    if not isinstance(optimizer, dict):
        raise ConfigError("the config has no optimizer section: add optimizer=adam (or another)")
    if "learning_rate" not in optimizer:
        return  # A user optimizer by _target_ may take no learning rate.
    lr = optimizer["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, Real) or not (0 < lr < float("inf")):
        raise ConfigError(
            f"optimizer.learning_rate must be a positive number, got {lr!r}: "
            "set e.g. optimizer.learning_rate=1e-3"
        )


def check_schedule(cfg: dict[str, Any]) -> None:
    """A learning-rate schedule's step counts are in range (optax's own errors for these name
    its internals, e.g. a negative ``decay_steps`` when the warm-up is longer than the run)."""
    schedule = _select(cfg, "optimizer.schedule")
    if not isinstance(schedule, dict) or not schedule.get("_target_"):
        return
    for key in ("decay_steps", "transition_steps"):
        if key in schedule:
            _require_int(cfg, f"optimizer.schedule.{key}", 1)
    if "warmup_steps" in schedule:
        _require_int(cfg, "optimizer.schedule.warmup_steps", 0)
        decay = schedule.get("decay_steps")
        if _is_int(decay) and schedule["warmup_steps"] > decay:
            raise ConfigError(
                f"optimizer.schedule.warmup_steps={schedule['warmup_steps']} exceeds "
                f"optimizer.schedule.decay_steps={decay} (the whole schedule, by default "
                "trainer.steps): lower the warm-up or raise trainer.steps"
            )


def check_paths(cfg: dict[str, Any]) -> None:
    """Every ``*_path`` setting of the dataset names an existing file or dir."""
    for key, value in _walk(cfg.get("dataset") or {}, "dataset"):
        if (
            key.endswith("_path")
            and value is not None
            and (not isinstance(value, str) or not os.path.exists(value))
        ):
            raise ConfigError(
                f"{key}={value!r} does not exist: give the path of an existing file "
                f"(relative paths are taken from {os.getcwd()})"
            )


def check_targets(cfg: dict[str, Any]) -> None:
    """Every ``_target_`` imports."""
    for key, value in _walk(cfg):
        if key.endswith("._target_") or key == "_target_":
            try:
                locate(value)
            except ImportError as e:
                raise ConfigError(
                    f"{key}={value!r} cannot be imported ({e}): check the dotted path and that "
                    "its package is installed or on PYTHONPATH"
                ) from e


def check_resume(cfg: dict[str, Any]) -> None:
    """``trainer.resume`` is true, false or an existing path."""
    resume = _select(cfg, "trainer.resume")
    if isinstance(resume, bool) or resume is None:
        return
    if not isinstance(resume, str) or not os.path.exists(resume):
        raise ConfigError(
            f"trainer.resume={resume!r} does not exist: give a run dir, its checkpoints/ dir or "
            "one checkpoint step dir (or true/false)"
        )


def check_optimized_metric(cfg: dict[str, Any]) -> None:
    """``optimized_metric`` (what run.py returns to Optuna) names a final metric the run will
    compute: ``final/test/<one of metrics>`` or another ``final/...`` key such as
    ``final/per_client/test/accuracy/mean``. Checked up front so a sweep does not train every
    trial only to fail at the end."""
    key = cfg.get("optimized_metric")
    if key is None:
        return
    parts = str(key).split("/")
    names = set(cfg.get("metrics") or {})
    if len(parts) < 3 or parts[0] != "final" or (parts[1] == "test" and parts[2] not in names):
        options = ", ".join(f"final/test/{n}" for n in sorted(names))
        raise ConfigError(f"optimized_metric={key!r} is not a final metric; use one of: {options}")


def validate_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Runs every check; returns the resolved plain config. Raises ConfigError."""
    container = resolved_container(cfg) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    check_trainer(container)
    check_logger(container)
    check_learning_rate(container)
    check_schedule(container)
    check_paths(container)
    check_resume(container)
    check_targets(container)
    check_optimized_metric(container)
    return container


# ---- the loaded data against the built model ------------------------------------------------

# Metric attributes that name prediction keys, not example features.
_PREDICTION_KEY_ATTRIBUTES = ("pred_key",)


def _signature_target_key(fn: Any) -> str | None:
    """The ``target_key`` a loss function reads (its default, or the value a partial binds)."""
    try:
        parameter = inspect.signature(fn).parameters.get("target_key")
    except (TypeError, ValueError):  # Builtins and some C callables have no signature.
        return None
    if parameter is None or not isinstance(parameter.default, str):
        return None
    return parameter.default


def metric_feature_keys(metric: Any, path: str) -> list[tuple[str, str]]:
    """``(config path of the attribute, feature key)`` for every example feature ``metric``
    reads: its ``*_key`` attributes (``target_key``, ``domain_id_key``, ...), those of nested
    metrics (e.g. ``PerDomainMetric.base``) and the ``target_key`` of wrapped loss functions.
    ``path`` names the metric in the config, e.g. ``metrics.accuracy``."""
    if not dataclasses.is_dataclass(metric):
        return []
    keys: list[tuple[str, str]] = []
    for f in dataclasses.fields(metric):
        value = getattr(metric, f.name, None)
        attribute = f"{path}.{f.name}"
        if f.name.endswith("_key") and f.name not in _PREDICTION_KEY_ATTRIBUTES:
            if isinstance(value, str):
                keys.append((attribute, value))
        elif hasattr(value, "evaluate_example"):
            keys.extend(metric_feature_keys(value, attribute))
        elif callable(value) and (key := _signature_target_key(value)) is not None:
            keys.append((f"{attribute}.target_key", key))
    return keys


def _first_batch(fd: Any, batch_size: int) -> dict[str, Any] | None:
    from fedjax_exp.core.federated_data import padded_batch_federated_data

    return next(iter(padded_batch_federated_data(fd, batch_size=batch_size)), None)


class _FeatureValues:
    """One split's feature values for the data checks: a feature's whole column when the
    store holds it as a column (cheap), else that of the real examples in the first
    ``scan_batches`` padded batches, read once for all the checks of the split."""

    def __init__(self, fd: Any, batch_size: int, scan_batches: int | None):
        self._fd = fd
        self._batch_size = batch_size
        self._scan_batches = scan_batches
        self._scanned: dict[str, Any] | None = None

    def __call__(self, key: str) -> Any:
        import numpy as np

        columns = getattr(self._fd, "columns", None)
        if isinstance(columns, Mapping) and key in columns:
            return np.asarray(columns[key])
        if self._scanned is None:
            self._scanned = self._scan()
        return self._scanned.get(key, np.zeros(0, np.int32))

    def _scan(self) -> dict[str, Any]:
        import numpy as np

        from fedjax_exp.core.federated_data import padded_batch_federated_data
        from fedjax_exp.core.typing import EXAMPLE_MASK_KEY

        batches = padded_batch_federated_data(self._fd, batch_size=self._batch_size)
        real: dict[str, list[Any]] = {}
        for batch in itertools.islice(batches, self._scan_batches):
            mask = np.asarray(batch.get(EXAMPLE_MASK_KEY, True), bool)
            for key, value in batch.items():
                value = np.asarray(value)
                real.setdefault(key, []).append(value[np.broadcast_to(mask, value.shape[:1])])
        return {key: np.concatenate(parts) for key, parts in real.items()}


def _check_domains(path: str, metric: Any, values: _FeatureValues, split: str) -> None:
    import numpy as np

    key = metric.domain_id_key
    ids = values(key)
    if ids.size == 0:
        return
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(
            f"{path} needs integer domain ids, but the {split} data's {key!r} is {ids.dtype}: "
            f"point {path}.domain_id_key at an integer feature"
        )
    low, high = int(ids.min()), int(ids.max())
    num_domains = metric.num_domains
    if low < 0 or high >= num_domains:
        # PerDomainMetric silently drops examples outside [0, num_domains).
        raise ConfigError(
            f"{path}.num_domains={num_domains} does not cover the {split} data's domain ids "
            f"{low}..{high} (feature {key!r}): set {path}.num_domains={max(high + 1, 1)}"
            + (" and use non-negative domain ids" if low < 0 else "")
        )
    empty = sorted(set(range(num_domains)) - {int(i) for i in np.unique(ids)})
    if empty:
        # Not an error (a small split may miss a domain), but an empty domain's accuracy is
        # reported as 0, which reads like a real result.
        warnings.warn(
            f"{path}.num_domains={num_domains} but the {split} data has no examples of domain(s) "
            f"{empty}: their results will read 0; set {path}.num_domains={high + 1} if the data "
            "has no more domains",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_finite(values: _FeatureValues, batch: Mapping[str, Any], split: str) -> None:
    import numpy as np

    for key, value in batch.items():
        if not np.issubdtype(np.asarray(value).dtype, np.floating):
            continue
        column = values(key)
        rows = column.reshape(len(column), -1)
        chunk = 1 << 14  # Rows per pass: bounds the temporary mask for full-size columns.
        bad = np.concatenate(
            [
                start + np.flatnonzero(~np.isfinite(rows[start : start + chunk]).all(axis=1))
                for start in range(0, len(rows), chunk)
            ]
            or [np.zeros(0, np.int64)]
        )
        if bad.size:
            # Else the loss turns NaN at the first step and the run stops as "diverged",
            # which points at the learning rate rather than at the data.
            raise ConfigError(
                f"the {split} data has NaN or infinite values in feature {key!r} ({bad.size} "
                f"example(s), the first at row {int(bad[0])}): clean or filter the data"
            )


def _check_labels(key: str, num_classes: int, values: _FeatureValues, split: str) -> None:
    import numpy as np

    labels = values(key)
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        return  # Not class indices (e.g. one-hot or regression targets): nothing to check.
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        # Out-of-range labels train silently: the loss reads no logit for them.
        raise ConfigError(
            f"the {split} data has labels {low}..{high} (feature {key!r}) but "
            f"dataset.num_classes={num_classes}: set dataset.num_classes={high + 1}"
            + (" and use non-negative labels" if low < 0 else "")
            + " or fix the data"
        )


def check_data_features(
    model: Any,
    datasets: Mapping[str, Any],
    *,
    batch_size: int = 16,
    scan_batches: int | None = 16,
    num_classes: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> None:
    """Checks, before training, that the data has every feature the model's loss and metrics
    read, that per-domain metrics cover the data's domain ids, and (given ``num_classes`` and
    ``input_shape``) that integer labels are class indices below it and that the examples'
    ``x`` has the configured shape.

    Without this, a missing feature (e.g. ``domain_id`` for ``metrics=full``) surfaces only
    when the first evaluation runs, after training time was spent.

    Args:
      model: The built Model (``train_loss`` and ``eval_metrics`` are inspected; metric names
        are reported as ``metrics.<name>``, as in the config).
      datasets: Split name -> federated data, e.g. ``{"train": ..., "test": ...}``. Every split
        is checked for the metrics' features (periodic evaluation covers train and test); the
        ``"train"`` split also for the training loss's ``target_key``.
      batch_size: Batch size of the padded batch whose features are inspected.
      scan_batches: Domain ids and labels come from the whole column of in-memory column
        stores; for other stores (or features made by preprocessing), from the first
        ``scan_batches`` padded batches (None: all).
      num_classes: The number of classes (``dataset.num_classes``); None skips the check of
        the labels (the training loss's ``target_key``, default ``y``).
      input_shape: One example's ``x`` shape (``dataset.input_shape``); None skips it.

    Raises:
      ConfigError: one line naming the missing feature (or the uncovered domain ids) and the
        fix.
    """
    import numpy as np

    from fedjax_exp.core.typing import EXAMPLE_MASK_KEY

    for split, fd in datasets.items():
        if fd is None:
            continue
        batch = _first_batch(fd, batch_size)
        # No data gives no batch, or (as in FedJAX) one batch that is all padding.
        if batch is None or not np.any(batch.get(EXAMPLE_MASK_KEY, True)):
            raise ConfigError(f"the {split} data has no examples: check the dataset settings")
        features = sorted(k for k in batch if k != EXAMPLE_MASK_KEY)
        values = _FeatureValues(fd, batch_size, scan_batches)
        if input_shape is not None and "x" in batch:
            shape = tuple(np.shape(batch["x"])[1:])
            if shape != tuple(input_shape):
                # Else the model fails inside its first call, naming a weight's shape.
                raise ConfigError(
                    f"the {split} data's examples have shape {list(shape)} (feature 'x') but "
                    f"dataset.input_shape={list(input_shape)}: set dataset.input_shape="
                    f"{list(shape)} and pick a model for that shape (the EMNIST models take "
                    "[28, 28, 1])"
                )
        needed = [
            (attribute, key)
            for name, metric in model.eval_metrics.items()
            for attribute, key in metric_feature_keys(metric, f"metrics.{name}")
        ]
        loss_key = _signature_target_key(model.train_loss) if split == "train" else None
        if loss_key is not None:
            needed.append(("loss.fn.target_key", loss_key))
        for attribute, key in needed:
            if key in batch:
                continue
            if attribute.endswith("domain_id_key"):
                fix = (
                    "use a dataset with domain ids (dataset=sample, emnist or synthetic) or "
                    "metrics without per-domain accuracy (metrics=default)"
                )
            else:
                fix = f"set {attribute} to one of them"
            raise ConfigError(
                f"{attribute.rsplit('.', 1)[0]} reads the feature {key!r} ({attribute}), but the "
                f"{split} data has only {features}: {fix}"
            )
        for name, metric in model.eval_metrics.items():
            if hasattr(metric, "num_domains") and hasattr(metric, "domain_id_key"):
                _check_domains(f"metrics.{name}", metric, values, split)
        _check_finite(values, batch, split)
        label_key = _signature_target_key(model.train_loss) or "y"
        if num_classes is not None and label_key in batch:
            _check_labels(label_key, int(num_classes), values, split)
