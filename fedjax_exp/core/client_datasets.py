"""Client datasets: a client's examples as columns, plus batching with FedJAX's semantics.

Examples are stored column-wise: a mapping from feature name to a NumPy array whose leading
axis indexes examples (``examples['x'][i]`` is example ``i``'s ``x``). A single batch uses the
same representation, so "all of a client's examples" and "one batch" are the same kind of value.

:class:`ClientDataset` pairs raw examples with a :class:`BatchPreprocessor` applied to every
batch it produces. Its batching methods follow FedJAX 0.0.17 exactly (same batches, same masks,
same order for a given seed):

- :meth:`ClientDataset.batch`: sequential batches; the last one may be short.
- :meth:`ClientDataset.padded_batch`: sequential batches with a boolean mask under
  ``EXAMPLE_MASK_KEY``; the last batch is zero-padded to one of a few bucketed sizes so that a
  jitted function sees few distinct shapes.
- :meth:`ClientDataset.shuffle_repeat_batch`: shuffled, repeated, always-full batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_exp.core import dataclasses
from fedjax_exp.core.typing import EXAMPLE_MASK_KEY

__all__ = [
    "EXAMPLE_MASK_KEY",
    "BatchHParams",
    "BatchPreprocessor",
    "ClientDataset",
    "Examples",
    "NoOpBatchPreprocessor",
    "PaddedBatchHParams",
    "ShuffleRepeatBatchHParams",
    "assert_consistent_rows",
    "attach_mask",
    "buffered_shuffle",
    "buffered_shuffle_batch_client_datasets",
    "concat_examples",
    "num_examples",
    "pad_examples",
    "padded_batch_client_datasets",
    "pick_final_batch_size",
    "slice_examples",
]

Examples = Mapping[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Column helpers
# --------------------------------------------------------------------------------------------


def assert_consistent_rows(examples: Examples) -> None:
    """Raises ValueError unless ``examples`` has at least one feature and all share a length."""
    if not examples:
        raise ValueError("examples must have at least one feature, got an empty mapping")
    items = iter(examples.items())
    first_name, first = next(items)
    first_rows = np.shape(first)[0] if np.ndim(first) else None
    if first_rows is None:
        raise ValueError(f"feature {first_name!r} must have a leading example axis, got a scalar")
    for name, value in items:
        rows = np.shape(value)[0] if np.ndim(value) else None
        if rows != first_rows:
            raise ValueError(
                f"feature {first_name!r} has {first_rows} rows but feature {name!r} has {rows}; "
                "every feature needs one row per example"
            )


def num_examples(examples: Examples, validate: bool = True) -> int:
    """Number of examples (rows) in ``examples``."""
    if validate:
        assert_consistent_rows(examples)
    return len(next(iter(examples.values())))


def slice_examples(examples: Examples, index: slice) -> dict[str, np.ndarray]:
    """Rows ``index`` of every feature (views, not copies, for NumPy arrays)."""
    return {k: v[index] for k, v in examples.items()}


def concat_examples(many_examples: Iterable[Examples]) -> dict[str, np.ndarray]:
    """Concatenates examples feature by feature, in order."""
    columns: dict[str, list[np.ndarray]] = {}
    for examples in many_examples:
        for k, v in examples.items():
            columns.setdefault(k, []).append(v)
    return {k: np.concatenate(v, axis=0) for k, v in columns.items()}


def _check_no_mask(examples: Examples) -> None:
    if EXAMPLE_MASK_KEY in examples:
        raise ValueError(
            f"examples already contain the mask key {EXAMPLE_MASK_KEY!r}; "
            "rename that feature, the key is reserved for padding masks"
        )


def attach_mask(examples: Examples, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Adds ``mask`` under ``EXAMPLE_MASK_KEY``; refuses to overwrite an existing mask."""
    _check_no_mask(examples)
    return {**examples, EXAMPLE_MASK_KEY: mask}


def pad_examples(examples: Examples, size: int) -> dict[str, np.ndarray]:
    """Zero-pads every feature to ``size`` rows and adds the mask of real rows.

    The mask is the first key of the result, as in FedJAX.
    """
    _check_no_mask(examples)
    current = num_examples(examples)
    if current > size:
        raise ValueError(f"cannot pad {current} examples down to {size} rows")
    result: dict[str, np.ndarray] = {EXAMPLE_MASK_KEY: np.arange(size) < current}
    for k, v in examples.items():
        padded = np.zeros((size, *v.shape[1:]), v.dtype)
        padded[:current] = v
        result[k] = padded
    return result


def pick_final_batch_size(data_size: int, batch_size: int, num_batch_size_buckets: int) -> int:
    """Size the final (possibly short) batch is padded to.

    Candidate sizes are ``batch_size`` halved up to ``num_batch_size_buckets - 1`` times; the
    smallest candidate that still holds the final batch wins. With one bucket every batch has
    ``batch_size`` rows. Example: batch_size 8, 3 buckets, final batch of 3 -> 4 (8, 4, 2 are
    the candidates; 2 is too small).
    """
    remainder = data_size % batch_size
    if remainder == 0:
        return batch_size
    size, buckets = batch_size, 1
    # Halve while the next smaller candidate still fits the remainder and buckets remain.
    while size // 2 >= remainder and buckets < num_batch_size_buckets:
        size //= 2
        buckets += 1
    return size


def _check_int(name: str, value: Any, minimum: int = 1) -> None:
    """ValueError unless ``value`` is an integer (not a bool) of at least ``minimum`` (0 or 1)."""
    is_int = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not is_int or value < minimum:
        kind = "a positive" if minimum > 0 else "a non-negative"
        shown = int(value) if is_int else repr(value)
        raise ValueError(f"{name} must be {kind} integer, got {shown}")


def _check_batch_size(batch_size: Any) -> None:
    _check_int("batch_size", batch_size)


# --------------------------------------------------------------------------------------------
# Preprocessing and hyperparameters
# --------------------------------------------------------------------------------------------


class BatchPreprocessor:
    """An ordered chain of functions applied to batches of examples (``Examples -> Examples``).

    Each function receives a ``dict`` it may return modified (e.g. ``{**x, 'y': x['y'] % 2}``).
    ``append`` returns a new preprocessor; preprocessors are immutable, and compared by
    identity where batching several clients together requires "the same" preprocessor.
    """

    def __init__(self, fns: Iterable[Callable[[Examples], Examples]] = ()):
        self._fns = tuple(fns)

    @property
    def fns(self) -> tuple[Callable[[Examples], Examples], ...]:
        """The functions, in the order they run."""
        return self._fns

    def __call__(self, examples: Examples) -> Examples:
        if not self._fns:
            return examples  # The common case stays free: no dict copy, no validation.
        out = dict(examples)
        for fn in self._fns:
            out = fn(out)
        assert_consistent_rows(out)
        return out

    def append(self, fn: Callable[[Examples], Examples]) -> BatchPreprocessor:
        """A new preprocessor that runs ``fn`` after this one's functions."""
        return BatchPreprocessor((*self._fns, fn))

    def __repr__(self) -> str:
        return f"BatchPreprocessor({self._fns})"


NoOpBatchPreprocessor = BatchPreprocessor()


@dataclasses.dataclass
class PaddedBatchHParams:
    """Options of :meth:`ClientDataset.padded_batch`.

    Attributes:
      batch_size: rows per batch.
      num_batch_size_buckets: how many sizes (``batch_size``, ``batch_size // 2``, ...) the
        final batch may be padded to.
    """

    batch_size: int
    num_batch_size_buckets: int = 1


@dataclasses.dataclass
class ShuffleRepeatBatchHParams:
    """Options of :meth:`ClientDataset.shuffle_repeat_batch`.

    Attributes:
      batch_size: rows per batch (every batch is full).
      num_epochs: passes over the data (None: unbounded unless ``num_steps`` is set).
      num_steps: number of batches (None: unbounded unless ``num_epochs`` is set).
      drop_remainder: with ``num_epochs``, drop a final batch that would need examples beyond
        the last epoch instead of filling it from a further shuffle.
      seed: seed of the shuffle (None: a fresh order each iteration).
      skip_shuffle: repeat in the stored order.
    """

    batch_size: int
    num_epochs: int | None = 1
    num_steps: int | None = None
    drop_remainder: bool = False
    seed: int | None = None
    skip_shuffle: bool = False


@dataclasses.dataclass
class BatchHParams:
    """Options of :meth:`ClientDataset.batch`.

    Attributes:
      batch_size: rows per batch.
      drop_remainder: drop a final batch shorter than ``batch_size``.
    """

    batch_size: int
    drop_remainder: bool = False


def _resolve_hparams(hparams_type: type, hparams: Any, kwargs: dict[str, Any]) -> Any:
    """FedJAX's calling convention: an hparams object, keyword overrides, or keywords alone."""
    if hparams is None:
        hparams = hparams_type(**kwargs)
    elif kwargs:
        hparams = hparams.replace(**kwargs)
    _check_batch_size(hparams.batch_size)
    return hparams


# --------------------------------------------------------------------------------------------
# ClientDataset
# --------------------------------------------------------------------------------------------


class ClientDataset:
    """One client's examples (columns of NumPy arrays) and the preprocessor for its batches.

    ``raw_examples`` holds the unpreprocessed columns; the preprocessor runs on each produced
    batch (and on :meth:`all_examples`). Slicing (``ds[:4]``) gives a new ClientDataset over
    views of the same arrays.
    """

    def __init__(
        self, raw_examples: Examples, preprocessor: BatchPreprocessor = NoOpBatchPreprocessor
    ):
        assert_consistent_rows(raw_examples)
        self.raw_examples = raw_examples
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return num_examples(self.raw_examples, validate=False)

    def __getitem__(self, index: slice) -> ClientDataset:
        if not isinstance(index, slice):
            raise ValueError(
                f"ClientDataset supports only slicing (e.g. ds[:4]), got index {index!r}"
            )
        return ClientDataset(slice_examples(self.raw_examples, index), self.preprocessor)

    def all_examples(self) -> Examples:
        """All examples, preprocessed (meant for small slices, e.g. ``ds[:4].all_examples()``)."""
        return self.preprocessor(self.raw_examples)

    def padded_batch(
        self, hparams: PaddedBatchHParams | None = None, **kwargs: Any
    ) -> Iterable[Examples]:
        """Sequential batches, each with a boolean mask under ``EXAMPLE_MASK_KEY``.

        Full batches have an all-True mask. The final short batch is zero-padded to the size
        chosen by :func:`pick_final_batch_size`, its mask True on real rows only. Accepts a
        :class:`PaddedBatchHParams` and/or its fields as keywords. Re-iterable.
        """
        return _PaddedBatchView(self, _resolve_hparams(PaddedBatchHParams, hparams, kwargs))

    def shuffle_repeat_batch(
        self, hparams: ShuffleRepeatBatchHParams | None = None, **kwargs: Any
    ) -> Iterable[Examples]:
        """Shuffled, repeated batches of exactly ``batch_size`` examples.

        Each epoch is a fresh permutation (without replacement), so the first
        ``ceil(len / batch_size)`` batches cover every example. A batch that runs past the end
        of an epoch is completed from the next epoch's permutation. The number of batches:
        ``num_steps`` if only it is set; ``ceil(len * num_epochs / batch_size)`` (floor with
        ``drop_remainder``) if only ``num_epochs`` is; the smaller if both; unbounded if
        neither. The order equals FedJAX's for the same seed. Re-iterable.

        Raises:
          ValueError: the dataset is empty and batches were requested (FedJAX loops forever).
        """
        hparams = _resolve_hparams(ShuffleRepeatBatchHParams, hparams, kwargs)
        return _ShuffleRepeatBatchView(self, hparams)

    def batch(self, hparams: BatchHParams | None = None, **kwargs: Any) -> Iterable[Examples]:
        """Sequential batches; the final one may be short unless ``drop_remainder``.

        Prefer :meth:`padded_batch` under jit: a short final batch is one more compilation.
        """
        return _BatchView(self, _resolve_hparams(BatchHParams, hparams, kwargs))


class _PaddedBatchView:
    def __init__(self, dataset: ClientDataset, hparams: PaddedBatchHParams):
        self._dataset = dataset
        self._batch_size = hparams.batch_size
        self._size = len(dataset)
        self._final_size = pick_final_batch_size(
            self._size, hparams.batch_size, hparams.num_batch_size_buckets
        )

    def __iter__(self) -> Iterator[Examples]:
        full_mask = np.ones([self._batch_size], dtype=np.bool_)
        raw, preprocess = self._dataset.raw_examples, self._dataset.preprocessor
        for start in range(0, self._size, self._batch_size):
            stop = start + self._batch_size
            batch = preprocess(slice_examples(raw, slice(start, stop)))
            if stop <= self._size:
                yield {**batch, EXAMPLE_MASK_KEY: full_mask}
            else:
                yield pad_examples(batch, self._final_size)


class _BatchView:
    def __init__(self, dataset: ClientDataset, hparams: BatchHParams):
        self._dataset = dataset
        self._batch_size = hparams.batch_size
        self._drop_remainder = hparams.drop_remainder
        self._size = len(dataset)

    def __iter__(self) -> Iterator[Examples]:
        raw, preprocess = self._dataset.raw_examples, self._dataset.preprocessor
        for start in range(0, self._size, self._batch_size):
            stop = start + self._batch_size
            if self._drop_remainder and stop > self._size:
                return
            yield preprocess(slice_examples(raw, slice(start, stop)))


class _ShuffleRepeatBatchView:
    def __init__(self, dataset: ClientDataset, hparams: ShuffleRepeatBatchHParams):
        self._dataset = dataset
        self._size = len(dataset)
        self._hparams = hparams
        size, bs = self._size, hparams.batch_size
        num_steps = hparams.num_steps
        if hparams.num_epochs is not None:
            total = size * hparams.num_epochs
            by_epochs = total // bs if hparams.drop_remainder else -(-total // bs)
            num_steps = by_epochs if num_steps is None else min(num_steps, by_epochs)
        self._num_steps = num_steps
        if self._size == 0 and (num_steps is None or num_steps > 0):
            raise ValueError(
                "shuffle_repeat_batch needs at least one example, got an empty ClientDataset; "
                "skip empty clients or pass num_steps=0"
            )

    def _index_stream(self) -> Iterator[np.ndarray]:
        """One array of example indices per epoch, in batch order."""
        # The same RandomState calls, in the same order, as FedJAX: one in-place shuffle of a
        # persistent int32 buffer per epoch. Matching them makes orders identical per seed.
        rng = np.random.RandomState(self._hparams.seed)
        order = np.arange(self._size, dtype=np.int32)
        while True:
            if not self._hparams.skip_shuffle:
                rng.shuffle(order)
            yield order.copy()

    def __iter__(self) -> Iterator[Examples]:
        bs = self._hparams.batch_size
        raw, preprocess = self._dataset.raw_examples, self._dataset.preprocessor
        epochs = self._index_stream()
        pending = np.zeros([0], dtype=np.int32)
        steps = itertools.count() if self._num_steps is None else range(self._num_steps)
        for _ in steps:
            while len(pending) < bs:
                pending = np.concatenate([pending, next(epochs)])
            indices, pending = pending[:bs], pending[bs:]
            yield preprocess({k: v[indices] for k, v in raw.items()})


# --------------------------------------------------------------------------------------------
# Batching across several client datasets
# --------------------------------------------------------------------------------------------


class _SameSchema:
    """Checks that datasets batched together share one preprocessor object and one feature set."""

    def __init__(self) -> None:
        self.preprocessor: BatchPreprocessor | None = None
        self.features: set[str] | None = None

    def check(self, dataset: ClientDataset) -> None:
        if self.preprocessor is None:
            self.preprocessor = dataset.preprocessor
        elif dataset.preprocessor is not self.preprocessor:
            raise ValueError(
                "client datasets batched together must share one BatchPreprocessor object, got "
                f"{self.preprocessor} and {dataset.preprocessor}"
            )
        features = set(dataset.raw_examples)
        if self.features is None:
            self.features = features
        elif features != self.features:
            raise ValueError(
                "client datasets batched together must have the same features, got "
                f"{sorted(self.features)} and {sorted(features)}"
            )


def padded_batch_client_datasets(
    datasets: Iterable[ClientDataset], hparams: PaddedBatchHParams | None = None, **kwargs: Any
) -> Iterator[Examples]:
    """Padded batches over several client datasets as if they were concatenated in order.

    Batches may span client boundaries; only the very last batch can be short, and it is
    padded as in :meth:`ClientDataset.padded_batch`. Every batch carries ``EXAMPLE_MASK_KEY``.

    Raises:
      ValueError: datasets with different preprocessor objects or different features.
    """
    hparams = _resolve_hparams(PaddedBatchHParams, hparams, kwargs)
    bs = hparams.batch_size
    full_mask = np.ones([bs], dtype=np.bool_)
    schema = _SameSchema()
    carry: list[Examples] = []  # Leftover rows (< bs) waiting for the next client.
    carried = 0
    for dataset in datasets:
        schema.check(dataset)
        preprocess, raw, size = dataset.preprocessor, dataset.raw_examples, len(dataset)
        if carried + size < bs:
            carry.append(raw)
            carried += size
            continue
        start = 0
        if carry:
            start = bs - carried
            carry.append(slice_examples(raw, slice(0, start)))
            yield attach_mask(preprocess(concat_examples(carry)), full_mask)
            carry, carried = [], 0
        while start + bs < size:  # Strict: an exactly-full tail is carried, as in FedJAX.
            yield attach_mask(preprocess(slice_examples(raw, slice(start, start + bs))), full_mask)
            start += bs
        if start < size:
            carry.append(slice_examples(raw, slice(start, size)))
            carried += size - start
    if carry:
        final = schema.preprocessor(concat_examples(carry))
        yield pad_examples(
            final, pick_final_batch_size(carried, bs, hparams.num_batch_size_buckets)
        )


def buffered_shuffle(
    source: Iterable[Any], buffer_size: int, rng: np.random.RandomState
) -> Iterator[Any]:
    """Approximately shuffles a stream through a buffer of ``buffer_size`` items (one pass).

    The buffer is filled and shuffled; then each incoming item takes the slot of the item
    emitted and is swapped with a random slot. Matches FedJAX's RNG use, so orders agree.
    """
    if buffer_size <= 0:
        raise ValueError(f"buffer_size must be a positive integer, got {buffer_size}")
    it = iter(source)
    buf = list(itertools.islice(it, buffer_size))
    rng.shuffle(buf)
    for item in it:
        out, buf[0] = buf[0], item
        j = rng.randint(buffer_size)
        if j != buffer_size - 1:  # Slot buffer_size-1 means "leave it at the front".
            buf[0], buf[j] = buf[j], buf[0]
        yield out
    yield from buf


def buffered_shuffle_batch_client_datasets(
    datasets: Iterable[ClientDataset],
    batch_size: int,
    buffer_size: int,
    rng: np.random.RandomState,
) -> Iterator[Examples]:
    """Batches the examples of a stream of client datasets after a buffered shuffle.

    One pass over ``datasets`` (pass an endless stream for repetition); examples from several
    clients mix within the ``buffer_size``-example buffer. For a finite stream the last batch
    may be short. Same order as FedJAX for the same ``rng`` state.

    Raises:
      ValueError: datasets with different preprocessor objects or different features.
    """
    _check_batch_size(batch_size)
    schema = _SameSchema()

    def rows() -> Iterator[tuple[Examples, int]]:
        for dataset in datasets:
            schema.check(dataset)
            raw = dataset.raw_examples
            for i in range(len(dataset)):
                yield raw, i

    def gather(picked: Sequence[tuple[Examples, int]]) -> Examples:
        features = picked[0][0].keys()
        # One-row slices joined, not rows stacked: keeps every dtype (object arrays of
        # ragged sequences, fixed-width bytes) exactly as FedJAX does.
        batch = {k: np.concatenate([raw[k][i : i + 1] for raw, i in picked]) for k in features}
        return schema.preprocessor(batch)

    picked: list[tuple[Examples, int]] = []
    for row in buffered_shuffle(rows(), buffer_size, rng):
        picked.append(row)
        if len(picked) == batch_size:
            yield gather(picked)
            picked = []
    if picked:
        yield gather(picked)
