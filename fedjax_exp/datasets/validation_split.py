"""Seeded validation splits carved out of a federated train split.

Hyperparameters chosen on the test split overstate how well they generalise; a validation
split held out of the training data gives an honest selection signal, and test is then
reported once, at the end. Two ways to hold data out:

- ``clients``: a fraction of the clients is held out whole (validation measures how the model
  does on writers it never trained on, the federated generalisation question);
- ``examples``: a fraction of every client's examples is held out (validation then follows
  the train distribution client by client, like EMNIST's own train/test split).

Both are pure functions of ``(seed, client id, client size)``: the randomness of a client
comes from a hash of the seed and its id, never from its position in the dataset, so the
split is the same on every storage format (column store or SQLite), in any client order, and
a client's split does not change when other clients are added or removed (in ``examples``
mode; in ``clients`` mode the NUMBER held out depends on the number of clients).

Rounding rules (documented because they decide small clients' fate):

- ``clients``: ``round(fraction * num_clients)`` clients (halves round up) are held out; the
  ones with the smallest hash keys. A split that leaves either side without clients, or
  without examples, is an error (raise or lower the fraction, or use ``examples``).
- ``examples``: each client holds out ``round(fraction * n)`` of its ``n`` examples (halves
  round up), capped at ``n - 1`` so every client with data keeps at least one training
  example (a one-example client holds out nothing). Within a client, the held-out examples
  are those with the smallest per-example hash keys, so the choice is uniform. Train keeps
  every input client (also empty ones); validation lists only clients that hold out at least
  one example. Both keep each client's examples in their original order.

Preprocessors carry over: on the column store
(:class:`~fedjax_exp.core.in_memory_federated_data.InMemoryFederatedData`) the stored rows
are split and both parts keep the input's client and batch preprocessors. Other stores (e.g.
SQLite) keep them too in ``clients`` mode (a :class:`SubsetFederatedData` view of the
input); in ``examples`` mode the input is read once, each client through its client
preprocessor, into a column store (so the whole train split is then in memory) that is split
as above and keeps the input's batch preprocessor (the client preprocessor has then run,
once). The two agree whenever the client preprocessor maps examples row by row (e.g. adds a
feature), as EMNIST's does. The column-store outputs are new arrays (boolean-mask gathers,
one copy of the data in all): drop the input afterwards to free its memory.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedjax_exp.core.federated_data import FederatedData, SubsetFederatedData
from fedjax_exp.core.in_memory_federated_data import InMemoryFederatedData
from fedjax_exp.core.typing import ClientId

__all__ = [
    "DEFAULT_FRACTION",
    "MODES",
    "apply_validation_split",
    "held_out_clients",
    "held_out_examples",
    "split_train_validation",
]

MODES = ("none", "clients", "examples")
DEFAULT_FRACTION = 0.1
_SETTINGS_KEYS = ("mode", "fraction", "seed")
# Config path of the settings, used to name keys in error messages.
_CONFIG_PREFIX = "dataset.validation"

# Domain-separation tags, so the two modes draw unrelated keys from the same seed and id.
_CLIENTS_TAG = b"val-clients"
_EXAMPLES_TAG = b"val-examples"
# splitmix64 constants (Steele, Lea and Flood, 2014): a counter-based mixer that turns
# (client key, example position) into a well-spread 64-bit key with vectorised NumPy ops.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
# Bits of an example's key used to order the examples of a client (ties, a 2**-40 event per
# pair, break by position).
_KEY_BITS = 40


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_fraction(fraction: Any, name: str) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0 < fraction < 1:
        raise ValueError(
            f"{name}={fraction!r} must be a number strictly between 0 and 1 (the share held "
            f"out for validation), e.g. {name}={DEFAULT_FRACTION}"
        )
    return float(fraction)


def _check_seed(seed: Any, name: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
        raise ValueError(f"{name}={seed!r} must be an integer in [0, 2**64), e.g. {name}=0")
    return int(seed)


def _check_mode(mode: Any, name: str) -> str:
    if mode is None:
        return "none"
    if mode not in MODES:
        raise ValueError(f"{name}={mode!r} is not a validation mode; use one of {list(MODES)}")
    return str(mode)


def _round_half_up(values: np.ndarray | float) -> np.ndarray:
    return np.floor(np.asarray(values, dtype=np.float64) + 0.5).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Keys: pure functions of (seed, client id, example position)
# --------------------------------------------------------------------------------------------


def _client_keys(client_ids: list[ClientId], seed: int, tag: bytes) -> np.ndarray:
    """A 64-bit key per client from a keyed hash of its id (stable across processes, unlike
    Python's ``hash``), so a client's randomness does not depend on where it is stored."""
    seed_key = seed.to_bytes(8, "little")
    keys = np.empty(len(client_ids), dtype=np.uint64)
    for i, client_id in enumerate(client_ids):
        digest = hashlib.blake2b(bytes(client_id), digest_size=8, key=seed_key, person=tag).digest()
        keys[i] = int.from_bytes(digest, "little")
    return keys


def _mix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wraps modulo 2**64, as intended)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def held_out_clients(client_ids: list[ClientId], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask over ``client_ids``: the clients ``clients`` mode holds out.

    ``round(fraction * len(client_ids))`` clients (halves up), those with the smallest keyed
    hash of ``(seed, id)``; the mask does not depend on the order of ``client_ids``.
    """
    fraction = _check_fraction(fraction, "fraction")
    seed = _check_seed(seed, "seed")
    count = int(_round_half_up(fraction * len(client_ids)))
    keys = _client_keys(list(client_ids), seed, _CLIENTS_TAG)
    # Ties (a 2**-64 event) break by id, keeping the result order-independent.
    order = sorted(range(len(client_ids)), key=lambda i: (int(keys[i]), client_ids[i]))
    mask = np.zeros(len(client_ids), dtype=bool)
    mask[order[:count]] = True
    return mask


def held_out_examples(
    client_ids: list[ClientId], offsets: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask over all rows of a CSR layout: the examples ``examples`` mode holds out.

    Client ``i`` owns rows ``offsets[i]:offsets[i+1]`` and holds out ``min(round(fraction *
    n), n - 1)`` of its ``n`` rows (halves up): those with the smallest keys, a key being the
    top 40 bits of ``splitmix64(client key + (position + 1) * golden)`` (ties by position).
    Vectorised: one hash per client, NumPy over rows.
    """
    fraction = _check_fraction(fraction, "fraction")
    seed = _check_seed(seed, "seed")
    offsets = np.asarray(offsets, dtype=np.int64)
    sizes = np.diff(offsets)
    num_rows = int(offsets[-1]) if len(offsets) else 0
    client_of_row = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    position = np.arange(num_rows, dtype=np.int64) - offsets[:-1][client_of_row]
    client_keys = _client_keys(list(client_ids), seed, _EXAMPLES_TAG)
    keys = _mix64(
        client_keys[client_of_row] + (position.astype(np.uint64) + np.uint64(1)) * _GOLDEN
    )
    # Rank rows within their client by (40-bit key, position): rows grouped by client, in
    # ascending key within each, so a row's rank is its distance from its client's first row.
    # Packing (client, key) into one uint64 lets one stable argsort do it (~8x faster than
    # lexsort on 700k rows); past 2**24 clients lexsort gives the same order.
    short_keys = keys >> np.uint64(64 - _KEY_BITS)
    if len(sizes) < 1 << (64 - _KEY_BITS):
        packed = (client_of_row.astype(np.uint64) << np.uint64(_KEY_BITS)) | short_keys
        order = np.argsort(packed, kind="stable")
    else:
        order = np.lexsort((short_keys, client_of_row))
    counts = np.minimum(_round_half_up(fraction * sizes), np.maximum(sizes - 1, 0))
    mask = np.empty(num_rows, dtype=bool)
    mask[order] = position < counts[client_of_row]
    return mask


# --------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------


def _rows_per_client(row_mask: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """How many rows of each client ``row_mask`` marks (empty clients: 0)."""
    marked = np.concatenate([[0], np.cumsum(row_mask, dtype=np.int64)])
    return marked[offsets[1:]] - marked[offsets[:-1]]


def _take_clients(
    fd: InMemoryFederatedData, keep_client: np.ndarray, keep_row: np.ndarray
) -> InMemoryFederatedData:
    """The column store of the kept clients, each with its kept rows (in stored order)."""
    ids = [cid for cid, keep in zip(fd.client_ids(), keep_client.tolist(), strict=True) if keep]
    kept_per_client = _rows_per_client(keep_row, fd.offsets)[keep_client]
    new_offsets = np.concatenate([[0], np.cumsum(kept_per_client)]).astype(np.int64)
    # np.take of the kept row numbers: ~10x faster than a boolean mask on image rows here.
    rows = np.flatnonzero(keep_row)
    columns = {name: np.take(column, rows, axis=0) for name, column in fd.columns.items()}
    return InMemoryFederatedData.from_columns(
        ids,
        new_offsets,
        columns,
        preprocess_client=fd.client_preprocessor,
        preprocess_batch=fd.batch_preprocessor,
    )


def _split_column_store(
    fd: InMemoryFederatedData, mode: str, fraction: float, seed: int
) -> tuple[InMemoryFederatedData, InMemoryFederatedData]:
    ids = list(fd.client_ids())
    sizes = np.diff(fd.offsets)
    if mode == "clients":
        val_client = held_out_clients(ids, fraction, seed)
        _check_clients_split(val_client, sizes, fraction)
        val_row = np.repeat(val_client, sizes)
        train_client = ~val_client
    else:
        val_row = held_out_examples(ids, fd.offsets, fraction, seed)
        train_client = np.ones(len(ids), dtype=bool)
        val_client = _rows_per_client(val_row, fd.offsets) > 0
        _check_examples_split(int(val_row.sum()), int(sizes.sum()), fraction)
    train = _take_clients(fd, train_client, ~val_row)
    validation = _take_clients(fd, val_client, val_row)
    return train, validation


def _check_clients_split(val_client: np.ndarray, sizes: np.ndarray, fraction: float) -> None:
    num_clients = len(val_client)
    held = int(val_client.sum())
    if held == 0 or held == num_clients:
        need = (
            f"fraction between {0.5 / num_clients:.3g} and {1 - 0.5 / num_clients:.3g}"
            if num_clients > 1
            else "at least two clients"
        )
        raise ValueError(
            f"{_CONFIG_PREFIX}.fraction={fraction} of {num_clients} clients holds out {held} "
            f"clients, leaving {'no validation' if held == 0 else 'no training'} clients; "
            f"clients mode needs a {need}, or use {_CONFIG_PREFIX}.mode=examples"
        )
    val_examples = int(sizes[val_client].sum())
    train_examples = int(sizes[~val_client].sum())
    if val_examples == 0 or train_examples == 0:
        side = "validation" if val_examples == 0 else "training"
        raise ValueError(
            f"{_CONFIG_PREFIX}.mode=clients: the {side} clients have no examples; change "
            f"{_CONFIG_PREFIX}.seed or {_CONFIG_PREFIX}.fraction (or drop empty clients)"
        )


def _check_examples_split(held: int, total: int, fraction: float) -> None:
    if total == 0:
        raise ValueError("cannot hold out validation examples: the train split has no examples")
    if held == 0:
        raise ValueError(
            f"{_CONFIG_PREFIX}.fraction={fraction} holds out no example: every client is too "
            f"small (a client of n examples holds out round(fraction * n), at most n - 1); "
            f"raise {_CONFIG_PREFIX}.fraction or use {_CONFIG_PREFIX}.mode=clients"
        )


def _materialise(fd: FederatedData) -> InMemoryFederatedData:
    """``fd`` read into a column store: each client once, through its client preprocessor
    (whose work is then done), clients in sorted id order, the input's batch preprocessor."""
    clients = sorted(fd.clients(), key=lambda pair: pair[0])
    if not clients:
        raise ValueError("cannot hold out validation data: the train split has no clients")
    batch_preprocessor = clients[0][1].preprocessor
    sizes = [len(dataset) for _, dataset in clients]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    features = list(clients[0][1].raw_examples)
    columns = {
        name: np.concatenate([np.asarray(ds.raw_examples[name]) for _, ds in clients])
        for name in features
    }
    ids = [client_id for client_id, _ in clients]
    del clients  # The decoded client arrays can go once the columns hold their rows.
    return InMemoryFederatedData.from_columns(
        ids, offsets, columns, preprocess_batch=batch_preprocessor
    )


def _split_clients_generic(
    fd: FederatedData, fraction: float, seed: int
) -> tuple[SubsetFederatedData, SubsetFederatedData]:
    ids = list(fd.client_ids())
    val_client = held_out_clients(ids, fraction, seed)
    size_of = dict(fd.client_sizes())
    sizes = np.array([size_of[cid] for cid in ids], dtype=np.int64)
    _check_clients_split(val_client, sizes, fraction)
    flags = val_client.tolist()
    train_ids = [cid for cid, held in zip(ids, flags, strict=True) if not held]
    val_ids = [cid for cid, held in zip(ids, flags, strict=True) if held]
    return (
        SubsetFederatedData(fd, train_ids, validate=False),
        SubsetFederatedData(fd, val_ids, validate=False),
    )


def split_train_validation(
    train_data: FederatedData, mode: str, fraction: float = DEFAULT_FRACTION, seed: int = 0
) -> tuple[FederatedData, FederatedData]:
    """Splits a train split into ``(train, validation)``, disjoint and together the input.

    Args:
      train_data: the federated train split (any FederatedData; the column store is split
        with index arithmetic, other stores as described in the module docstring).
      mode: ``'clients'`` (hold out whole clients) or ``'examples'`` (hold out examples of
        every client); see the module docstring for the rounding rules.
      fraction: share held out, strictly between 0 and 1.
      seed: non-negative integer; the same seed gives the same split on any store.

    Returns:
      ``(train, validation)``; InMemoryFederatedData for a column-store input or in
      ``examples`` mode, SubsetFederatedData views of the input in ``clients`` mode otherwise.
      Both carry the input's preprocessors.

    Raises:
      ValueError: an unknown mode, a fraction outside (0, 1), a bad seed, or a split that
        leaves one side without clients or examples (the message says what to change).
    """
    mode = _check_mode(mode, "mode")
    if mode == "none":
        raise ValueError("mode='none' holds nothing out; call with 'clients' or 'examples'")
    fraction = _check_fraction(fraction, "fraction")
    seed = _check_seed(seed, "seed")
    if isinstance(train_data, InMemoryFederatedData):
        return _split_column_store(train_data, mode, fraction, seed)
    if mode == "clients":
        return _split_clients_generic(train_data, fraction, seed)
    # Read once into a column store, then split it as any column store: the same rows go
    # to validation as if the input had been loaded in memory in the first place.
    return _split_column_store(_materialise(train_data), mode, fraction, seed)


def apply_validation_split(
    train_data: FederatedData, settings: Mapping[str, Any] | None
) -> tuple[FederatedData, FederatedData | None]:
    """``(train, validation)`` as the dataset config's ``validation`` block asks.

    ``settings`` is that block (``{mode: none|clients|examples, fraction: 0.1, seed: 0}``, a
    dict or DictConfig; missing keys take those defaults). ``None`` or ``mode: none`` returns
    ``(train_data, None)`` unchanged. Errors name the config key (``dataset.validation.*``)
    and the fix.

    Raises:
      ValueError: unknown keys, an unknown mode, a fraction outside (0, 1), a bad seed, or a
        split that leaves one side without clients or examples.
    """
    if settings is None:
        return train_data, None
    if not isinstance(settings, Mapping):
        raise ValueError(
            f"{_CONFIG_PREFIX} must be a mapping such as {{mode: examples, fraction: 0.1, "
            f"seed: 0}}, got {type(settings).__name__}"
        )
    unknown = sorted(str(k) for k in settings if k not in _SETTINGS_KEYS)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(f'{_CONFIG_PREFIX}.{k}' for k in unknown)}; "
            f"the validation block takes {list(_SETTINGS_KEYS)}"
        )
    mode = _check_mode(settings.get("mode", "none"), f"{_CONFIG_PREFIX}.mode")
    fraction = _check_fraction(
        settings.get("fraction", DEFAULT_FRACTION), f"{_CONFIG_PREFIX}.fraction"
    )
    seed = _check_seed(settings.get("seed", 0), f"{_CONFIG_PREFIX}.seed")
    if mode == "none":
        return train_data, None
    return split_train_validation(train_data, mode, fraction, seed)
