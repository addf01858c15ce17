"""Checkpoints of a federated experiment (``fedjax.training.save_checkpoint`` and
``load_latest_checkpoint``).

Files are FedJAX's: ``<root_dir>/checkpoint_<round:08d>``, the latest ``keep`` kept. The
contents are msgpack (:mod:`fedjax_exp.core.serialization`) rather than FedJAX's pickle: a
checkpoint is data, and loading one runs no code. The server state is stored as its *state
dict*, nested string-keyed dicts with array leaves (dict keys, dataclass fields and
NamedTuple fields by name, sequence items by index as ``"0"``, ``"1"``, ...), so any msgpack
reader (FedJAX's ``msgpack_deserialize`` too) can open it. ``bytes`` dict keys (FedJAX's
client ids) are stored as msgpack bytes and read back as bytes; other keys as strings. Loading
with a ``target`` (the initial state) restores the exact pytree: its classes, containers and
array types.

Per-client mappings (client id -> that client's state, e.g. SCAFFOLD's control variates) are
empty in an initial state, so the target cannot say which clients to expect: an empty mapping of
the target, and any mapping a state declares per-client, is filled from the clients the file
holds. A state declares them with a method ``per_client_templates(self)`` returning, for each
such field, a pytree of one client's entry; each stored entry is restored into that pytree's
classes and leaf types, with the shapes and dtypes the file holds. Without a declaration an
entry comes back as the file has it: nested dicts, arrays as JAX arrays.

Writes are atomic and durable: the bytes go to a hidden ``.checkpoint_<round>.*.partial`` file
beside the target, are flushed to disk, and only then renamed into place, so a crash or kill
mid-write leaves the previous checkpoints as they were and never a half-written one. Older
checkpoints are deleted only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_exp.core import serialization
from fedjax_exp.core.atomic_file import AtomicFile

__all__ = [
    "checkpoint_path",
    "list_checkpoints",
    "load_latest_checkpoint",
    "save_checkpoint",
    "state_from_dict",
    "state_to_dict",
]

CHECKPOINT_PREFIX = "checkpoint_"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_([0-9]{8})$")
# What AtomicFile leaves behind if the process is killed (SIGKILL) before it can clean up.
_PARTIAL_NAME = re.compile(r"^\.checkpoint_[0-9]{8}\..*\.partial$")
_MAX_ROUND = 10**8 - 1  # Eight digits in the file name, as FedJAX.


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------


# The method by which a state declares its per-client mappings (see the module docstring).
_PER_CLIENT_TEMPLATES = "per_client_templates"

Name = str | bytes  # One path entry of a state dict: bytes for bytes dict keys, else a string.


def _key_name(key: Any) -> Name:
    """One path entry of a pytree leaf as a state-dict key."""
    if isinstance(key, jax.tree_util.DictKey):
        # Bytes keys (client ids) stay bytes: msgpack stores them as such, so they come back
        # with their type, where a string would not tell b"a" from "a".
        return key.key if isinstance(key.key, bytes) else str(key.key)
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.SequenceKey):
        return str(key.idx)
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return str(key.key)
    return str(key)


def _path_names(path: Sequence[Any]) -> tuple[Name, ...]:
    return tuple(_key_name(k) for k in path)


def _where(names: Sequence[Name]) -> str:
    """A state-dict path for error messages, e.g. ``client_states/b'f0_1'/params``."""
    return "/".join(name if isinstance(name, str) else repr(name) for name in names)


def _is_prng_key(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _storable(leaf: Any) -> Any:
    """A leaf as msgpack stores it: host arrays; Python and NumPy scalars as they are."""
    if _is_prng_key(leaf):
        return np.asarray(jax.random.key_data(leaf))  # Typed keys are stored as their raw data.
    if isinstance(leaf, jax.Array):
        return np.asarray(leaf)
    if isinstance(leaf, (np.ndarray, np.generic, bool, int, float, complex, str, bytes)):
        return leaf
    raise TypeError(
        f"cannot store a leaf of type {type(leaf).__name__} in a checkpoint; server states "
        "must hold arrays or Python/NumPy scalars"
    )


def state_to_dict(state: Any) -> dict[Name, Any]:
    """The state dict of a pytree: nested dicts keyed by field, key or index (as strings;
    bytes dict keys as bytes), with its leaves (JAX arrays as NumPy arrays) at the ends.

    Raises:
        ValueError: two leaves would land on the same key (e.g. a dict with keys ``0`` and
            ``"0"``), or a leaf where another leaf's parent should be.
    """
    out: dict[Name, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = _path_names(path)
        if not names:  # The whole state is one array.
            raise ValueError(
                "a checkpointed state must be a container (dataclass, dict, tuple, ...), "
                f"not a single {type(leaf).__name__}; wrap it, e.g. {{'params': state}}"
            )
        node = out
        for depth, name in enumerate(names[:-1]):
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise ValueError(
                    f"state entry {_where(names[: depth + 1])!r} is both a leaf and a "
                    "container; rename the keys so each path is unique"
                )
            node = child
        if names[-1] in node:
            raise ValueError(
                f"two leaves of the state map to the same entry {_where(names)!r} (keys "
                "that read the same as strings); rename the keys so each path is unique"
            )
        node[names[-1]] = _storable(leaf)
    return out


_MISSING = object()


def _lookup(
    state_dict: dict[Name, Any], names: tuple[Name, ...], where: tuple[Name, ...], default=_MISSING
) -> Any:
    node: Any = state_dict
    for depth, name in enumerate(names):
        if not isinstance(node, dict) or name not in node:
            if default is not _MISSING:
                return default
            raise ValueError(
                f"the checkpoint has no entry {_where(where + names[: depth + 1])!r} that the "
                "target state has: it was written for a different model or algorithm state"
            )
        node = node[name]
    return node


def _count_leaves(state_dict: Any) -> int:
    if isinstance(state_dict, dict):
        return sum(_count_leaves(v) for v in state_dict.values())
    return 1


def _restore_leaf(value: Any, like: Any, where: str, exact: bool) -> Any:
    """``value`` from the checkpoint in the form of the target's leaf ``like``; with ``exact``,
    also of its shape and dtype."""
    if isinstance(like, (jax.Array, np.ndarray, np.generic)):
        raw = jax.random.key_data(like) if _is_prng_key(like) else like
        like_shape, like_dtype = np.shape(raw), raw.dtype
        array = np.asarray(value)
        if exact and (array.shape != like_shape or array.dtype != like_dtype):
            raise ValueError(
                f"checkpoint entry {where!r} is {array.dtype}{list(array.shape)} but the target "
                f"state has {like_dtype}{list(like_shape)}: it was written for a different "
                "model or algorithm state"
            )
        if _is_prng_key(like):
            return jax.random.wrap_key_data(array, impl=jax.random.key_impl(like))
        if isinstance(like, jax.Array):
            return jnp.asarray(array)
        if isinstance(like, np.generic):
            return array[()]
        return np.array(array)  # Writable, like the array it replaces.
    if isinstance(like, (bool, int, float, complex)):
        return type(like)(np.asarray(value).item())
    return value


def _declared_client_mappings(target: Any) -> dict[int, Any]:
    """``id`` of every per-client mapping that a node of ``target`` declares (through its
    ``per_client_templates`` method) -> the template of one entry."""
    found: dict[int, Any] = {}

    def visit(node: Any) -> None:
        declare = getattr(node, _PER_CLIENT_TEMPLATES, None)
        if callable(declare):
            for field, template in declare().items():
                found[id(getattr(node, field))] = template
        for child in jax.tree_util.tree_leaves(node, is_leaf=lambda x: x is not node):
            if child is not node:
                visit(child)

    visit(target)
    return found


def _entry_from_file(value: Any) -> Any:
    """A per-client entry without a template: the file's nested dicts, arrays on the device."""
    if isinstance(value, dict):
        return {key: _entry_from_file(item) for key, item in value.items()}
    if isinstance(value, np.ndarray) and not value.dtype.hasobject:
        return jnp.asarray(value)
    return value


def _restore_client_mapping(
    entries: Any, like: Mapping[Any, Any], template: Any, where: tuple[Name, ...]
) -> Mapping[Any, Any]:
    """The per-client mapping ``like`` of the target, with the clients the file holds."""
    if not isinstance(entries, dict):
        raise ValueError(
            f"checkpoint entry {_where(where)!r} is a leaf where the target state has a "
            "per-client mapping: it was written for a different model or algorithm state"
        )
    restored = {
        key: _entry_from_file(value)
        if template is None
        else _restore(template, value, where + (key,), exact=False)
        for key, value in entries.items()
    }
    return restored if type(like) is dict else type(like)(restored)


def _restore(target: Any, state_dict: Any, where: tuple[Name, ...], exact: bool) -> Any:
    """``state_dict`` in the pytree structure of ``target``; ``where`` prefixes error paths."""
    declared = _declared_client_mappings(target)

    def is_client_mapping(node: Any) -> bool:
        return id(node) in declared or (isinstance(node, Mapping) and not node)

    paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(
        target, is_leaf=is_client_mapping
    )
    restored, used = [], 0
    for path, like in paths_and_leaves:
        names = _path_names(path)
        if is_client_mapping(like):
            # Absent from the file when no client had an entry yet (empty nodes are not stored).
            entries = _lookup(state_dict, names, where, default={})
            template = declared.get(id(like))
            restored.append(_restore_client_mapping(entries, like, template, where + names))
            used += _count_leaves(entries)
            continue
        value = _lookup(state_dict, names, where)
        if isinstance(value, dict):
            raise ValueError(
                f"checkpoint entry {_where(where + names)!r} is a container where the target "
                "state has a leaf: it was written for a different model or algorithm state"
            )
        restored.append(_restore_leaf(value, like, _where(where + names), exact))
        used += 1
    extra = _count_leaves(state_dict) - used
    if extra > 0:
        within = f" under {_where(where)!r}" if where else ""
        raise ValueError(
            f"the checkpoint holds {extra} entries{within} the target state does not have: it "
            "was written for a different model or algorithm state"
        )
    return jax.tree_util.tree_unflatten(treedef, restored)


def state_from_dict(target: Any, state_dict: dict[Name, Any]) -> Any:
    """Restores ``state_dict`` into the pytree structure of ``target``.

    Every leaf of ``target`` must have an entry of the same shape and dtype, and the state
    dict no other leaves. JAX arrays, NumPy arrays, NumPy and Python scalars and typed PRNG
    keys come back as the types of the target's leaves. Per-client mappings (empty ones, and
    those the state declares, see the module docstring) hold the clients the state dict holds.

    Raises:
        ValueError: a missing or extra entry, or a shape or dtype that differs, naming it.
    """
    return _restore(target, state_dict, (), exact=True)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def checkpoint_path(root_dir: str | os.PathLike[str], round_num: int) -> str:
    """``<root_dir>/checkpoint_<round_num:08d>``, FedJAX's file name."""
    if isinstance(round_num, bool) or not isinstance(round_num, (int, np.integer)):
        raise TypeError(f"round_num must be an int, got {type(round_num).__name__}")
    if not 0 <= round_num <= _MAX_ROUND:
        raise ValueError(
            f"round_num must be in [0, {_MAX_ROUND}] (eight digits in the file name), "
            f"got {round_num}"
        )
    return os.path.join(os.fspath(root_dir), f"{CHECKPOINT_PREFIX}{int(round_num):08d}")


def list_checkpoints(root_dir: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``(round_num, path)`` of every checkpoint in ``root_dir``, oldest round first."""
    root = os.fspath(root_dir) or "."
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _CHECKPOINT_NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(os.fspath(root_dir), name)))
    return sorted(found)


def _remove_stale_partials(root_dir: str) -> None:
    """Deletes temporary files that a killed writer (no chance to clean up) left behind."""
    for name in os.listdir(root_dir or "."):
        if _PARTIAL_NAME.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(root_dir, name))


def save_checkpoint(
    root_dir: str | os.PathLike[str], state: Any, round_num: int = 0, keep: int = 1
) -> None:
    """Writes ``state`` as the checkpoint of ``round_num``, then keeps the latest ``keep``.

    The write is atomic (temporary file, flushed to disk, renamed into place). Checkpoints are
    ordered by round number, as in FedJAX; all but the ``keep`` latest are deleted, after the
    new one is complete.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, np.integer)) or keep < 1:
        raise ValueError(f"keep must be an int >= 1 (checkpoints to keep), got {keep!r}")
    root = os.fspath(root_dir)
    path = checkpoint_path(root, round_num)
    data = serialization.msgpack_serialize(state_to_dict(state))
    with AtomicFile(path) as out, open(out.tmp, "wb") as f:
        f.write(data)
        f.flush()
        # On disk before the rename: otherwise a power cut could leave the new name on an
        # empty file after the old checkpoints are gone.
        os.fsync(f.fileno())
    _remove_stale_partials(root)
    for _, old_path in list_checkpoints(root)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(old_path)


def load_latest_checkpoint(
    root_dir: str | os.PathLike[str], target: Any = None
) -> tuple[Any, int] | None:
    """``(state, round_num)`` of the latest checkpoint in ``root_dir``, or None if none.

    Args:
        root_dir: where the checkpoints are.
        target: a state of the checkpointed structure (e.g. the initial server state). With
            it the state comes back as that pytree (see :func:`state_from_dict`); without it,
            as the stored state dict (nested dicts of arrays).
    """
    checkpoints = list_checkpoints(root_dir)
    if not checkpoints:
        return None
    round_num, path = checkpoints[-1]
    with open(path, "rb") as f:
        state_dict = serialization.msgpack_deserialize(f.read())
    if target is None:
        return state_dict, round_num
    try:
        return state_from_dict(target, state_dict), round_num
    except ValueError as exc:
        raise ValueError(
            f"cannot restore checkpoint {path!r}: {exc}. Restore it into a state of the same "
            "structure, or use another root_dir to start over"
        ) from None
