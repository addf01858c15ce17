"""fedjax_exp's side: the objects ``python run.py`` builds, driven by its training loop.

The model, loss, metrics, optimizer and algorithm come from the project's own Hydra config
(``conf/``, composed in-process with the same overrides a user would type) through
``fedjax_exp.experiment.builders``; the train data is the benchmark's dataset; the steps run
through ``fedjax_exp.experiment.loop.train`` with logging at ``trainer.log_every`` (the loop's
only per-step host sync) and no evaluation or checkpoints inside the timed span. The run's
keys are derived as the runner derives them: ``init, train = split(PRNGKey(seed))``.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from bench.reference import CLIENT_BUFFER_SIZE, EXAMPLE_BUFFER_SIZE, LEARNING_RATE, SEED, TrainRun
from bench.timing import Rate, sync, window_sizes

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
CONF_DIR = REPO_ROOT / "conf"
# Benchmark model name -> config group option in conf/model/.
CONF_MODELS = {"logistic": "logistic", "mlp": "mlp", "stax_cnn": "cnn", "haiku_cnn": "haiku_cnn"}


def compose_overrides(overrides: Sequence[str]) -> Any:
    """The run config ``python run.py OVERRIDES logger=local`` composes (in-process)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import fedjax_exp.experiment  # noqa: F401 - registers the config schemas conf/ refers to.

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[*overrides, "logger=local"])


def compose(model_name: str, batch_size: int, extra: Sequence[str] = (), seed: int = SEED) -> Any:
    """The run config for ``model_name`` with the seed chapter's hyper-parameters."""
    return compose_overrides(
        [
            f"model={CONF_MODELS[model_name]}",
            "loss=cross_entropy",
            "optimizer=adam",
            f"optimizer.learning_rate={LEARNING_RATE}",
            f"trainer.batch_size={batch_size}",
            f"trainer.client_buffer_size={CLIENT_BUFFER_SIZE}",
            f"trainer.example_buffer_size={EXAMPLE_BUFFER_SIZE}",
            f"seed={seed}",
            *extra,
        ]
    )


class _TimingWriter:
    """A MetricWriter that timestamps each write.

    The loop writes training scalars only after reading them back from the device, so at a
    write for step ``k`` every step up to ``k`` has finished: a precise sync point.
    """

    def __init__(self) -> None:
        self.marks: list[tuple[int, float]] = []
        self.last: dict[str, float] = {}

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.marks.append((step, time.perf_counter()))
        self.last.update(scalars)

    def write_histogram(self, step: int, name: str, values: Sequence[float]) -> None:
        pass

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        pass

    def close(self, exit_code: int) -> None:
        pass


def _window_rates(marks: list[tuple[int, float]], windows: int) -> Rate:
    """Groups consecutive sync marks into ``windows`` spans of similar step counts."""
    rate = Rate(unit="steps/s")
    if len(marks) < 2:
        return rate
    spans = len(marks) - 1
    cut = 0
    for size in window_sizes(spans, windows):
        (s0, t0), (s1, t1) = marks[cut], marks[cut + size]
        rate.samples.append((s1 - s0) / (t1 - t0))
        cut += size
    return rate


def build(
    model_name: str,
    batch_size: int,
    train_fd: Any,
    overrides: Sequence[str] = (),
    seed: int = SEED,
) -> tuple[Any, Any, Any]:
    """``(cfg, model, algorithm)`` as the runner builds them, over ``train_fd``.

    ``overrides`` are extra Hydra overrides (e.g. ``trainer.steps_per_dispatch=8``) for
    comparing engine settings; the benchmark itself uses the defaults.
    """
    return build_from_config(compose(model_name, batch_size, overrides, seed), train_fd)


def build_from_config(cfg: Any, train_fd: Any) -> tuple[Any, Any, Any]:
    """``(cfg, model, algorithm)`` of ``cfg`` over ``train_fd`` (instead of its dataset)."""
    from fedjax_exp.experiment import builders

    model = builders.build_model(cfg)
    optimizer = builders.build_optimizer(cfg)
    algorithm = builders.build_algorithm(cfg, model, optimizer, train_fd)
    return cfg, model, algorithm


def _engine_options(cfg: Any, algorithm: Any) -> tuple[Any, dict[str, Any]]:
    """The speed settings run.py uses: the trainer config's ``auto`` options resolved for
    this machine and model (steps per dispatch, data parallelism) by
    ``fedjax_exp.experiment.parallel``, applied to ``algorithm``."""
    from omegaconf import OmegaConf

    from fedjax_exp.experiment import parallel

    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    speed = parallel.speed_up(algorithm, trainer)
    engine = {"steps_per_dispatch": speed.steps_per_dispatch}
    return algorithm, engine


def train(
    model_name: str,
    fd: Any,
    batch_size: int,
    steps: int,
    warmup: int,
    windows: int,
    overrides: Sequence[str] = (),
    seed: int = SEED,
) -> tuple[Any, TrainRun]:
    """Trains the seed chapter's ``model_name`` with fedjax_exp's loop; returns
    ``(model, run)`` (see :func:`timed_loop`)."""
    built = build(model_name, batch_size, fd, overrides, seed)
    return timed_loop(*built, steps, warmup, windows, seed)


def train_config(
    overrides: Sequence[str], fd: Any, steps: int, warmup: int, windows: int, seed: int
) -> tuple[Any, TrainRun]:
    """Trains ``python run.py OVERRIDES`` 's algorithm over ``fd`` with fedjax_exp's loop."""
    cfg, model, algorithm = build_from_config(compose_overrides(overrides), fd)
    return timed_loop(cfg, model, algorithm, steps, warmup, windows, seed)


def timed_loop(
    cfg: Any, model: Any, algorithm: Any, steps: int, warmup: int, windows: int, seed: int
) -> tuple[Any, TrainRun]:
    """Runs ``algorithm`` for ``steps`` loop steps as the runner does; returns
    ``(model, run)``.

    Steps 1..``warmup`` run in a first loop call (compilation included; ``warmup_s`` is its
    wall time); steps ``warmup+1..steps`` run in a second call whose log-time sync marks
    give the timed windows. The warm-up ends on a ``trainer.log_every`` boundary: the loop
    cuts its dispatches at those boundaries, so every block length the timed steps run (e.g.
    8 and 2 for 8 steps per dispatch and logging every 50) has compiled before them.
    """
    import jax

    from fedjax_exp.experiment import loop

    if steps < 2:
        raise ValueError(f"steps must be at least 2 for fedjax_exp's timed loop, got {steps}")
    algorithm, engine = _engine_options(cfg, algorithm)
    log_every = int(cfg.trainer.log_every)
    if log_every > 0:
        warmup = -(-warmup // log_every) * log_every
    warmup = max(1, min(warmup, steps - 1))
    init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
    state = algorithm.init(init_rng)

    def run(state: Any, start: int, stop: int, writer: Any) -> Any:
        settings = loop.LoopSettings(
            steps=stop,
            log_every=log_every,
            eval_every=0,
            checkpoint_every=0,
            progress_bar=False,
            **engine,
        )
        state, _, _ = loop.train(
            algorithm,
            state,
            start_step=start,
            seed=seed,
            rng=train_rng,
            settings=settings,
            writers=[writer],
            evaluator=None,
            checkpointer=None,
            clock=loop.Clock(),
        )
        return sync(state)

    start = time.perf_counter()
    state = run(state, 0, warmup, _TimingWriter())
    warmup_s = time.perf_counter() - start
    writer = _TimingWriter()
    writer.marks.append((warmup, time.perf_counter()))
    state = run(state, warmup, steps, writer)
    writer.marks.append((steps, time.perf_counter()))
    # The loop's final log write and our end mark can coincide: keep strictly later steps.
    marks = [writer.marks[0]]
    for step, t in writer.marks[1:]:
        if step > marks[-1][0]:
            marks.append((step, t))
    rate = _window_rates(marks, windows)
    params = algorithm.eval_params(state)
    return model, TrainRun(params=params, steps=steps, warmup_s=warmup_s, rate=rate)
