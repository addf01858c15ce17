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
    """The first ``num_batches`` padded batches of ``fd`` (all of them for None)."""
    from fedjax_exp.core.federated_data import padded_batch_federated_data

    batches = padded_batch_federated_data(fd, batch_size=batch_size)
    return list(itertools.islice(batches, num_batches))


def summarize_distribution(values: np.ndarray) -> dict[str, float]:
    """Mean, min, max and the :data:`PERCENTILES` (NumPy's linear interpolation) of
    per-client values, keyed ``mean``, ``min``, ``max``, ``p10``, ...

    Raises ValueError for no values (there is no distribution to summarise).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no per-client values to summarise: the split has no non-empty client")
    summary = {"mean": float(np.mean(values)), "min": float(np.min(values))}
    summary["max"] = float(np.max(values))
    for q, v in zip(PERCENTILES, np.percentile(values, PERCENTILES), strict=True):
        summary[f"p{q}"] = float(v)
    return summary


class Evaluator:
    """Evaluates a model's parameters on fixed subsets and on the whole test set.

    The periodic subsets (the first ``num_batches[split]`` padded batches of each split) are
    materialised once, so every periodic evaluation sees the same examples and costs no data
    loading. When a split's subset is the whole split, a final evaluation of the very
    parameters the last periodic evaluation saw (the same arrays: periodic evaluation at the
    last step) reuses its results instead of evaluating the same batches again.
    """

    def __init__(
        self,
        model: Any,
        datasets: Mapping[str, Any],
        batch_size: int,
        num_batches: Mapping[str, int | None],
    ):
        """``num_batches[split]``: batches of each periodic evaluation (None: all of them;
        0 or a missing split: that split is not evaluated periodically)."""
        self.model = model
        self.datasets = dict(datasets)
        self.batch_size = batch_size
        self._periodic: dict[str, list[Any]] = {}
        self._covers_split: dict[str, bool] = {}
        for split, fd in self.datasets.items():
            limit = num_batches.get(split, 0)
            if limit == 0:
                continue
            # One batch more than asked for tells whether the subset is the whole split.
            batches = first_padded_batches(fd, batch_size, None if limit is None else limit + 1)
            self._covers_split[split] = limit is None or len(batches) <= limit
            self._periodic[split] = batches if limit is None else batches[:limit]
        # (parameter leaves, {split: results}) of the latest periodic evaluation.
        self._latest: tuple[list[Any], dict[str, dict[str, Any]]] | None = None

    def periodic(self, params: Params) -> dict[str, float]:
        """``eval/<split>/<metric>`` on the fixed subsets."""
        import jax

        from fedjax_exp.core.models import evaluate_model

        results = {
            split: evaluate_model(self.model, params, batches)
            for split, batches in self._periodic.items()
        }
        self._latest = (jax.tree_util.tree_leaves(params), results)
        scalars: dict[str, float] = {}
        for split, split_results in results.items():
            scalars.update(flatten_results(f"eval/{split}", split_results))
        return scalars

    def _reusable(self, params: Params, split: str) -> dict[str, Any] | None:
        """The latest periodic results of ``split`` if they are the final ones of ``params``."""
        import jax

        if self._latest is None or not self._covers_split.get(split, False):
            return None
        leaves, results = self._latest
        current = jax.tree_util.tree_leaves(params)
        # Identity, not equality: JAX arrays are immutable, so the same array objects hold
        # the same values (a donated array is deleted, never changed in place).
        same = len(current) == len(leaves) and all(
            a is b for a, b in zip(current, leaves, strict=True)
        )
        return results.get(split) if same else None

    def final(self, params: Params, split: str = "test") -> dict[str, float]:
        """``final/<split>/<metric>`` over every example of ``split``."""
        from fedjax_exp.core.federated_data import padded_batch_federated_data
        from fedjax_exp.core.models import evaluate_model

        results = self._reusable(params, split)
        if results is None:
            batches = padded_batch_federated_data(self.datasets[split], batch_size=self.batch_size)
            results = evaluate_model(self.model, params, batches)
        return flatten_results(f"final/{split}", results)

    def per_client(
        self,
        params: Params,
        split: str = "test",
        max_clients: int | None = None,
        metric: str | None = None,
    ) -> tuple[dict[str, float], np.ndarray]:
        """The distribution of a metric over clients: its summary
        (``final/per_client/<split>/<metric>/<stat>``, see :func:`summarize_distribution`,
        plus ``final/per_client/<split>/num_clients``) and the per-client values, over the
        first ``max_clients`` non-empty clients (None: all).

        ``metric`` defaults to ``accuracy`` when the model has it, else its first metric; it
        must give one number per client.
        """
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
