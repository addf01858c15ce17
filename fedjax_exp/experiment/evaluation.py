"""What to evaluate and when: periodic checks on a few batches, the final full test pass,
and the per-client accuracy distribution."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedjax_exp.core.typing import Params

PERCENTILES = (10, 25, 50, 75, 90)


def flatten_results(prefix: str, results: Mapping[str, Any]) -> dict[str, float]:
    """``{name: value}`` -> ``{prefix/name: float}``; vector results (e.g. per-domain
    accuracy) become one key per entry, ``prefix/name/i``."""
    flat: dict[str, float] = {}
    for name, value in results.items():
        array = np.asarray(value)
        if array.ndim == 0:
            flat[f"{prefix}/{name}"] = float(array)
        else:
            for i, v in enumerate(array.reshape(-1)):
                flat[f"{prefix}/{name}/{i}"] = float(v)
    return flat


def first_padded_batches(fd: Any, batch_size: int, num_batches: int | None) -> list[Any]:
    from fedjax_exp.core.federated_data import padded_batch_federated_data

    batches = padded_batch_federated_data(fd, batch_size=batch_size)
    return list(itertools.islice(batches, num_batches))


def summarize_distribution(values: np.ndarray) -> dict[str, float]:
    """``mean``, ``min``, ``max`` and ``p10``... (:data:`PERCENTILES`) of per-client values."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no per-client values to summarise: the split has no non-empty client")
    summary = {"mean": np.mean(values), "min": np.min(values), "max": np.max(values)}
    percentiles = np.percentile(values, PERCENTILES)
    summary.update({f"p{q}": percentiles[i] for i, q in enumerate(PERCENTILES)})
    return {k: float(v) for k, v in summary.items()}


class Evaluator:
    """Evaluates parameters periodically on fixed batches (the first ``num_batches[split]``
    of each split, None: all, 0: none; or ``periodic_batches[split]``), and finally on whole
    splits."""

    def __init__(
        self,
        model: Any,
        datasets: Mapping[str, Any],
        batch_size: int,
        num_batches: Mapping[str, int | None],
        periodic_batches: Mapping[str, list[Any]] | None = None,
    ):
        self.model = model
        self.datasets = dict(datasets)
        self.batch_size = batch_size
        self._periodic = {
            split: first_padded_batches(fd, batch_size, num_batches.get(split, 0))
            for split, fd in self.datasets.items()
            if num_batches.get(split, 0) != 0
        }
        self._periodic.update(
            {k: v for k, v in (periodic_batches or {}).items() if k in self._periodic}
        )

    def periodic(self, params: Params) -> dict[str, float]:
        from fedjax_exp.core.models import evaluate_model

        scalars: dict[str, float] = {}
        for split, batches in self._periodic.items():
            results = evaluate_model(self.model, params, batches)
            scalars.update(flatten_results(f"eval/{split}", results))
        return scalars

    def final(self, params: Params, split: str = "test") -> dict[str, float]:
        from fedjax_exp.core.federated_data import padded_batch_federated_data
        from fedjax_exp.core.models import evaluate_model

        # Streamed: the whole split is never held in memory as batches at once.
        batches = padded_batch_federated_data(self.datasets[split], batch_size=self.batch_size)
        return flatten_results(f"final/{split}", evaluate_model(self.model, params, batches))

    def per_client(
        self,
        params: Params,
        split: str = "test",
        max_clients: int | None = None,
        metric: str | None = None,
    ) -> tuple[dict[str, float], np.ndarray]:
        """The summary (``final/per_client/<split>/<metric>/<stat>`` and ``.../num_clients``)
        and values of a scalar ``metric`` (default: accuracy, else the first) over the first
        ``max_clients`` non-empty clients."""
        from fedjax_exp.core.models import evaluate_model

        if metric is None:
            metric = "accuracy" if "accuracy" in self.model.eval_metrics else None
            metric = metric or next(iter(self.model.eval_metrics))
        elif metric not in self.model.eval_metrics:
            raise ValueError(
                f"per-client metric {metric!r} is not one of {list(self.model.eval_metrics)}"
            )
        values = []
        for _, dataset in self.datasets[split].clients():
            if len(dataset) == 0:
                continue
            batches = dataset.padded_batch(batch_size=self.batch_size)
            result = np.asarray(evaluate_model(self.model, params, batches)[metric])
            if result.ndim != 0:
                raise ValueError(
                    f"per-client metric {metric!r} gives an array of shape {result.shape}, "
                    "not one number per client: pick a scalar metric such as accuracy"
                )
            values.append(float(result))
            if max_clients is not None and len(values) >= max_clients:
                break
        values_array = np.asarray(values, dtype=np.float64)
        prefix = f"final/per_client/{split}/{metric}"
        summary = {f"{prefix}/{k}": v for k, v in summarize_distribution(values_array).items()}
        summary[f"final/per_client/{split}/num_clients"] = float(len(values))
        return summary, values_array
