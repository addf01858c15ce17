"""The aggregator interface and the weighted mean (``fedjax.aggregators.Aggregator``).

An aggregator turns one round's client outputs into the server's single update. Like an
optimizer it is a pair of functions around an explicit state, which carries whatever must
survive from round to round (a compressor's rng and bit count, for example)::

    aggregator = mean_aggregator()
    state = aggregator.init()
    for round_num in range(num_rounds):
        clients_params_and_weights = [(client_id, delta, num_examples), ...]
        aggregated, state = aggregator.apply(clients_params_and_weights, state)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import jax
import numpy as np

from fedjax_exp.core import dataclasses, tree_util
from fedjax_exp.core.typing import ClientId, Params, PyTree

__all__ = [
    "Aggregator",
    "AggregatorState",
    "MeanAggregatorState",
    "check_matching_params",
    "mean_aggregator",
]

AggregatorState = PyTree

# One client's contribution to a round: its id, its parameters (or update) and its weight.
ClientParamsAndWeight = tuple[ClientId, Params, float]


@dataclasses.dataclass
class Aggregator:
    """An aggregation rule as two functions.

    Attributes:
        init: ``init() -> state``, the state before the first round.
        apply: ``apply(clients_params_and_weights, state) -> (aggregated, state)``, where
            ``clients_params_and_weights`` is an iterable of ``(client_id, params, weight)``
            (read once, so it may be a generator) and ``aggregated`` a single pytree of the
            clients' structure.
    """

    init: Callable[[], AggregatorState]
    apply: Callable[
        [Iterable[ClientParamsAndWeight], AggregatorState], tuple[Params, AggregatorState]
    ]


@dataclasses.dataclass
class MeanAggregatorState:
    """The weighted mean keeps no state between rounds."""


def _dtype(leaf: object) -> np.dtype:
    # JAX arrays carry .dtype; np.result_type on them is deprecated. Python scalars do not.
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else np.result_type(leaf)


def _signature(params: Params) -> tuple[jax.tree_util.PyTreeDef, list[tuple]]:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return treedef, [(np.shape(leaf), _dtype(leaf)) for leaf in leaves]


class _LeafSpec(str):
    """A leaf's ``dtype[shape]``, printed without quotes inside its tree."""

    __repr__ = str.__str__


def _summary(params: Params) -> str:
    """The tree with every leaf shown as ``dtype[shape]``, e.g. ``{'b': float32[2]}``."""
    return str(
        jax.tree_util.tree_map(
            lambda leaf: _LeafSpec(f"{_dtype(leaf)}{list(np.shape(leaf))}"), params
        )
    )


def check_matching_params(
    clients_params_and_weights: Iterable[ClientParamsAndWeight],
) -> Iterator[ClientParamsAndWeight]:
    """Yields the clients unchanged, raising if one's params differ from the first client's.

    Trees of different structure, leaf shapes or leaf dtypes cannot be averaged meaningfully
    (shapes would broadcast silently), so they fail here with both trees summarised rather than
    deep inside ``jax.tree_util``.
    """
    first_id, first_signature, first_params = None, None, None
    for client_id, params, weight in clients_params_and_weights:
        signature = _signature(params)
        if first_signature is None:
            first_id, first_signature, first_params = client_id, signature, params
        elif signature != first_signature:
            raise ValueError(
                "Cannot aggregate clients whose parameter trees differ: client "
                f"{client_id!r} has {_summary(params)} but client {first_id!r} has "
                f"{_summary(first_params)}. Every client must return params of the same "
                "structure, shapes and dtypes (e.g. deltas of one model)."
            )
        yield client_id, params, weight


def mean_aggregator() -> Aggregator:
    """The weighted mean ``sum_i w_i p_i / sum_i w_i`` of the clients' params.

    A total weight of zero gives zeros, and no clients at all give ``None``.
    """

    def init() -> MeanAggregatorState:
        return MeanAggregatorState()

    def apply(
        clients_params_and_weights: Iterable[ClientParamsAndWeight], state: MeanAggregatorState
    ) -> tuple[Params, MeanAggregatorState]:
        clients = check_matching_params(clients_params_and_weights)
        return tree_util.tree_mean((params, weight) for _, params, weight in clients), state

    return Aggregator(init, apply)
