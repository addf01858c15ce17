"""Choosing the clients of each federated round (``fedjax.client_samplers``).

A sampler returns ``[(client_id, client_dataset, client_rng), ...]``, ready for
``FederatedAlgorithm.apply``. Both samplers give the clients and keys FedJAX 0.0.17 gives for the
same seed and round: client keys are ``jax.random.split(PRNGKey(round_num), num_clients)``, and
``UniformGetClientSampler`` draws ids from a NumPy ``RandomState`` derived from (seed, round) by
a Park-Miller generator, so round r's clients can be recomputed without replaying rounds 0..r-1.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator

import jax
import numpy as np

from fedjax_exp.core.client_datasets import ClientDataset
from fedjax_exp.core.federated_data import FederatedData
from fedjax_exp.core.typing import ClientId, PRNGKey

__all__ = [
    "ClientSampler",
    "UniformGetClientSampler",
    "UniformShuffledClientSampler",
    "get_pseudo_random_state",
]

SampledClients = list[tuple[ClientId, ClientDataset, PRNGKey]]

# Park and Miller's "minimal standard" multiplicative congruential generator.
_MLCG_MODULUS = 2**31 - 1
_MLCG_MULTIPLIER = 16807


def get_pseudo_random_state(seed: int, round_num: int) -> np.random.RandomState:
    """A NumPy RandomState determined by ``(seed, round_num)`` alone.

    The seed picks a starting point of the generator; round r uses its r-th successor, computed
    directly as ``start * a**r mod m``.
    """
    start = np.random.RandomState(seed).randint(1, _MLCG_MODULUS - 1)
    state = pow(_MLCG_MULTIPLIER, round_num, _MLCG_MODULUS) * start % _MLCG_MODULUS
    return np.random.RandomState(state)


def _client_rngs(round_num: int, num_clients: int) -> list[PRNGKey]:
    keys = jax.random.split(jax.random.PRNGKey(round_num), num_clients)
    return list(keys)  # One unstack for all clients instead of an indexing op per client.


def _check_num_clients(num_clients: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 0:
        raise ValueError(f"num_clients must be a non-negative integer, got {num_clients!r}.")


class ClientSampler(abc.ABC):
    """Chooses each round's clients and gives each client its own PRNG key."""

    @abc.abstractmethod
    def sample(self) -> SampledClients:
        """The next round's ``[(client_id, client_dataset, client_rng), ...]``."""

    @abc.abstractmethod
    def set_round_num(self, round_num: int) -> None:
        """Makes the next ``sample`` return round ``round_num``'s clients."""


class UniformShuffledClientSampler(ClientSampler):
    """Takes the next ``num_clients`` clients of a shuffled stream each round.

    Meant for ``federated_data.shuffled_clients(buffer_size, seed)``, an endless stream; a
    restart at ``start_round_num`` skips the clients of the earlier rounds.
    """

    def __init__(
        self,
        shuffled_clients_iter: Iterator[tuple[ClientId, ClientDataset]],
        num_clients: int,
        start_round_num: int = 0,
    ):
        _check_num_clients(num_clients)
        self._clients = iter(shuffled_clients_iter)
        self._num_clients = int(num_clients)
        self._round_num = start_round_num
        for _ in range(start_round_num * self._num_clients):
            self._next_client()

    def _next_client(self) -> tuple[ClientId, ClientDataset]:
        try:
            return next(self._clients)
        except StopIteration:
            raise ValueError(
                "UniformShuffledClientSampler: the client stream ran out. Give it an endless "
                "stream such as federated_data.shuffled_clients(buffer_size, seed), which "
                "repeats the clients forever."
            ) from None

    def sample(self) -> SampledClients:
        rngs = _client_rngs(self._round_num, self._num_clients)
        clients = []
        for rng in rngs:
            client_id, dataset = self._next_client()
            clients.append((client_id, dataset, rng))
        self._round_num += 1
        return clients

    def set_round_num(self, round_num: int) -> None:
        raise NotImplementedError(
            "UniformShuffledClientSampler reads a stream and cannot jump to a round; use "
            "UniformGetClientSampler when set_round_num is needed."
        )


class UniformGetClientSampler(ClientSampler):
    """Draws ``num_clients`` distinct clients uniformly at random, per round from the seed.

    Round r's clients depend only on ``(seed, r)``, so resuming at any round reproduces them.
    """

    def __init__(
        self,
        fd: FederatedData,
        num_clients: int,
        seed: int,
        start_round_num: int = 0,
    ):
        _check_num_clients(num_clients)
        self._federated_data = fd
        # dtype=object keeps ids as bytes: a NumPy bytes array would strip trailing b'\0's.
        self._client_ids = np.array(list(fd.client_ids()), dtype=object)
        if num_clients > len(self._client_ids):
            raise ValueError(
                f"UniformGetClientSampler: asked for {num_clients} clients per round but the "
                f"federated data has only {len(self._client_ids)}. Sample at most "
                f"{len(self._client_ids)} clients per round."
            )
        self._num_clients = int(num_clients)
        self._seed = seed
        self._round_num = start_round_num

    def sample(self) -> SampledClients:
        random_state = get_pseudo_random_state(self._seed, self._round_num)
        client_ids = random_state.choice(self._client_ids, size=self._num_clients, replace=False)
        rngs = _client_rngs(self._round_num, self._num_clients)
        clients = [
            (client_id, dataset, rng)
            for (client_id, dataset), rng in zip(
                self._federated_data.get_clients(client_ids), rngs, strict=True
            )
        ]
        self._round_num += 1
        return clients

    def set_round_num(self, round_num: int) -> None:
        self._round_num = round_num
