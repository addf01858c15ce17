"""BufferPool hands a buffer out again only when nothing else references it."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedjax_exp.core.buffer_pool import ZERO_COPY_ALIGNMENT, BufferPool, aligned_empty

SHAPE = (4, 3)


@pytest.fixture(params=[False, True], ids=["plain", "aligned"])
def aligned(request):
    return request.param


def test_a_dropped_buffer_is_handed_out_again(aligned):
    pool = BufferPool()
    first = pool.get("k", SHAPE, np.float32, aligned)
    address = first.ctypes.data
    del first
    again = pool.get("k", SHAPE, np.float32, aligned)
    assert again.ctypes.data == address and again.shape == SHAPE and again.dtype == np.float32


def test_a_held_buffer_or_a_view_of_it_is_never_handed_out(aligned):
    pool = BufferPool()
    held = pool.get("k", SHAPE, np.float32, aligned)
    other = pool.get("k", SHAPE, np.float32, aligned)
    assert not np.shares_memory(held, other)
    view = other[1:3]  # A batch: a view of the buffer, the buffer itself dropped.
    del other
    third = pool.get("k", SHAPE, np.float32, aligned)
    assert not np.shares_memory(third, held) and not np.shares_memory(third, view)


def test_a_buffer_jax_uses_in_place_is_not_handed_out(aligned):
    pool = BufferPool()
    buffer = pool.get("k", SHAPE, np.float32, aligned)
    buffer[:] = 7.0
    on_device = jax.device_put(buffer)
    del buffer
    reused = pool.get("k", SHAPE, np.float32, aligned)
    reused[:] = -1.0
    np.testing.assert_array_equal(np.asarray(on_device), np.full(SHAPE, 7.0, np.float32))


def test_keys_shapes_and_dtypes_get_their_own_buffers():
    pool = BufferPool()
    a = pool.get("a", SHAPE, np.float32)
    address = a.ctypes.data
    del a  # Free for reuse, but only by the same key, shape and dtype.
    others = [
        pool.get("b", SHAPE, np.float32),
        pool.get("a", (2, 3), np.float32),
        pool.get("a", SHAPE, np.int32),
    ]
    assert [(x.shape, x.dtype) for x in others] == [
        (SHAPE, np.float32),
        ((2, 3), np.float32),
        (SHAPE, np.int32),
    ]
    assert all(x.ctypes.data != address for x in others)
    assert pool.get("a", SHAPE, np.float32).ctypes.data == address


def test_aligned_empty_is_aligned():
    for n in range(1, 9):
        assert aligned_empty((n, 5), np.float32).ctypes.data % ZERO_COPY_ALIGNMENT == 0


def test_bad_sizes():
    with pytest.raises(ValueError, match="at least 1"):
        BufferPool(per_key=0)
