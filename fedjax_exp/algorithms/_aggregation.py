"""What every algorithm's server does with client outputs: check them and average them.

A round's clients are checked before any training (an empty client would otherwise fail deep in
batching, or silently weigh nothing), and each client update is checked against the server
params before it enters the running mean (a mismatched leaf shape would otherwise broadcast
silently into the average).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_exp.core import tree_util
from fedjax_exp.core.typing import ClientId, Params, PyTree

__all__ = [
    "RunningWeightedMean",
    "check_update_matches",
    "client_num_examples",
    "params_delta",
]


def client_num_examples(clients: Sequence[tuple[ClientId, Any, Any]]) -> dict[ClientId, int]:
    """``{client_id: len(dataset)}`` for a round's ``(client_id, dataset, input)`` triples.

    Raises:
        ValueError: a client has no examples (it could neither train nor carry any weight).
    """
    sizes = {client_id: len(dataset) for client_id, dataset, _ in clients}
    empty = [client_id for client_id, size in sizes.items() if size == 0]
    if empty:
        raise ValueError(
            f"clients {empty!r} have zero examples; every client of a round needs at least one "
            "example to train on. Drop empty clients from the federated data (or the sampled "
            "round) before calling apply."
        )
    return sizes


def check_update_matches(client_id: ClientId, update: PyTree, reference: PyTree) -> None:
    """Checks the update of ``client_id``, about to be aggregated, against the server params
    (:func:`~fedjax_exp.core.tree_util.check_tree_matches`)."""
    tree_util.check_tree_matches(
        update, reference, f"the update of client {client_id!r}", "the server params"
    )


def params_delta(start_params: Params, trained_params: Params) -> Params:
    """A client's delta ``start_params - trained_params``, after checking the two match.

    Without the check a trained tree with another structure fails inside ``tree_map`` with a
    message about tree internals, and a leaf of another shape broadcasts silently.
    """
    tree_util.check_tree_matches(
        trained_params, start_params, "a client's trained params", "the server params"
    )
    return jax.tree_util.tree_map(jnp.subtract, start_params, trained_params)


class RunningWeightedMean:
    """``sum_i w_i * u_i / sum_i w_i`` over client updates, accumulated one client at a time.

    Only the running sum is kept, so a round never holds every client's update at once. The
    sum starts from zeros shaped like the server params and the division comes last, so the
    result is formed in the same order (and rounds the same way) as FedJAX's algorithms.
    """

    def __init__(self, reference: PyTree):
        self._reference = reference
        self._sum = tree_util.tree_zeros_like(reference)
        self._weight_sum: Any = 0.0

    def add(self, client_id: ClientId, update: PyTree, weight: Any) -> None:
        """Adds ``weight * update`` after checking ``update`` against the server params."""
        check_update_matches(client_id, update, self._reference)
        self._sum = tree_util.tree_add(self._sum, tree_util.tree_weight(update, weight))
        self._weight_sum += weight

    @property
    def weight_sum(self) -> Any:
        return self._weight_sum

    def result(self) -> PyTree:
        """The weighted mean; zeros when the total weight is not positive."""
        return tree_util.tree_inverse_weight(self._sum, self._weight_sum)
