#!/usr/bin/env python
"""fedjax_exp against FedJAX 0.0.17, side by side in one run, on the same data.

Sections (``--only`` picks some):

- ``data``: shuffled batches/s (``shuffle_repeat_batch_federated_data``, client buffer 16,
  example buffer 1024) and padded batches/s (``padded_batch_federated_data``), batch 8, 128;
- ``eval``: ``evaluate_model`` examples/s on padded batches of 128;
- ``train``: training steps/s for the seed chapter's logistic, MLP and stax CNN and FedJAX's
  Haiku CNN, batch 8 and 128: the seed chapter's jitted loop over FedJAX's shuffled batches
  against fedjax_exp's runner loop, with the accuracy both reach after the same steps (over
  3 seeds); each side trains in a fresh process, as its users run it;
- ``fed``: FedAvg rounds/s with FedJAX's ``experiments/fed_avg`` EMNIST settings (logistic
  and Haiku CNN, 10 clients per round, batch 10, one epoch): FedJAX's ``federated_averaging``
  with ``UniformGetClientSampler`` against ``python run.py experiment=fedavg_emnist_*``'s
  training loop (and fedjax_exp's library port with its ``jit`` and ``parallel`` backends),
  each side in a fresh process, with the test accuracy both reach after the same rounds;
- ``e2e``: wall time and peak RSS of ``python run.py experiment=seed_logistic`` against the
  same work done with FedJAX's loop, each in a fresh process;
- ``memory``: peak allocation while loading the train/test h5 pair.

Data: the shared FEMNIST files (``--femnist-dir``, TFF h5 layout) and deterministic
synthetic data of full EMNIST size (3400 clients, 671,585 examples). Prints the machine,
versions and a table of ratios; ``--out`` writes JSON, ``--markdown`` a page with the command.

    python scripts/benchmark.py --out bench.json --markdown docs/benchmarks.md
    python scripts/benchmark.py --quick            # about 2 minutes: a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

SCRIPTS_DIR = pathlib.Path(__file__).resolve().parent
if str(SCRIPTS_DIR) not in sys.path:
    sys.path.insert(0, str(SCRIPTS_DIR))  # The helper package scripts/bench.

from bench import data, models, report, sections  # noqa: E402

DATASETS = ("femnist", "synthetic")
TRAIN_H5 = "femnist_leaf_train.h5"
TEST_H5 = "femnist_leaf_test.h5"


def _csv(kind: str, allowed: Sequence[str]) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)}"
            )
        return values

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _batch_sizes(text: str) -> tuple[int, ...]:
    return tuple(_positive(v) for v in text.split(",") if v.strip())


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: a smoke test (about 2 minutes)"
    )
    p.add_argument(
        "--only",
        type=_csv("section", sections.SECTIONS),
        default=sections.SECTIONS,
        help=f"comma-separated sections to run ({','.join(sections.SECTIONS)})",
    )
    p.add_argument(
        "--datasets",
        type=_csv("dataset", DATASETS),
        default=DATASETS,
        help="femnist (the shared h5 files) and/or synthetic (full EMNIST size)",
    )
    p.add_argument("--femnist-dir", type=pathlib.Path, default=data.DEFAULT_FEMNIST_DIR)
    p.add_argument("--steps", type=_positive, help="training steps per run (train section)")
    p.add_argument("--e2e-steps", type=_positive, help="steps of the e2e run (default: recipe's)")
    p.add_argument("--repeats", type=_positive, help="timed repetitions per measurement")
    p.add_argument("--batch-sizes", type=_batch_sizes, help="e.g. 8,128")
    p.add_argument(
        "--models", type=_csv("model", models.MODEL_NAMES), help="models for the train section"
    )
    p.add_argument(
        "--fed-models",
        type=_csv("model", ("logistic", "haiku_cnn")),
        help="models for the fed section (logistic,haiku_cnn)",
    )
    p.add_argument(
        "--fed-sides",
        type=_csv("side", ("run", "jit", "parallel")),
        help="fedjax_exp sides of the fed section: run (run.py's loop), jit, parallel",
    )
    p.add_argument("--fed-rounds", type=_positive, help="rounds per run (fed section)")
    p.add_argument("--synthetic-clients", type=_positive)
    p.add_argument("--synthetic-examples", type=_positive)
    p.add_argument("--out", type=pathlib.Path, help="write the results as JSON here")
    p.add_argument("--markdown", type=pathlib.Path, help="write the table page here")
    p.add_argument("--strict", action="store_true", help="stop at the first failure")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> sections.Settings:
    changes: dict[str, Any] = {"strict": args.strict}
    for arg, key in (
        ("steps", "steps"),
        ("e2e_steps", "e2e_steps"),
        ("repeats", "repeats"),
        ("batch_sizes", "batch_sizes"),
        ("models", "train_models"),
        ("fed_models", "fed_models"),
        ("fed_sides", "fed_sides"),
        ("fed_rounds", "fed_rounds"),
        ("synthetic_clients", "synthetic_clients"),
        ("synthetic_examples", "synthetic_examples"),
    ):
        if getattr(args, arg) is not None:
            changes[key] = getattr(args, arg)
    if args.quick:
        return sections.Settings.quick_settings(**changes)
    return sections.Settings(**changes)


def _write_small_h5_pair(directory: pathlib.Path, settings: sections.Settings) -> tuple:
    """A TFF-layout train/test pair from synthetic data (when FEMNIST is absent)."""
    import h5py
    import numpy as np

    paths = []
    for split, seed in (("train", 1), ("test", 2)):
        cols = data.synthetic(
            num_clients=max(2, settings.synthetic_clients // 10),
            num_examples=max(20, settings.synthetic_examples // 10),
            seed=seed,
            name=f"synthetic_{split}",
        )
        path = directory / f"synthetic_{split}.h5"
        with h5py.File(path, "w") as f:
            for i, cid in enumerate(cols.client_ids):
                lo, hi = cols.offsets[i], cols.offsets[i + 1]
                g = f.create_group(f"examples/{cid.decode()}")
                g["pixels"] = np.float32(1) - cols.x[lo:hi, ..., 0]
                g["label"] = cols.y[lo:hi]
        paths.append(path)
    return tuple(paths)


def build_context(
    settings: sections.Settings,
    only: Sequence[str],
    datasets: Sequence[str],
    femnist_dir: pathlib.Path,
    scratch: pathlib.Path,
) -> sections.Context:
    """Loads the datasets the chosen sections need."""
    ctx = sections.Context(settings=settings, train_sets={})
    train, test = femnist_dir / TRAIN_H5, femnist_dir / TEST_H5
    femnist_ok = "femnist" in datasets and train.is_file() and test.is_file()
    if "femnist" in datasets and not femnist_ok:
        print(f"note: FEMNIST files not found in {femnist_dir}; skipping them", file=sys.stderr)
    if femnist_ok:
        ctx.train_sets["femnist"] = data.load_tff_h5(train, "femnist")
        ctx.test_set = data.load_tff_h5(test, "femnist_test")
        ctx.h5_pair = (train, test)
    needs_synthetic = {"data", "eval"} & set(only)
    if "synthetic" in datasets and needs_synthetic:
        start = time.perf_counter()
        ctx.train_sets["synthetic"] = data.synthetic(
            settings.synthetic_clients, settings.synthetic_examples
        )
        print(f"synthetic data generated in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    if ctx.h5_pair is None and {"train", "fed", "e2e", "memory"} & set(only):
        ctx.h5_pair = _write_small_h5_pair(scratch, settings)
    return ctx


def missing_pieces(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Distinct fedjax_exp-side failures, for the report."""
    seen: dict[str, None] = {}
    for row in rows:
        for side, message in row.get("errors", {}).items():
            if side != "fedjax":
                seen.setdefault(f"{row['section']}/{row['case']}: {message}")
    return list(seen)


def run_benchmark(
    settings: sections.Settings,
    only: Sequence[str] = sections.SECTIONS,
    datasets: Sequence[str] = DATASETS,
    femnist_dir: pathlib.Path = data.DEFAULT_FEMNIST_DIR,
    command: str = "python scripts/benchmark.py",
) -> dict[str, Any]:
    """Runs the chosen sections; returns the JSON-ready result (machine, settings, rows)."""
    machine = report.machine_info(sections.REPO_ROOT)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench_") as scratch:
        ctx = build_context(settings, only, datasets, femnist_dir, pathlib.Path(scratch))
        for name in sections.SECTIONS:
            if name not in only:
                continue
            print(f"== {name}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            rows.extend(sections.RUNNERS[name](ctx))
            print(f"   {name} took {time.perf_counter() - start:.1f}s", file=sys.stderr)
        described = [c.describe() for c in ctx.train_sets.values()]
        if ctx.test_set is not None:
            described.append(ctx.test_set.describe())
    report.finish_machine_info(machine)
    return {
        "command": command,
        "machine": machine,
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "sections": [s for s in sections.SECTIONS if s in only],
        "datasets": described,
        "rows": rows,
        "missing": missing_pieces(rows),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    settings = settings_from_args(args)
    command = "python scripts/benchmark.py " + shlex.join(argv)
    result = run_benchmark(settings, args.only, args.datasets, args.femnist_dir, command.strip())
    print(report.print_report(result))
    if args.out:
        report.write_json(result, args.out)
        print(f"\nwrote {args.out}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report.markdown(result))
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
