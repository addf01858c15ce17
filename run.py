"""Train one experiment (or a sweep with -m) from the Hydra config in conf/.

    python run.py                              # logistic model on the embedded sample
    python run.py model=cnn loss=hinge trainer.steps=500
    python run.py -m optimizer=sgd,adam        # a sweep (see README)
    python run.py trainer.resume=latest        # resumes the newest run of this config

Returns the optimized metric (``optimized_metric``) so Optuna sweeps can maximise it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from fedjax_exp.experiment import ConfigError, RunFailed
from fedjax_exp.experiment.cli import precheck_overrides, resolve_resume_latest, resume_command
from fedjax_exp.experiment.errors import RunInterrupted

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "conf"
ARGS = sys.argv[1:]  # As typed: the resume command repeats them.

log = logging.getLogger("run")

# `${mod:${hydra.job.num},8}`: spreads the jobs of a sweep over a host's GPUs (job k gets GPU
# k mod 8): `'+hydra.job.env_set.CUDA_VISIBLE_DEVICES="${mod:${hydra.job.num},8}"'`.
OmegaConf.register_new_resolver("mod", lambda a, b: int(a) % int(b), replace=True)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _after_rejection(cfg: DictConfig, error: BaseException) -> None:
    """A rejected run writes nothing into a dir that holds a run (see ``save_hydra_files``).
    A fresh dir: a single run's is removed (it holds at most Hydra's job log); a sweep job's
    keeps Hydra's files so that the comparison report lists the job as rejected."""
    from hydra.core.hydra_config import HydraConfig

    from fedjax_exp.experiment.run_files import RUN_CONFIG_FILE
    from fedjax_exp.experiment.runner import RunDirBusy, save_hydra_files

    hc = HydraConfig.get()
    out = pathlib.Path(hc.runtime.output_dir)
    if isinstance(error, RunDirBusy) or (out / RUN_CONFIG_FILE).exists():
        return
    if _in_multirun():
        save_hydra_files(out, cfg)
        return
    with contextlib.suppress(OSError):  # Best effort: the error line was printed already.
        if {p.name for p in out.iterdir()} <= {f"{hc.job.name}.log"}:
            (out / f"{hc.job.name}.log").unlink(missing_ok=True)
            out.rmdir()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from fedjax_exp.experiment import run

    try:
        return run(cfg)
    except KeyboardInterrupt as e:
        # Ctrl-C: one line (where the run stopped, how to go on), exit 130; a sweep stops.
        from hydra.core.hydra_config import HydraConfig

        if isinstance(e, RunInterrupted):
            sweep_dir = HydraConfig.get().sweep.dir if _in_multirun() else None
            again = resume_command(ARGS, sweep_dir, e.checkpoint_step is not None)
            print(f"{e}; {again}", file=sys.stderr)
        else:  # Before the run wrote anything.
            _after_rejection(cfg, e)
            print("interrupted (SIGINT) before training started", file=sys.stderr)
        raise SystemExit(130) from None
    except (ConfigError, RunFailed) as e:
        if isinstance(e, ConfigError):
            _after_rejection(cfg, e)
        if _in_multirun():
            if isinstance(e, ConfigError):  # A failed run's reason is in its run.log already.
                log.error("config error: %s", e)
            # Hydra records the job as failed (the other jobs still run) and prints the
            # traceback: cut to this frame, as the message already says what to fix.
            raise e.with_traceback(None)  # noqa: B904 - the same exception, re-raised.
        # A single run: one line on stderr instead of a traceback, and a non-zero exit.
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, ConfigError) else 1) from None
    except Exception as e:
        if _in_multirun() or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # Anything else (a data file that cannot be read, a download that failed, an error in
        # user code given by _target_): still one line, with the way to the full traceback.
        print(
            f"error: {type(e).__name__}: {e} (set HYDRA_FULL_ERROR=1 for the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


if __name__ == "__main__":
    # Bad overrides fail here in one line, before Hydra creates the run (or sweep) dir.
    precheck_overrides(str(CONFIG_DIR), "config", sys.argv[1:])
    sys.argv[1:] = resolve_resume_latest(str(CONFIG_DIR), "config", sys.argv[1:])
    try:
        main()
    except KeyboardInterrupt:  # Outside a run: Hydra starting, or between a sweep's jobs.
        print("interrupted (SIGINT)", file=sys.stderr)
        raise SystemExit(130) from None
