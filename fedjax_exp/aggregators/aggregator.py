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


def check_matching_params(
    clients_params_and_weights: Iterable[ClientParamsAndWeight],
) -> Iterator[ClientParamsAndWeight]:
    """Yields the clients unchanged, raising if one's params differ from the first client's
    (:func:`~fedjax_exp.core.tree_util.check_tree_matches`: structure, leaf shapes and dtypes)."""
    first = None
    for client_id, params, weight in clients_params_and_weights:
        if first is None:
            first = client_id, params
        else:
            tree_util.check_tree_matches(
                params,
                first[1],
                f"the params of client {client_id!r}",
                f"those of client {first[0]!r}",
                check_dtypes=True,
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
