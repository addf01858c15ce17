"""Partition centralized arrays into federated clients: IID, or Dirichlet label skew.

Both partitioners take ``{feature: array}`` with a shared leading dimension and return an
:class:`~fedjax_exp.core.in_memory_federated_data.InMemoryFederatedData` whose clients are
disjoint and together hold every example exactly once. They are deterministic for a seed.
Client ids are ``b'client_00000'``, ... (zero-padded so byte order equals numeric order).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData

__all__ = ["client_ids_for", "partition_by_assignment", "partition_dirichlet", "partition_iid"]


def client_ids_for(num_clients: int, prefix: str = "client") -> list[bytes]:
    """``[b'client_00000', ...]``: ids whose sorted order is their numeric order."""
    width = max(5, len(str(num_clients - 1)))
    return [f"{prefix}_{i:0{width}d}".encode() for i in range(num_clients)]


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
    if not arrays:
        raise ValueError("arrays must hold at least one feature")
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"all features need the same number of examples, got {lengths}")
    return next(iter(lengths.values()))


def _check_num_clients(num_clients: int, num_examples: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients <= 0:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}")
    if num_clients > num_examples:
        raise ValueError(
            f"num_clients ({num_clients}) exceeds the number of examples ({num_examples}); "
            "every client needs at least one example"
        )


def partition_by_assignment(
    arrays: Mapping[str, np.ndarray], assignment: np.ndarray, num_clients: int
) -> InMemoryFederatedData:
    """Clients from an explicit per-example client index (``assignment[i]`` in
    ``[0, num_clients)``). Within a client, examples keep their original relative order."""
    n = _check_arrays(arrays)
    assignment = np.asarray(assignment)
    if assignment.shape != (n,):
        raise ValueError(f"assignment must have shape ({n},), got {assignment.shape}")
    if n and (assignment.min() < 0 or assignment.max() >= num_clients):
        raise ValueError(f"assignment values must lie in [0, {num_clients})")
    order = np.argsort(assignment, kind="stable")
    sizes = np.bincount(assignment, minlength=num_clients).astype(np.int64)
    if np.any(sizes == 0):
        raise ValueError(
            f"{int(np.sum(sizes == 0))} client(s) received no examples; use fewer clients"
        )
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    columns = {name: np.asarray(a)[order] for name, a in arrays.items()}
    return InMemoryFederatedData.from_columns(client_ids_for(num_clients), offsets, columns)


def partition_iid(
    arrays: Mapping[str, np.ndarray], num_clients: int, seed: int = 0
) -> InMemoryFederatedData:
    """Shuffles the examples and deals them into ``num_clients`` clients whose sizes differ
    by at most one."""
    n = _check_arrays(arrays)
    _check_num_clients(num_clients, n)
    rng = np.random.default_rng(seed)
    assignment = np.empty(n, dtype=np.int64)
    assignment[rng.permutation(n)] = np.arange(n) % num_clients
    return partition_by_assignment(arrays, assignment, num_clients)


def partition_dirichlet(
    arrays: Mapping[str, np.ndarray],
    num_clients: int,
    alpha: float,
    label_key: str = "y",
    seed: int = 0,
) -> InMemoryFederatedData:
    """Label-skewed clients: each class's examples are split among clients in proportions
    drawn from Dirichlet(``alpha``) (Hsu et al. 2019). Small ``alpha`` (e.g. 0.1) gives
    clients dominated by few classes; large ``alpha`` approaches IID.

    Every client is guaranteed at least one example: a client left empty by the draw takes
    one example from the currently largest client (deterministic for the seed).
    """
    n = _check_arrays(arrays)
    _check_num_clients(num_clients, n)
    if not (alpha > 0 and np.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if label_key not in arrays:
        raise ValueError(f"label_key {label_key!r} is not a feature; features: {sorted(arrays)}")
    labels = np.asarray(arrays[label_key])
    if labels.ndim != 1:
        raise ValueError(f"labels {label_key!r} must be 1-D, got shape {labels.shape}")
    rng = np.random.default_rng(seed)
    assignment = np.empty(n, dtype=np.int64)
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        # Cumulative proportions -> cut points; every example of the class goes somewhere.
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, part in enumerate(np.split(members, cuts)):
            assignment[part] = client
    sizes = np.bincount(assignment, minlength=num_clients)
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))
        moved = np.flatnonzero(assignment == donor)[-1]
        assignment[moved] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    return partition_by_assignment(arrays, assignment, num_clients)
