#!/usr/bin/env python
"""Benchmark fedjax_exp's federated data against FedJAX 0.0.17 on real FEMNIST, in one run.

Loads a TFF-layout h5 file (``examples/<writer>/pixels`` float32 (n, 28, 28),
``examples/<writer>/label`` int32) with h5py into BOTH libraries' InMemoryFederatedData, with
FedJAX's EMNIST preprocessing ``x = 1 - pixels[..., None]``, ``y = label``, then measures:

- shuffled batches/s: ``shuffle_repeat_batch_federated_data(fd, batch_size,
  client_buffer_size=16, example_buffer_size=1024, seed=0)`` (FedJAX's tutorial settings);
- padded batches/s: full passes of ``padded_batch_federated_data(fd, batch_size=...)``;
- for fedjax_exp also the raw index stream (``shuffle_repeat_batch_indices``), i.e. the rate
  left when a trainer gathers batches itself;
- memory: tracemalloc peak while building each dataset, and what stays allocated, as
  multiples of the dataset's array bytes (NumPy reports its buffers to tracemalloc).

Batch production only: nothing is sent to a device. Each rate is the best of ``--repeats``
timed runs of ``--seconds`` each (the best filters out noise from other processes).

Usage::

    python scripts/benchmark_data.py --out bench_data.json
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS_DIR = Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))  # The helper package scripts/bench.

from bench import data, sections  # noqa: E402

DEFAULT_H5 = data.DEFAULT_FEMNIST_DIR / "femnist_leaf_train.h5"


def load_fedjax_exp(path: Path) -> Any:
    """Reads straight into preallocated columns (``bench.data.load_tff_h5``) handed to
    ``InMemoryFederatedData.from_columns``: the data is held once, never as per-client arrays
    plus a concatenated copy."""
    return data.ours_federated_data(data.load_tff_h5(path))


def load_fedjax(path: Path) -> Any:
    """The way FedJAX's own h5 loader builds its in-memory data: a dict of per-client arrays."""
    return sections.load_fedjax_h5(path)


def measure_memory(load: Callable[[Path], Any], path: Path) -> tuple[Any, dict[str, float]]:
    peak, retained, fd = sections.traced_peak(lambda: load(path))
    return fd, {"peak_bytes": peak, "retained_bytes": retained}


def rate(make: Callable[[], Iterator[Any]], seconds: float, repeats: int) -> float:
    """Best items/s over ``repeats`` runs of an endless iterator from ``make()``."""
    best = 0.0
    for _ in range(repeats):
        it = make()
        next(it)  # Warm-up: generator set-up, first epoch order, caches.
        count, start = 0, time.perf_counter()
        while True:
            collections.deque(itertools.islice(it, 64), maxlen=0)  # Consume 64 items.
            count += 64
            now = time.perf_counter()
            if now - start >= seconds:
                break
        best = max(best, count / (now - start))
    return best


def _drained(make: Callable[[], Iterator[Any]]) -> Callable[[], Iterator[Any]]:
    """Endless repetition of a finite iterator (for full padded passes)."""

    def endless() -> Iterator[Any]:
        while True:
            yield from make()

    return endless


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h5", type=Path, default=DEFAULT_H5, help="TFF-layout FEMNIST h5")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--seconds", type=float, default=2.0, help="per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = parser.parse_args(argv)
    if not args.h5.is_file():
        raise SystemExit(f"FEMNIST file not found: {args.h5} (pass --h5 PATH)")

    import fedjax

    import fedjax_exp

    ours, ours_mem = measure_memory(load_fedjax_exp, args.h5)
    theirs, theirs_mem = measure_memory(load_fedjax, args.h5)
    array_bytes = ours.nbytes
    for mem in (ours_mem, theirs_mem):
        mem["peak_over_array_bytes"] = mem["peak_bytes"] / array_bytes
        mem["retained_over_array_bytes"] = mem["retained_bytes"] / array_bytes

    # Same data in both: ids, sizes and example 0 of the first client.
    assert list(ours.client_ids()) == list(theirs.client_ids())
    assert list(ours.client_sizes()) == list(theirs.client_sizes())

    sh = {"client_buffer_size": 16, "example_buffer_size": 1024, "seed": 0}
    rows: list[dict[str, Any]] = []
    for bs in args.batch_sizes:
        cases: dict[str, Callable[[], Iterator[Any]]] = {
            "shuffled": lambda lib, fd, bs=bs: lib.shuffle_repeat_batch_federated_data(
                fd, batch_size=bs, **sh
            ),
            "padded": lambda lib, fd, bs=bs: _drained(
                lambda: lib.padded_batch_federated_data(fd, batch_size=bs)
            )(),
        }
        for kind, make in cases.items():
            r_ours = rate(lambda m=make: m(fedjax_exp, ours), args.seconds, args.repeats)
            r_theirs = rate(lambda m=make: m(fedjax, theirs), args.seconds, args.repeats)
            rows.append(
                {
                    "kind": kind,
                    "batch_size": bs,
                    "fedjax_exp_batches_per_s": r_ours,
                    "fedjax_batches_per_s": r_theirs,
                    "ratio": r_ours / r_theirs,
                }
            )
            print(f"  measured {kind:8s} bs={bs:<4d} ratio {r_ours / r_theirs:7.1f}", flush=True)
        r_idx = rate(
            lambda bs=bs: ours.shuffle_repeat_batch_indices(bs, 16, 1024, 0),
            args.seconds,
            args.repeats,
        )
        rows.append({"kind": "index_stream", "batch_size": bs, "fedjax_exp_batches_per_s": r_idx})

    print()
    print(f"data: {args.h5}")
    print(
        f"      {ours.num_clients()} clients, {ours.num_examples} examples, "
        f"{array_bytes / 2**20:.1f} MiB of arrays"
    )
    print(f"{'kind':14s} {'batch':>5s} {'fedjax_exp/s':>14s} {'fedjax/s':>12s} {'ratio':>8s}")
    for row in rows:
        theirs_rate = row.get("fedjax_batches_per_s")
        print(
            f"{row['kind']:14s} {row['batch_size']:5d} {row['fedjax_exp_batches_per_s']:14,.0f} "
            + (f"{theirs_rate:12,.0f} {row['ratio']:8.1f}x" if theirs_rate else f"{'-':>12s}")
        )
    print()
    print(f"{'memory (x array bytes)':24s} {'peak':>6s} {'retained':>9s}")
    for name, mem in (("fedjax_exp", ours_mem), ("fedjax", theirs_mem)):
        print(
            f"{name:24s} {mem['peak_over_array_bytes']:6.2f} "
            f"{mem['retained_over_array_bytes']:9.2f}"
        )

    result = {
        "h5": str(args.h5),
        "num_clients": ours.num_clients(),
        "num_examples": ours.num_examples,
        "array_bytes": array_bytes,
        "settings": {**sh, "seconds": args.seconds, "repeats": args.repeats},
        "rates": rows,
        "memory": {"fedjax_exp": ours_mem, "fedjax": theirs_mem},
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "versions": {"numpy": np.__version__, "fedjax": getattr(fedjax, "__version__", "?")},
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
