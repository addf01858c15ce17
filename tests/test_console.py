"""What a run prints: no W&B banner unless asked for, log lines never glued onto the progress
bar (checked on the raw bytes, carriage returns included), parallel sweep jobs that say which
job a line is from, huge losses in scientific notation and one warning when the loss grows."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
import warnings

from helpers import REPO_ROOT
from tqdm import tqdm

from fedjax_exp.experiment import loop
from fedjax_exp.experiment.run_files import read_metrics
from fedjax_exp.training import console

SMALL = [
    "logger=wandb",
    "trainer.log_every=10",
    "trainer.eval_every=0",
    "trainer.checkpoint_every=0",
    "trainer.eval_batch_size=32",
    "trainer.eval_batches.train=1",
    "trainer.eval_batches.test=1",
    "trainer.progress_bar=true",
]


def rendered(raw: str) -> list[str]:
    """The lines as a terminal shows them: a carriage return goes back to the line's start,
    and what follows overwrites what was there."""
    lines = []
    for line in raw.split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part) :]
        lines.append(shown.rstrip())
    return lines


def console_of(*args: str) -> tuple[int, str]:
    """``python run.py ARGS`` with stdout and stderr in one pipe, as on a terminal; the raw
    text (bytes decoded without newline translation, so carriage returns stay). W&B's own
    environment switches are cleared: the config alone decides what W&B prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_FULL"))}
    proc = subprocess.run(
        [sys.executable, "run.py", *args],
        cwd=REPO_ROOT,
        env={**env, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=300,
    )
    return proc.returncode, proc.stdout.decode()


def log_lines(lines: list[str]) -> list[str]:
    return [line for line in lines if "][INFO] - " in line or "][WARNING] - " in line]


def test_format_loss_switches_to_scientific_notation_only_when_huge_or_tiny():
    assert [console.format_loss(v) for v in (2.5, 0.0, 0.0123, 9999.5)] == [
        "2.5000",
        "0.0000",
        "0.0123",
        "9999.5000",
    ]
    assert [console.format_loss(v) for v in (3.2e12, 12345.0, -4.5e7, 1.5e-5)] == [
        "3.2e+12",
        "1.23e+04",
        "-4.5e+07",
        "1.5e-05",
    ]
    assert console.format_loss(float("nan")) == "nan"


def test_loss_growth_warning_rule():
    assert console.loss_growth_warning((1, 4.1), 300, 41.0) is None  # 10x exactly: no warning.
    assert console.loss_growth_warning((1, 4.1), 300, float("inf")) is None  # Diverged instead.
    assert console.loss_growth_warning((1, 0.0), 300, 5.0) is None  # No scale to compare with.
    assert console.loss_growth_warning((1, float("nan")), 300, 5.0) is None
    assert console.loss_growth_warning((1, 4.1), 300, 4100.0) == (
        "loss 4100.0000 at step 300 is 1,000x its value at step 1 (4.1000; warned once, above "
        "10x): the learning rate may be too high (optimizer.learning_rate)"
    )
    assert "is 1.0e+12x its value at step 51 (3.0000;" in console.loss_growth_warning(
        (51, 3.0), 60, 3e12
    )


def _bar_with_a_log_line_and_a_warning(redirect: bool) -> list[str]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)  # Hydra's console handler is a plain StreamHandler.
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings():  # Python prints a warning to stderr: here, to `out`.
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *args, **kwargs: out.write(f"W: {message}\n")
            bar = tqdm(total=10, file=out, desc="train", mininterval=0, miniters=1)
            with bar, console.logs_above(bar) if redirect else contextlib.nullcontext():
                bar.update(3)
                logging.getLogger("test_console").warning("a log line")
                bar.update(2)
                warnings.warn("a warning", UserWarning, stacklevel=1)
                bar.update(5)
    finally:
        logging.getLogger().removeHandler(handler)
    return rendered(out.getvalue())


def test_log_lines_and_warnings_print_above_the_progress_bar():
    lines = _bar_with_a_log_line_and_a_warning(redirect=True)
    assert "a log line" in lines and "W: a warning" in lines  # Lines of their own ...
    assert lines[-2].startswith("train: 100%|") and lines[-1] == ""  # ... and the bar below.
    # The check can fail: without the redirection the lines are glued onto the bar.
    glued = _bar_with_a_log_line_and_a_warning(redirect=False)
    assert any(line.startswith("train:") and "a log line" in line for line in glued)
    assert any(line.startswith("train:") and "W: a warning" in line for line in glued)


def test_parallel_job_label_is_none_outside_a_sweep():
    assert loop.parallel_job_label() is None


def test_prefixed_console_lines_say_whose_they_are(tmp_path):
    out = io.StringIO()
    handlers = [logging.StreamHandler(out), logging.FileHandler(tmp_path / "run.log")]
    handlers[0].setFormatter(logging.Formatter("[%(levelname)s] - %(message)s"))
    root = logging.getLogger()
    saved = root.handlers
    root.handlers = handlers
    try:
        console.prefix_console_lines("job 3 (seed=1)")
        console.prefix_console_lines("job 3 (seed=1)")  # Once only.
        logging.getLogger("test_console").warning("finished step %d", 4)
    finally:
        root.handlers = saved
        handlers[1].close()
    assert out.getvalue() == "[WARNING] - job 3 (seed=1): finished step 4\n"
    assert (tmp_path / "run.log").read_text() == "finished step 4\n"  # Log files as they were.


def test_a_run_prints_clean_lines_a_huge_loss_and_one_growth_warning(tmp_path):
    code, raw = console_of(
        *SMALL,
        "trainer.checkpoint_every=10",
        "logger.wandb.silent=false",  # W&B's banner is back.
        "optimizer=sgd",
        "optimizer.learning_rate=1e4",  # The loss grows to ~1e4 but stays finite.
        "trainer.steps=40",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 0, raw
    assert "\r" in raw  # The bar was drawn, with carriage returns ...
    lines = rendered(raw)
    logged = log_lines(lines)
    assert logged and all(line.startswith("[20") for line in logged)  # ... yet nothing glued.
    assert any(line.startswith("wandb: Run summary:") for line in lines)
    warnings = [line for line in logged if "the learning rate may be too high" in line]
    assert len(warnings) == 1, warnings
    assert "x its value at step 1 (4." in warnings[0]  # ln(62) classes: the first loss ~4.1.
    bar = [line for line in lines if line.startswith("train: 100%|")]
    last = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "train/loss" in r][-1]
    assert last["train/loss"] > 1e4  # So the bar shows e.g. loss=1.98e+04, not 19812.3421.
    assert len(bar) == 1 and f"loss={console.format_loss(last['train/loss'])}]" in bar[0]
    assert re.search(r"loss=\d\.\d+e\+04\]", bar[0]), bar[0]
    # Disk: by default only the latest checkpoint (what a resume needs) is kept.
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["40"]


def test_a_parallel_sweep_prints_one_labelled_line_per_job_end_and_no_banner(tmp_path):
    code, raw = console_of(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        *SMALL,
        "trainer.steps=4",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert code == 0, raw
    assert not [line for line in rendered(raw) if line.startswith("wandb:")]  # No banner ...
    # ... yet W&B ran: its offline runs are there.
    assert all(list((tmp_path / str(job) / "wandb").glob("offline-run-*")) for job in (0, 1))
    assert "\r" not in raw  # No progress bars from jobs sharing the terminal.
    ends = sorted(line.split(" - ", 1)[1] for line in rendered(raw) if "finished step" in line)
    # Each says which job it is: its number and overrides (Hydra's override_dirname).
    assert len(ends) == 2
    for job, end in enumerate(ends):
        assert end.startswith(f"job {job} (logger=wandb,seed={job},trainer.checkpoint_every=0,")
        assert ",trainer.steps=4): finished step 4 after " in end
