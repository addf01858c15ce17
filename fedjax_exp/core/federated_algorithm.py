"""The federated algorithm interface (``fedjax.FederatedAlgorithm``).

A federated algorithm is a pair of pure-ish functions: ``init`` builds the server state (usually
from the initial model parameters) and ``apply`` runs one round on a list of sampled clients.
Keeping it a plain value (a frozen dataclass) lets the training loop, checkpointing and the
experiment layer treat every algorithm alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedjax_exp.core import dataclasses
from fedjax_exp.core.client_datasets import ClientDataset
from fedjax_exp.core.typing import ClientId, PRNGKey, PyTree

__all__ = ["FederatedAlgorithm", "ServerState"]

# Whatever the algorithm keeps between rounds: parameters, optimizer state, control variates...
ServerState = PyTree

# One sampled client as a ClientSampler yields it: id, its data, and its own rng key.
SampledClient = tuple[ClientId, ClientDataset, PRNGKey]


@dataclasses.dataclass
class FederatedAlgorithm:
    """A federated algorithm as two functions.

    Attributes:
        init: ``init(...) -> ServerState``; called once before training, typically with the
            initial model parameters.
        apply: ``apply(server_state, clients) -> (server_state, client_diagnostics)``; runs one
            round. ``clients`` is a sequence of ``(client_id, client_dataset, client_rng)`` as
            returned by ``ClientSampler.sample``; ``client_diagnostics`` maps each client id to
            whatever the algorithm reports for it (e.g. its delta's norm).
    """

    init: Callable[..., ServerState]
    apply: Callable[
        [ServerState, Sequence[SampledClient]], tuple[ServerState, Mapping[ClientId, Any]]
    ]
