"""The shuffled-batch gather's fast path, the two-thread copy, in chunks of several batches.

It may not change a batch: the stream must equal the plain per-batch gather of the index
stream, and a batch a caller keeps (or modifies) must never be changed by later chunks.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from helpers import random_image_clients

from fedjax_exp.core import in_memory_federated_data as imfd

BATCH = 8
ARGS = dict(batch_size=BATCH, client_buffer_size=4, example_buffer_size=64, seed=3)


@pytest.fixture
def store():
    return random_image_clients(num_clients=12, examples=37)


@pytest.fixture(params=["one thread", "two threads"])
def small_chunks(request, monkeypatch):
    """Chunks of 8 batches, so a few hundred batches span many chunks."""
    monkeypatch.setattr(imfd, "_CHUNK_BYTES", 8 * BATCH * 28 * 28 * 4)
    threshold = 1 if request.param == "two threads" else 1 << 40
    monkeypatch.setattr(imfd, "_PARALLEL_GATHER_MIN_BYTES", threshold)
    monkeypatch.setattr(imfd, "_usable_cores", lambda: 2)
    return request.param


def _expected(store, n):
    indices = store.shuffle_repeat_batch_indices(**ARGS)
    return [store.gather(idx) for idx in itertools.islice(indices, n)]


def test_stream_equals_the_plain_gather_of_the_index_stream(store, small_chunks):
    expected = _expected(store, 200)
    stream = store.shuffle_repeat_batches(**ARGS)
    for got, want in zip(itertools.islice(stream, 200), expected, strict=True):
        np.testing.assert_array_equal(got["x"], want["x"])
        np.testing.assert_array_equal(got["y"], want["y"])


def test_kept_batches_are_never_changed(store, small_chunks):
    expected = _expected(store, 200)
    stream = store.shuffle_repeat_batches(**ARGS)
    kept = {i: b for i, b in enumerate(itertools.islice(stream, 200)) if i % 13 == 0}
    # Writing into one batch changes no other (batches share no rows).
    kept[13]["x"][:] = -1.0
    # A second stream over the same store, while the first one's batches are still held.
    for _ in itertools.islice(store.shuffle_repeat_batches(**ARGS), 200):
        pass
    for i, batch in kept.items():
        if i != 13:
            np.testing.assert_array_equal(batch["x"], expected[i]["x"])
            np.testing.assert_array_equal(batch["y"], expected[i]["y"])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
# JAX warns that forking its process may deadlock; the child here only runs NumPy code.
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")
def test_a_forked_child_gathers_with_its_own_helper_thread(store, monkeypatch):
    import multiprocessing

    monkeypatch.setattr(imfd, "_CHUNK_BYTES", 8 * BATCH * 28 * 28 * 4)
    monkeypatch.setattr(imfd, "_PARALLEL_GATHER_MIN_BYTES", 1)
    monkeypatch.setattr(imfd, "_usable_cores", lambda: 2)
    expected = _expected(store, 40)
    # The parent starts its helper thread first; the child must not wait on it.
    for _ in itertools.islice(store.shuffle_repeat_batches(**ARGS), 40):
        pass

    def child(queue):
        batches = list(itertools.islice(store.shuffle_repeat_batches(**ARGS), 40))
        queue.put(
            all(np.array_equal(b["x"], e["x"]) for b, e in zip(batches, expected, strict=True))
        )

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    process.join(timeout=60)
    assert process.exitcode == 0, "the forked child hung or failed"
    assert queue.get(timeout=5) is True
