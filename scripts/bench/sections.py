"""The benchmark's sections. Each takes a :class:`Context` and returns table rows.

A row compares one measurement between FedJAX (the reference) and fedjax_exp. ``ratio`` is
always "times better for fedjax_exp": ours/theirs for rates, theirs/ours for times and memory.
A side that fails (for instance a fedjax_exp piece that does not exist yet) leaves its value
``None`` and its error in the row's ``errors``; the other rows still run (``--strict``
re-raises instead).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import traceback
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench import data, models, reference
from bench.timing import Rate, call_rate, stream_rate, sync

SECTIONS = ("data", "eval", "train", "fed", "e2e", "memory")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS_DIR = REPO_ROOT / "scripts"

# Goals from the issue (ratios on a 2-core CPU), keyed by (section, kind, model, batch size);
# None matches any value.
GOALS: list[tuple[tuple[str, str, str | None, int | None], float]] = [
    (("data", "shuffled", None, None), 10.0),
    (("eval", "evaluate_model", None, None), 3.0),
    (("train", "steps", "logistic", 8), 3.0),
    (("train", "steps", "stax_cnn", 8), 2.0),
]


def goal_for(section: str, kind: str, model: str | None, batch_size: int | None) -> float | None:
    for (s, k, m, b), goal in GOALS:
        if s == section and k == kind and m in (None, model) and b in (None, batch_size):
            return goal
    return None


# Default training steps per run: enough for a steady rate and a meaningful accuracy, short
# enough that the CNNs (a few steps/s at batch 128 on 2 cores) finish in minutes.
DEFAULT_STEPS = {"logistic": 2000, "mlp": 2000, "stax_cnn": 300, "haiku_cnn": 300}


def default_steps(model: str, batch_size: int) -> int:
    steps = DEFAULT_STEPS[model]
    return steps if batch_size <= 8 or model in ("logistic", "mlp") else max(50, steps // 3)


@dataclass
class Settings:
    """How much to measure. ``quick()`` gives the smoke-test sizes."""

    batch_sizes: tuple[int, ...] = (8, 128)
    stream_batches: int = 1000  # batches per timed window (data section)
    # Shuffled windows draw at least this many examples: ~2 FEMNIST epochs, so each window
    # holds the per-epoch reshuffle (~0.5-1 ms) in proportion instead of by chance.
    stream_examples: int = 80_000
    repeats: int = 5  # timed windows / calls per measurement
    steps: int | None = None  # training steps per run; None: DEFAULT_STEPS per model/batch
    warmup_steps: int = 20  # untimed (compiling) steps at the start of a run
    accuracy_seeds: int = 3  # training seeds per side for the accuracy comparison
    windows: int = 5  # timed windows per training run
    train_models: tuple[str, ...] = models.MODEL_NAMES
    eval_models: tuple[str, ...] = ("logistic", "stax_cnn")
    eval_max_batches: int = 40  # cap on evaluation batches of 128 (5,120 examples)
    e2e_steps: int | None = None  # None: the recipe's own step count
    e2e_recipe: str = "seed_logistic"
    e2e_extra: tuple[str, ...] = ()  # more run.py overrides
    # fed section (None: per-model defaults in bench.fed_section)
    fed_models: tuple[str, ...] = ("logistic", "haiku_cnn")
    fed_sides: tuple[str, ...] = ("run", "jit", "parallel")  # fedjax_exp sides against FedJAX
    fed_rounds: int | None = None
    fed_warmup: int | None = None
    fed_seeds: int | None = None
    fed_parallel_cnn: bool = False  # the parallel backend on the CNN: minutes per round on CPU
    fed_run_overrides: tuple[str, ...] = ()  # more run.py overrides for the run side
    synthetic_clients: int = data.EMNIST_CLIENTS
    synthetic_examples: int = data.EMNIST_TRAIN_EXAMPLES
    quick: bool = False
    strict: bool = False

    @classmethod
    def quick_settings(cls, **changes: Any) -> Settings:
        values: dict[str, Any] = dict(
            stream_batches=20,
            stream_examples=160,
            repeats=2,
            steps=12,
            warmup_steps=2,
            windows=2,
            accuracy_seeds=1,
            eval_max_batches=4,
            e2e_steps=10,
            fed_models=("logistic",),
            fed_sides=("run",),
            fed_rounds=6,
            fed_warmup=2,
            fed_seeds=1,
            synthetic_clients=40,
            synthetic_examples=4000,
            quick=True,
        )
        values.update(changes)
        return cls(**values)


@dataclass
class Context:
    """What the sections share: settings, datasets, and each library's federated data."""

    settings: Settings
    train_sets: dict[str, data.Columns]  # name -> train columns (data, eval, train sections)
    test_set: data.Columns | None = None  # the test split for accuracy (FEMNIST when present)
    h5_pair: tuple[pathlib.Path, pathlib.Path] | None = None  # for e2e and memory
    _fds: dict[tuple[str, str], Any] = field(default_factory=dict)

    def fd(self, lib: str, name: str) -> Any:
        """Federated data over dataset ``name`` for ``lib`` ('fedjax' or 'ours'), cached."""
        key = (lib, name)
        if key not in self._fds:
            cols = self.test_set if name == "test" else self.train_sets[name]
            assert cols is not None
            build = data.fedjax_federated_data if lib == "fedjax" else data.ours_federated_data
            self._fds[key] = build(cols)
        return self._fds[key]


def make_row(
    section: str,
    dataset: str,
    case: str,
    unit: str,
    fedjax: float | None,
    ours: float | None,
    *,
    lower_is_better: bool = False,
    goal: float | None = None,
    note: str = "",
    errors: dict[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One table row; ``ratio`` = how many times better fedjax_exp is."""
    ratio = None
    if fedjax is not None and ours is not None and fedjax > 0 and ours > 0:
        ratio = fedjax / ours if lower_is_better else ours / fedjax
    return {
        "section": section,
        "dataset": dataset,
        "case": case,
        "unit": unit,
        "fedjax": fedjax,
        "fedjax_exp": ours,
        "lower_is_better": lower_is_better,
        "ratio": ratio,
        "goal": goal,
        "meets_goal": None if goal is None or ratio is None else ratio >= goal,
        "note": note,
        "errors": errors or {},
        **extra,
    }


def attempt(ctx: Context, errors: dict[str, str], side: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None with the error recorded under ``side`` (re-raised with --strict)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing side must not stop the benchmark.
        if ctx.settings.strict:
            raise
        errors[side] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"  [{side}] {errors[side]}", file=sys.stderr)
        if os.environ.get("BENCH_TRACEBACKS"):
            traceback.print_exc()
        return None


def alternate(measures: dict[str, Callable[[], Rate] | None], repeats: int) -> dict[str, Rate]:
    """Runs each side's one-sample measurement in turn, ``repeats`` times.

    Alternating (A B A B ...) exposes both sides to the same background load on a shared
    machine, instead of one side getting a quiet minute and the other a busy one.
    """
    rates = {side: Rate() for side, fn in measures.items() if fn is not None}
    for _ in range(repeats):
        for side, fn in measures.items():
            if fn is not None:
                sample = fn()
                rates[side].unit = sample.unit
                rates[side].samples.extend(sample.samples)
    return rates


def _median(rate: Rate | None) -> float | None:
    return rate.median if rate is not None and rate.samples else None


# --------------------------------------------------------------------------------------------
# data: shuffled and padded batches/s
# --------------------------------------------------------------------------------------------


def section_data(ctx: Context) -> list[dict[str, Any]]:
    import fedjax

    import fedjax_exp

    s = ctx.settings
    libs = {"fedjax": fedjax, "ours": fedjax_exp}
    rows = []
    for name in ctx.train_sets:
        for bs in s.batch_sizes:
            for kind in ("shuffled", "padded"):
                errors: dict[str, str] = {}
                measures: dict[str, Callable[[], Rate] | None] = {}
                for side, lib in libs.items():
                    fd = attempt(ctx, errors, side, lambda side=side, name=name: ctx.fd(side, name))
                    if fd is None:
                        measures[side] = None
                        continue
                    measures[side] = _stream_measure(lib, fd, kind, bs, s)
                rates = attempt(ctx, errors, "both", lambda m=measures: alternate(m, s.repeats))
                rates = rates or {}
                rows.append(
                    make_row(
                        "data",
                        name,
                        f"{kind} batches, batch {bs}",
                        "batches/s",
                        _median(rates.get("fedjax")),
                        _median(rates.get("ours")),
                        goal=goal_for("data", kind, None, bs),
                        errors=errors,
                        kind=kind,
                        batch_size=bs,
                        samples={k: v.samples for k, v in rates.items()},
                    )
                )
    return rows


def _stream_measure(lib: Any, fd: Any, kind: str, bs: int, s: Settings) -> Callable[[], Rate]:
    if kind == "shuffled":

        def make() -> Iterator[Any]:
            return iter(
                lib.shuffle_repeat_batch_federated_data(
                    fd,
                    batch_size=bs,
                    client_buffer_size=reference.CLIENT_BUFFER_SIZE,
                    example_buffer_size=reference.EXAMPLE_BUFFER_SIZE,
                    seed=reference.SEED,
                )
            )

        # Warm-up: the first buffer fill is start-up, not steady state.
        window = max(s.stream_batches, s.stream_examples // bs)
        return lambda: stream_rate(make, window, 1, warmup=max(1, s.stream_batches // 10))

    def make_padded() -> Iterator[Any]:
        return iter(lib.padded_batch_federated_data(fd, batch_size=bs))

    # Padded passes are finite: each window is a fresh pass (creation included).
    return lambda: stream_rate(make_padded, s.stream_batches, 1, warmup=1, fresh=True)


# --------------------------------------------------------------------------------------------
# eval: evaluate_model examples/s
# --------------------------------------------------------------------------------------------


def _eval_metrics(lib: Any) -> dict[str, Any]:
    # The same metric set on both sides, so both do the same work.
    return {"accuracy": lib.metrics.Accuracy(), "loss": lib.metrics.CrossEntropyLoss()}


def section_eval(ctx: Context) -> list[dict[str, Any]]:
    import fedjax
    import jax

    import fedjax_exp

    s = ctx.settings
    sets = {"test": ctx.test_set} if ctx.test_set is not None else {}
    sets.update({k: v for k, v in ctx.train_sets.items() if k.startswith("synthetic")})
    rows = []
    for name in sets:
        for model_name in s.eval_models:
            errors: dict[str, str] = {}
            setups: dict[str, Any] = {}
            for side, lib in (("fedjax", fedjax), ("ours", fedjax_exp)):

                def setup(side: str = side, lib: Any = lib, model_name: str = model_name) -> Any:
                    base = (
                        models.reference_model(lib, model_name)
                        if side == "fedjax"
                        else models.ours_model(model_name)
                    )
                    model = base.replace(eval_metrics=_eval_metrics(lib))
                    params = model.init(jax.random.PRNGKey(reference.SEED))
                    fd = ctx.fd(side, name)  # noqa: B023 - called before the loop moves on.
                    stream = lib.padded_batch_federated_data(fd, batch_size=128)
                    batches = list(itertools.islice(stream, s.eval_max_batches))
                    return lib, model, params, batches

                setups[side] = attempt(ctx, errors, side, setup)
            live = {k: v for k, v in setups.items() if v is not None}
            if not live:
                rows.append(
                    make_row(
                        "eval",
                        name,
                        f"evaluate_model {model_name}",
                        "examples/s",
                        None,
                        None,
                        errors=errors,
                    )
                )
                continue
            first = next(iter(live.values()))[3]
            examples = int(sum(np.sum(np.asarray(b["__mask__"])) for b in first))

            def measure(setup: Any, examples: int = examples) -> Callable[[], Rate]:
                lib, model, params, batches = setup
                fn = lambda: lib.evaluate_model(model, params, batches)
                sync(fn())  # Compile once, outside the timed calls.
                return lambda: call_rate(fn, examples, 1, warmup=0)

            measures = {
                side: attempt(ctx, errors, side, lambda v=v: measure(v)) if v else None
                for side, v in setups.items()
            }
            rates = attempt(ctx, errors, "both", lambda m=measures: alternate(m, s.repeats)) or {}
            results = {
                side: attempt(
                    ctx,
                    errors,
                    side,
                    lambda v=v: {
                        k: float(x) for k, x in v[0].evaluate_model(v[1], v[2], v[3]).items()
                    },
                )
                for side, v in live.items()
            }
            note = _compare_results(results)
            rows.append(
                make_row(
                    "eval",
                    name,
                    f"evaluate_model {model_name}, batch 128",
                    "examples/s",
                    _median(rates.get("fedjax")),
                    _median(rates.get("ours")),
                    goal=goal_for("eval", "evaluate_model", model_name, 128),
                    note=note,
                    errors=errors,
                    model=model_name,
                    examples=examples,
                    results=results,
                    samples={k: v.samples for k, v in rates.items()},
                )
            )
    return rows


def _compare_results(results: dict[str, dict[str, float] | None]) -> str:
    a, b = results.get("fedjax"), results.get("ours")
    if not a or not b:
        return ""
    diff = max(abs(a[k] - b[k]) for k in a if k in b)
    return "same results" if diff <= 1e-5 else f"results differ by up to {diff:.2g}"


# --------------------------------------------------------------------------------------------
# train: steps/s of the seed chapter's loop vs fedjax_exp's loop, and the accuracy reached
# --------------------------------------------------------------------------------------------


def train_in_process(side: str, args: dict[str, Any]) -> dict[str, Any]:
    """One side's training measurement in a fresh process (``bench.train_side``): its rate
    samples, warm-up time and accuracy."""
    cmd = [sys.executable, "-m", "bench.train_side", "--side", side]
    for key, value in args.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(
        cmd, env=_child_env(SCRIPTS_DIR), cwd=REPO_ROOT, capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{side} training process failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section_train(ctx: Context) -> list[dict[str, Any]]:
    s = ctx.settings
    rows = []
    if ctx.h5_pair is None:
        errors = {"both": "no h5 train/test pair to train on"}
        return [make_row("train", "-", "training", "steps/s", None, None, errors=errors)]
    train_h5, test_h5 = ctx.h5_pair
    name = pathlib.Path(train_h5).stem
    for model_name in s.train_models:
        for bs in s.batch_sizes:
            errors: dict[str, str] = {}
            steps = s.steps or default_steps(model_name, bs)
            # Short runs keep most of their steps timed.
            warmup = min(s.warmup_steps, max(1, steps // 5))
            args = {
                "model": model_name,
                "batch_size": bs,
                "steps": steps,
                "warmup": warmup,
                "windows": s.windows,
                "train": train_h5,
                "test": test_h5,
                "seeds": s.accuracy_seeds,
            }
            runs = {
                side: attempt(
                    ctx, errors, side, lambda side=side, args=args: train_in_process(side, args)
                )
                for side in ("fedjax", "ours")
            }
            ref, mine = runs["fedjax"], runs["ours"]
            rate = {k: Rate(v["samples"], "steps/s") if v else None for k, v in runs.items()}
            seeds_ref = ref["seed_accuracies"] if ref else []
            seeds_ours = mine["seed_accuracies"] if mine else []
            rows.append(
                make_row(
                    "train",
                    name,
                    f"{model_name}, batch {bs}, {steps} steps",
                    "steps/s",
                    _median(rate["fedjax"]),
                    _median(rate["ours"]),
                    goal=goal_for("train", "steps", model_name, bs),
                    note=_accuracy_note(seeds_ref, seeds_ours),
                    errors=errors,
                    model=model_name,
                    batch_size=bs,
                    steps=steps,
                    warmup_steps=warmup,
                    **side_by_side_fields(ref, mine, seeds_ref, seeds_ours),
                )
            )
    return rows


EVAL_EXAMPLES = reference.EVAL_BATCHES * reference.EVAL_BATCH_SIZE


def within_noise(a: Sequence[float], b: Sequence[float], n: int = EVAL_EXAMPLES) -> bool | None:
    """Whether two sides' mean accuracies differ by at most 3 standard errors of the
    difference of means.

    The per-seed variance is pooled over the sides that ran several seeds (the initial keys,
    shuffles and, federated, the sampled clients change with the seed: training noise, which
    includes the evaluation's), and is never below the binomial noise of one evaluation on
    ``n`` examples.
    """
    if not a or not b:
        return None
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    p = (mean_a + mean_b) / 2
    per_seed = max(p * (1 - p), 1e-12) / max(n, 1)
    spreads = [(statistics.variance(s), len(s) - 1) for s in (a, b) if len(s) > 1]
    if spreads:
        pooled = sum(v * d for v, d in spreads) / sum(d for _, d in spreads)
        per_seed = max(per_seed, pooled)
    return abs(mean_a - mean_b) <= 3 * math.sqrt(per_seed * (1 / len(a) + 1 / len(b)))


def side_by_side_fields(
    ref: dict[str, Any] | None,
    mine: dict[str, Any] | None,
    seeds_ref: Sequence[float],
    seeds_ours: Sequence[float],
    n: int = EVAL_EXAMPLES,
) -> dict[str, Any]:
    """The JSON fields of a training row for both sides (``ref``/``mine``: a side's result, or
    None when it failed): mean and per-seed accuracy, whether they agree within noise, the
    warm-up time and the timed samples."""
    return dict(
        accuracy={
            "fedjax": statistics.fmean(seeds_ref) if seeds_ref else None,
            "fedjax_exp": statistics.fmean(seeds_ours) if seeds_ours else None,
        },
        seed_accuracies={"fedjax": list(seeds_ref), "fedjax_exp": list(seeds_ours)},
        accuracy_within_noise=within_noise(seeds_ref, seeds_ours, n),
        warmup_s={
            "fedjax": ref["warmup_s"] if ref else None,
            "fedjax_exp": mine["warmup_s"] if mine else None,
        },
        samples={
            "fedjax": ref["samples"] if ref else [],
            "fedjax_exp": mine["samples"] if mine else [],
        },
    )


def _accuracy_note(a: Sequence[float], b: Sequence[float]) -> str:
    if not a or not b:
        return ""
    ok = "within noise" if within_noise(a, b) else "NOT within noise"
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    if len(a) == 1 and len(b) == 1:
        return f"accuracy {mean_a:.3f} vs {mean_b:.3f} ({ok})"
    spread = f"mean of {len(a)} seeds, std {statistics.pstdev(a):.3f} / {statistics.pstdev(b):.3f}"
    return f"accuracy {mean_a:.3f} vs {mean_b:.3f} ({spread}; {ok})"


# --------------------------------------------------------------------------------------------
# e2e: `python run.py experiment=seed_logistic` vs the same work in FedJAX's loop
# --------------------------------------------------------------------------------------------


@dataclass
class ProcessResult:
    returncode: int
    wall_s: float
    max_rss_bytes: int
    stdout: str
    stderr: str


def run_process(cmd: list[str], env: dict[str, str], cwd: pathlib.Path) -> ProcessResult:
    """Runs ``cmd`` to completion through :mod:`bench.launch`; its wall time (measured by the
    launcher, so without the launcher's own start-up) and its own peak RSS."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(SCRIPTS_DIR), env.get("PYTHONPATH", "")) if p
    )
    with tempfile.TemporaryDirectory(prefix="bench_launch_") as tmp:
        result_path = pathlib.Path(tmp) / "result.json"
        launcher = [sys.executable, "-m", "bench.launch", str(result_path), *cmd]
        proc = subprocess.run(launcher, cwd=cwd, env=env, capture_output=True, text=True)
        if not result_path.is_file():
            raise RuntimeError(f"launcher failed (exit {proc.returncode}): {proc.stderr[-300:]}")
        measured = json.loads(result_path.read_text())
    return ProcessResult(
        measured["returncode"],
        measured["wall_s"],
        measured["max_rss_bytes"],
        proc.stdout,
        proc.stderr,
    )


def _child_env(
    extra_path: pathlib.Path | None = None, compilation_cache: pathlib.Path | None = None
) -> dict[str, str]:
    env = dict(os.environ)
    if compilation_cache is not None:
        env["FEDJAX_EXP_COMPILATION_CACHE"] = str(compilation_cache)
    env.setdefault("WANDB_MODE", "offline")
    env.setdefault("WANDB_SILENT", "true")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p
        )
    return env


def _recipe(ctx: Context) -> dict[str, Any]:
    """steps / batch size / eval interval of the e2e recipe (read from experiments/)."""
    from omegaconf import OmegaConf

    path = REPO_ROOT / "experiments" / f"{ctx.settings.e2e_recipe}.yaml"
    trainer = OmegaConf.to_container(OmegaConf.load(path)).get("trainer", {})
    return {
        "steps": int(trainer.get("steps", 5000)),
        "batch_size": int(trainer.get("batch_size", 8)),
        "eval_every": int(trainer.get("eval_every", 1000)),
    }


def _final_accuracy_from_run_dir(run_dir: pathlib.Path) -> float | None:
    """The last ``final/test/accuracy`` (else any ``test/accuracy``) in ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    found = None
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            for key in ("final/test/accuracy", "eval/test/accuracy"):
                if key in record:
                    found = float(record[key])
                    break
    return found


def section_e2e(ctx: Context) -> list[dict[str, Any]]:
    s = ctx.settings
    errors: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    if ctx.h5_pair is None:
        errors["both"] = "no h5 train/test pair to run on"
        return [make_row("e2e", "-", "python run.py", "s", None, None, errors=errors)]
    train_h5, test_h5 = ctx.h5_pair
    recipe = attempt(ctx, errors, "ours", lambda: _recipe(ctx)) or {
        "steps": 5000,
        "batch_size": 8,
        "eval_every": 1000,
    }
    steps = s.e2e_steps or recipe["steps"]
    results: dict[str, ProcessResult | None] = {}
    accuracy: dict[str, float | None] = {"fedjax": None, "fedjax_exp": None}

    with tempfile.TemporaryDirectory(prefix="bench_e2e_") as tmp:
        run_dir = pathlib.Path(tmp) / "run"
        ours_cmd = [
            sys.executable,
            str(REPO_ROOT / "run.py"),
            f"experiment={s.e2e_recipe}",
            "dataset=files",
            f"dataset.loader.train_path={train_h5}",
            f"dataset.loader.test_path={test_h5}",
            f"hydra.run.dir={run_dir}",
            "trainer.progress_bar=false",
            *([f"trainer.steps={steps}"] if s.e2e_steps else []),
            *s.e2e_extra,
        ]
        ref_cmd = [
            sys.executable,
            "-m",
            "bench.reference",
            "--train",
            str(train_h5),
            "--test",
            str(test_h5),
            "--model",
            "logistic",
            "--steps",
            str(steps),
            "--batch-size",
            str(recipe["batch_size"]),
            "--eval-every",
            str(recipe["eval_every"]),
        ]
        for side, cmd, env in (
            ("fedjax", ref_cmd, _child_env(SCRIPTS_DIR)),
            # A fresh, empty compilation cache: the first run of the recipe, compiling all.
            ("ours", ours_cmd, _child_env(compilation_cache=pathlib.Path(tmp) / "xla")),
        ):
            res = attempt(ctx, errors, side, lambda c=cmd, e=env: run_process(c, e, REPO_ROOT))
            if res is not None and res.returncode != 0:
                tail = (res.stderr.strip().splitlines() or ["(no stderr)"])[-1]
                errors[side] = f"exit {res.returncode}: {tail[:300]}"
                print(f"  [{side}] {errors[side]}", file=sys.stderr)
                res = None
            results[side] = res
        if results.get("fedjax") is not None:
            with contextlib.suppress(ValueError, IndexError, KeyError):
                payload = json.loads(results["fedjax"].stdout.strip().splitlines()[-1])
                accuracy["fedjax"] = payload["final_test"]["accuracy"]
        if results.get("ours") is not None:
            accuracy["fedjax_exp"] = _final_accuracy_from_run_dir(run_dir)

    ref, mine = results.get("fedjax"), results.get("ours")
    command = "python run.py " + " ".join(ours_cmd[2:])
    acc_note = ""
    if accuracy["fedjax"] is not None and accuracy["fedjax_exp"] is not None:
        acc_note = f"; full test accuracy {accuracy['fedjax']:.3f} vs {accuracy['fedjax_exp']:.3f}"
    rows.append(
        make_row(
            "e2e",
            train_h5.stem,
            f"{s.e2e_recipe}, {steps} steps, wall time",
            "s",
            ref.wall_s if ref else None,
            mine.wall_s if mine else None,
            lower_is_better=True,
            note="start-up, data loading, compilation, training and evaluation" + acc_note,
            errors=errors,
            command=command,
            reference_command=" ".join(ref_cmd[1:]),
            accuracy=accuracy,
        )
    )
    rows.append(
        make_row(
            "e2e",
            train_h5.stem,
            f"{s.e2e_recipe}, peak RSS of the process",
            "MiB",
            ref.max_rss_bytes / 2**20 if ref else None,
            mine.max_rss_bytes / 2**20 if mine else None,
            lower_is_better=True,
            note="ru_maxrss of the process (W&B's service process not counted)",
            errors=dict(errors),
        )
    )
    return rows


# --------------------------------------------------------------------------------------------
# memory: peak allocation while loading the h5 pair into each library's federated data
# --------------------------------------------------------------------------------------------


def traced_peak(fn: Callable[[], Any]) -> tuple[int, int, Any]:
    """(peak, retained) bytes allocated by ``fn()`` (NumPy reports its buffers to
    tracemalloc), and its result."""
    gc.collect()
    tracemalloc.start()
    try:
        result = fn()
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, retained, result


def load_fedjax_h5(path: pathlib.Path) -> Any:
    """How a FedJAX user holds a TFF h5 file: a dict of per-client arrays,
    ``x = 1 - pixels[..., None]``, ``y = label``, in FedJAX's ``InMemoryFederatedData``."""
    import fedjax
    import h5py

    clients = {}
    with h5py.File(path, "r") as f:
        for name in sorted(f["examples"]):
            group = f["examples"][name]
            clients[name.encode()] = {
                "x": 1 - group["pixels"][()][..., None],
                "y": group["label"][()],
            }
    return fedjax.InMemoryFederatedData(clients)


def _load_fedjax_pair(train: pathlib.Path, test: pathlib.Path) -> Any:
    return [load_fedjax_h5(path) for path in (train, test)]


def _load_ours_pair(train: pathlib.Path, test: pathlib.Path) -> Any:
    """What ``dataset=files`` does in ``python run.py``."""
    from fedjax_exp.datasets import files

    load = getattr(files, "load_data", None) or files.load_federated_files
    return load(train_path=train, test_path=test)


def section_memory(ctx: Context) -> list[dict[str, Any]]:
    errors: dict[str, str] = {}
    if ctx.h5_pair is None:
        errors["both"] = "no h5 train/test pair to load"
        return [make_row("memory", "-", "load h5 pair", "MiB", None, None, errors=errors)]
    train, test = ctx.h5_pair
    array_bytes = 0
    for path in (train, test):
        cols = data.load_tff_h5(path)
        array_bytes += cols.nbytes
        del cols
    ref = attempt(
        ctx, errors, "fedjax", lambda: traced_peak(lambda: _load_fedjax_pair(train, test))
    )
    mine = attempt(ctx, errors, "ours", lambda: traced_peak(lambda: _load_ours_pair(train, test)))
    mib = 2**20
    note = f"arrays: {array_bytes / mib:.1f} MiB (x float32 + y int32)"
    if ref and mine:
        note += (
            f"; peak = {ref[0] / array_bytes:.2f}x vs {mine[0] / array_bytes:.2f}x the array bytes"
        )
    return [
        make_row(
            "memory",
            train.stem,
            "load train+test h5, peak traced allocation",
            "MiB",
            ref[0] / mib if ref else None,
            mine[0] / mib if mine else None,
            lower_is_better=True,
            note=note,
            errors=errors,
            array_bytes=array_bytes,
            retained_bytes={
                "fedjax": ref[1] if ref else None,
                "fedjax_exp": mine[1] if mine else None,
            },
        ),
    ]


def section_fed(ctx: Context) -> list[dict[str, Any]]:
    from bench import fed_section  # It builds on this module.

    return fed_section.section_fed(ctx)


RUNNERS: dict[str, Callable[[Context], list[dict[str, Any]]]] = {
    "data": section_data,
    "eval": section_eval,
    "train": section_train,
    "fed": section_fed,
    "e2e": section_e2e,
    "memory": section_memory,
}
