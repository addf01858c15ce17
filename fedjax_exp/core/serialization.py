"""Saving and restoring pytrees (``fedjax.serialization``).

Two formats, as in FedJAX:

- ``save_state``/``load_state``: a pickle file of any state (e.g. an algorithm's server
  state), written atomically. JAX arrays are stored as NumPy arrays, so a file does not depend
  on how a particular JAX version pickles its arrays; they load back as NumPy arrays.
- ``msgpack_serialize``/``msgpack_deserialize``: FedJAX's (originally Flax's) msgpack encoding
  of nested dicts and lists of arrays, bytes and Python scalars; the bytes are identical to
  FedJAX 0.0.17's for the same tree, and FedJAX reads ours. Tuples are not supported (msgpack
  cannot tell them from lists when reading back).

Arrays travel as msgpack extension types holding a nested msgpack value:

====  ===================  ===========================================================
code  what                 payload
====  ===================  ===========================================================
1     numeric ndarray      ``(shape, dtype name, C-order bytes)``
2     Python complex       ``(real, imag)``
3     NumPy scalar         as code 1, for a 0-d array; read back as the scalar
4     ndarray of bytes     ``(shape, [bytes, ...] in C order)``; read back as dtype=object
====  ===================  ===========================================================
"""

from __future__ import annotations

import enum
import os
import pickle
from typing import Any

import jax
import jax.numpy as jnp
import msgpack
import numpy as np

from fedjax_exp.core.atomic_file import AtomicFile
from fedjax_exp.core.typing import PyTree

__all__ = ["load_state", "msgpack_deserialize", "msgpack_serialize", "save_state"]


def _to_numpy(leaf: Any) -> Any:
    if isinstance(leaf, jax.Array) and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(leaf)
    return leaf


def save_state(state: PyTree, path: str | os.PathLike[str]) -> None:
    """Pickles ``state`` to ``path`` (replacing it atomically); JAX arrays go in as NumPy."""
    state = jax.tree_util.tree_map(_to_numpy, state)
    with AtomicFile(path) as out, open(out.tmp, "wb") as f:
        pickle.dump(state, f)


def load_state(path: str | os.PathLike[str]) -> PyTree:
    """Reads back a state written by ``save_state`` (or FedJAX's ``save_state``)."""
    with open(path, "rb") as f:
        return pickle.load(f)


class _ExtType(enum.IntEnum):
    NDARRAY = 1
    NATIVE_COMPLEX = 2
    NUMPY_SCALAR = 3
    BYTES_NDARRAY = 4


def _numeric_array_bytes(array: np.ndarray) -> bytes:
    if array.dtype.hasobject or array.dtype.isalignedstruct:
        raise ValueError(
            f"msgpack_serialize: arrays of dtype {array.dtype} (objects or structured records) "
            "are not supported; use numeric arrays, or an object array holding only bytes."
        )
    return msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)


def _bytes_array_bytes(array: np.ndarray) -> bytes:
    flat = list(array.flatten())
    if not all(isinstance(item, bytes) for item in flat):
        raise ValueError(
            "msgpack_serialize: an object array can only be serialized when it holds bytes."
        )
    return msgpack.packb((array.shape, flat), use_bin_type=True)


def _encode(value: Any) -> msgpack.ExtType:
    """msgpack's ``default`` hook: encodes what msgpack has no native type for."""
    if isinstance(value, np.ndarray) and value.dtype.hasobject:
        return msgpack.ExtType(_ExtType.BYTES_NDARRAY, _bytes_array_bytes(value))
    if isinstance(value, (np.ndarray, jax.Array)):
        return msgpack.ExtType(_ExtType.NDARRAY, _numeric_array_bytes(np.asarray(value)))
    if isinstance(value, np.generic):
        return msgpack.ExtType(_ExtType.NUMPY_SCALAR, _numeric_array_bytes(np.asarray(value)))
    if isinstance(value, complex):
        return msgpack.ExtType(_ExtType.NATIVE_COMPLEX, msgpack.packb((value.real, value.imag)))
    kind = "tuples (use lists)" if isinstance(value, tuple) else f"{type(value).__name__} values"
    raise TypeError(
        f"msgpack_serialize: {kind} cannot be serialized; the format holds dicts, lists, "
        "bytes, str, Python/NumPy scalars and arrays."
    )


def _dtype(name: bytes) -> np.dtype:
    # jnp.dtype also knows the ml_dtypes names (bfloat16, float8_*) that np.dtype may not.
    return jnp.dtype(name.decode())


def _numeric_array(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    return np.frombuffer(buffer, dtype=_dtype(dtype_name)).reshape(shape, order="C")


def _decode(code: int, data: bytes) -> Any:
    """msgpack's ``ext_hook``: the inverse of ``_encode``."""
    if code == _ExtType.NDARRAY:
        return _numeric_array(data)
    if code == _ExtType.NUMPY_SCALAR:
        return _numeric_array(data)[()]
    if code == _ExtType.NATIVE_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    if code == _ExtType.BYTES_NDARRAY:
        shape, flat = msgpack.unpackb(data, raw=True)
        return np.array(flat, dtype=object).reshape(shape)
    return msgpack.ExtType(code, data)


def msgpack_serialize(pytree: PyTree) -> bytes:
    """Encodes nested dicts/lists of arrays, bytes and scalars as msgpack bytes."""
    # strict_types: exact types only, so e.g. tuples and dict subclasses reach _encode (and
    # fail clearly) rather than being silently written as lists/dicts.
    return msgpack.packb(pytree, default=_encode, strict_types=True)


def msgpack_deserialize(encoded_pytree: bytes) -> PyTree:
    """Decodes ``msgpack_serialize`` output; arrays come back as read-only NumPy arrays."""
    return msgpack.unpackb(encoded_pytree, ext_hook=_decode, raw=False)
