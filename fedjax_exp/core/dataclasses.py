"""Frozen dataclasses that are JAX pytrees (``fedjax.dataclass``).

Stats, metrics and models are values: immutable, comparable, and passable through ``jax.jit``
and ``jax.tree_util``. Fields are pytree children unless declared with
``field(pytree_node=False)``, in which case they are static auxiliary data (hashed by jit).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import jax

T = TypeVar("T")

_PYTREE_NODE = "pytree_node"


def field(*, pytree_node: bool = True, **kwargs: Any) -> Any:
    """A dataclass field; ``pytree_node=False`` makes it static metadata rather than a leaf."""
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[_PYTREE_NODE] = pytree_node
    return dataclasses.field(metadata=metadata, **kwargs)


def dataclass(cls: type[T]) -> type[T]:
    """Makes ``cls`` a frozen dataclass registered as a pytree, with a ``replace`` method."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = dataclasses.fields(cls)
    data_fields = [f.name for f in fields if f.metadata.get(_PYTREE_NODE, True)]
    meta_fields = [f.name for f in fields if not f.metadata.get(_PYTREE_NODE, True)]

    def replace(self: T, **updates: Any) -> T:
        return dataclasses.replace(self, **updates)

    cls.replace = replace
    jax.tree_util.register_dataclass(cls, data_fields=data_fields, meta_fields=meta_fields)
    return cls
