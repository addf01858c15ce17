#!/usr/bin/env python
"""Builds the embedded FEMNIST sample shipped in fedjax_exp/datasets/data/.

Source: ../shared/data/femnist/femnist_leaf_{train,test}.h5 (LEAF's FEMNIST sample of NIST
Special Database 19, TFF h5 layout). The sample keeps WHOLE writers, chosen deterministically
among writers that have both train and test data: a seeded draw of ``--writers`` writers,
stratified by NIST source so both domains (high school / Census) appear. Every kept writer
contributes all of its train and all of its test examples.

Storage: TFF-like layout ``examples/<writer>/{pixels,label}`` with pixels stored as uint8
``k = round(255 * p)`` (gzip). The source values are exactly float32 ``k / 255``, so
:func:`fedjax_exp.datasets.sample.load_data` restores them bit for bit (checked here before
writing).

Usage: python scripts/make_sample.py [--source DIR] [--out DIR] [--writers 40] [--seed 0]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

from fedjax_exp.datasets import emnist, sample, tff_h5

REPO = pathlib.Path(__file__).resolve().parents[1]


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """float32 k/255 -> uint8 k; refuses values that would not round-trip exactly."""
    k = np.rint(pixels.astype(np.float64) * 255)
    if k.min() < 0 or k.max() > 255:
        raise ValueError("pixels outside [0, 1]")
    k = k.astype(np.uint8)
    if not np.array_equal(k.astype(np.float32) / np.float32(255), pixels):
        raise ValueError("pixels are not exactly float32 k/255; cannot store them as uint8")
    return k


def choose_writers(
    train: tff_h5.ClientColumns, test: tff_h5.ClientColumns, count: int, seed: int
) -> list[bytes]:
    """Seeded, stratified-by-domain draw of writers present in both splits (sorted)."""
    both = sorted(set(train.client_ids) & set(test.client_ids))
    if count > len(both):
        raise ValueError(f"asked for {count} writers, only {len(both)} have train and test data")
    rng = np.random.default_rng(seed)
    by_domain: dict[int, list[bytes]] = {}
    for cid in both:
        by_domain.setdefault(emnist.domain_id(cid), []).append(cid)
    chosen: list[bytes] = []
    for dom, ids in sorted(by_domain.items()):
        share = max(1, round(count * len(ids) / len(both)))
        if dom == max(by_domain):
            share = count - len(chosen)
        picks = rng.choice(len(ids), size=min(share, len(ids)), replace=False)
        chosen.extend(ids[i] for i in picks)
    return sorted(chosen)


def subset(cols: tff_h5.ClientColumns, writers: list[bytes]) -> tff_h5.ClientColumns:
    index = {cid: i for i, cid in enumerate(cols.client_ids)}
    parts = [cols.client(index[w]) for w in writers]
    sizes = np.array([len(p["label"]) for p in parts], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    columns = {name: np.concatenate([p[name] for p in parts]) for name in cols.columns}
    return tff_h5.ClientColumns(list(writers), offsets, columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default=str(REPO.parent / "shared" / "data" / "femnist"))
    parser.add_argument("--out", default=str(REPO / "fedjax_exp" / "datasets" / "data"))
    parser.add_argument("--writers", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    source = pathlib.Path(args.source)
    train = tff_h5.read_h5_columns(source / "femnist_leaf_train.h5")
    test = tff_h5.read_h5_columns(source / "femnist_leaf_test.h5")
    writers = choose_writers(train, test, args.writers, args.seed)
    out = pathlib.Path(args.out)
    for split, cols in (("train", train), ("test", test)):
        part = subset(cols, writers)
        columns = {"pixels": to_uint8(part.columns["pixels"]), "label": part.columns["label"]}
        path = out / sample.FILE_NAMES[split]
        tff_h5.write_h5_columns(
            path,
            part.client_ids,
            part.offsets,
            columns,
            compression="gzip",
            attrs={
                "source": f"LEAF FEMNIST sample of NIST SD19 (femnist_leaf_{split}.h5)",
                "pixels_encoding": "uint8 k; original float32 value is k / 255",
                "writers": len(writers),
                "examples": part.num_examples,
                "seed": args.seed,
            },
            overwrite=True,
        )
        labels = np.unique(part.columns["label"])
        domains = {emnist.domain_id(w) for w in writers}
        print(
            f"{path.name}: {len(writers)} writers, {part.num_examples} examples, "
            f"{labels.size} classes, domains {sorted(domains)}, {path.stat().st_size:,} bytes"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
