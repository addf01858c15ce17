"""Config -> objects (model, optimizer, datasets, algorithm) with ``hydra.utils.instantiate``;
construction errors become one-line ConfigErrors naming the config key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedjax_exp.experiment.errors import ConfigError


def _instantiate(key: str, node: Any, **kwargs: Any) -> Any:
    """``instantiate(node)`` with errors reported as one line naming ``key``."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__ or e
        if isinstance(cause, ConfigError):  # Already one line naming the key and the fix.
            raise ConfigError(str(cause)) from e
        message = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        target = node.get("_target_") if isinstance(node, Mapping) else None
        raise ConfigError(
            f"cannot build {key} from {target!r}: {type(cause).__name__}: {message}"
        ) from e
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot build {key}: {type(e).__name__}: {e}") from e


def build_model(cfg: DictConfig) -> Any:
    """The model of ``cfg.model`` with ``cfg.loss.fn`` as train loss and ``cfg.metrics``."""
    from fedjax_exp.core.models import Model

    model = _instantiate("model", cfg.model)
    if not isinstance(model, Model):
        raise ConfigError(
            f"model._target_={cfg.model.get('_target_')!r} returned {type(model).__name__}, "
            "not a fedjax_exp Model: point it at a function that returns a Model"
        )
    train_loss = _instantiate("loss.fn", cfg.loss.fn)
    metrics = {
        str(name): _instantiate(f"metrics.{name}", node) for name, node in cfg.metrics.items()
    }
    return model.replace(train_loss=train_loss, eval_metrics=metrics)


def build_optimizer(cfg: DictConfig) -> Any:
    """The optimizer of ``cfg.optimizer``; a schedule replaces its ``learning_rate``."""
    settings = OmegaConf.to_container(cfg.optimizer, resolve=True)
    assert isinstance(settings, dict)
    schedule = settings.pop("schedule", None) or {}
    kwargs = {}
    if schedule.get("_target_"):
        kwargs["learning_rate"] = _instantiate("optimizer.schedule", schedule)
    return _instantiate("optimizer", settings, **kwargs)


def build_datasets(cfg: DictConfig) -> tuple[Any, Any]:
    """``(train, test)`` federated data from ``cfg.dataset.loader``."""
    loaded = _instantiate("dataset.loader", cfg.dataset.loader)
    if isinstance(loaded, Mapping):
        loaded = (loaded.get("train"), loaded.get("test"))
    if not isinstance(loaded, tuple | list) or len(loaded) != 2:
        raise ConfigError(
            f"dataset.loader._target_={cfg.dataset.loader.get('_target_')!r} must return "
            f"(train, test) federated data, got {type(loaded).__name__}"
        )
    return loaded[0], loaded[1]


def build_model_and_data(cfg: DictConfig) -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(model, train_model, train_data, eval_splits)``: ``train_model`` computes in
    ``trainer.compute_dtype``; ``eval_splits``: train, test and any held-out validation. The
    data is checked against the model (:func:`.validation.check_data_features`) first."""
    from fedjax_exp.datasets.validation_split import apply_validation_split
    from fedjax_exp.experiment.parallel import with_compute_dtype
    from fedjax_exp.experiment.validation import check_data_features

    trainer = cfg.trainer
    model = build_model(cfg)
    train_data, test_data = build_datasets(cfg)
    try:
        train_data, validation_data = apply_validation_split(
            train_data, cfg.dataset.get("validation")
        )
    except ValueError as e:
        raise ConfigError(str(e)) from e
    splits = {"train": train_data, "test": test_data}
    if validation_data is not None:
        splits["validation"] = validation_data
    check_data_features(
        model,
        splits,
        batch_size=int(trainer.eval_batch_size),
        num_classes=cfg.dataset.get("num_classes"),
        input_shape=cfg.dataset.get("input_shape"),
    )
    train_model = with_compute_dtype(model, trainer.get("compute_dtype", "float32"))
    return model, train_model, train_data, splits


def build_algorithm(
    cfg: DictConfig, model: Any, optimizer: Any, train_data: Any, **overrides: Any
) -> Any:
    """The algorithm of ``cfg.algorithm``; ``overrides`` replace its config's arguments."""
    node = OmegaConf.to_container(cfg.algorithm, resolve=True)
    assert isinstance(node, dict)
    for key in overrides:  # Hydra would merge an object into the key's config, not replace it.
        node.pop(key, None)
    objects = {"model": model, "optimizer": optimizer, "train_data": train_data}
    return _instantiate("algorithm", node, **objects, **overrides)
