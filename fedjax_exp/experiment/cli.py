"""Command-line helpers for ``run.py``: Hydra's multi-line composition errors as one line
(:func:`precheck_overrides` composes the config first), and the commands that resume a run."""

from __future__ import annotations

import pathlib
import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn


def one_line(error: BaseException) -> str:
    """The lines of a Hydra/OmegaConf error (and its cause) joined into one line."""
    parts: list[str] = []
    options: list[str] = []
    for exc in filter(None, (error, error.__cause__)):
        for line in str(exc).splitlines():
            if line.startswith("Config search path") or line.startswith("\tprovider="):
                break
            if line.strip().startswith(("full_key:", "object_type=")):
                continue  # OmegaConf's debugging detail; the key is already named.
            if line.startswith("\t"):
                options.append(line.strip())
            elif line.strip() and line.strip() not in parts:
                part = line.strip().rstrip(".")
                parts.append(part[0].lower() + part[1:] if parts else part)
    text = "; ".join(p for p in parts if not p.lower().startswith("available options"))
    if options:
        text += f"; available options: {', '.join(options)}"
    return text


MULTIRUN_FLAGS = ("-m", "--multirun")


def precheck_overrides(config_dir: str, config_name: str, argv: Sequence[str]) -> None:
    """Composes ``config_name`` with the overrides (a multirun: once per option of each swept
    group); on an error prints one line to stderr and exits with status 1."""
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in MULTIRUN_FLAGS for flag in flags):
        return  # --cfg, --help, --info, ...: Hydra's own handling.
    overrides = [a for a in argv if not a.startswith("-")]
    overrides = [a for a in overrides if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    variants = _sweep_variants(config_dir, overrides) if flags else [overrides]
    for variant in variants:
        _compose_or_exit(config_dir, config_name, variant)


def _sweep_variants(config_dir: str, overrides: list[str]) -> list[list[str]]:
    """Override lists trying every option of each swept group (swept keys at their first
    value, which checks their name and type: the values are the sweeper's business)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
    base: list[str] = []
    others: list[tuple[int, str, list[str]]] = []
    for override in parsed:
        if not override.is_sweep_override():
            base.append(override.input_line)
            continue
        key = override.get_key_element()
        try:
            options = list(override.sweep_string_iterator())
        except HydraException:  # A sweep the sweeper samples (e.g. Optuna's): no list to try.
            options = []
        if not (pathlib.Path(config_dir) / override.key_or_group).is_dir():  # A swept key.
            base.append(f"{key}={options[0] if options else 'null'}")
            continue
        if options:
            others.append((len(base), key, options[1:]))
            base.append(f"{key}={options[0]}")
    others_at = [(i, f"{key}={o}") for i, key, options in others for o in options]
    return [base] + [[*base[:i], other, *base[i + 1 :]] for i, other in others_at]


def _compose(config_dir: str, config_name: str, overrides: Sequence[str], **kwargs: Any) -> Any:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides), **kwargs)


def _compose_or_exit(config_dir: str, config_name: str, overrides: list[str]) -> None:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedjax_exp.experiment.validation import omegaconf_error_line, unknown_key_message

    try:
        _compose(config_dir, config_name, overrides)
    except (HydraException, OmegaConfBaseException) as e:
        message = one_line(e)
        unknown = re.match(r"Could not override '([^']+)'", message)
        if not unknown and isinstance(e.__cause__, OmegaConfBaseException) and e.__cause__.full_key:
            message = omegaconf_error_line(e.__cause__)  # A wrong type for a schema.
        if unknown:  # A misspelled key: name the nearest one (Hydra suggests adding it with +).
            key = unknown.group(1)
            rest = [o for o in overrides if not o.startswith(f"{key}=")]
            message = unknown_key_message(key, _known_keys(config_dir, config_name, rest))
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def _known_keys(config_dir: str, config_name: str, overrides: Sequence[str]) -> list[str]:
    """Every key (inner nodes included) of the config composed with ``overrides``."""
    from omegaconf import OmegaConf

    from fedjax_exp.experiment.validation import walk

    try:
        cfg = _compose(config_dir, config_name, overrides)
    except Exception:  # noqa: BLE001 - only a hint: another error will be reported anyway.
        return []
    return sorted(key for key, _ in walk(OmegaConf.to_container(cfg, resolve=False)))


RESUME_LATEST = "trainer.resume=latest"


def resolve_resume_latest(config_dir: str, config_name: str, argv: Sequence[str]) -> list[str]:
    """``argv`` with ``trainer.resume=latest`` replaced by ``hydra.run.dir=`` the newest run
    dir of the same config matching ``hydra.run.dir`` (``${now:...}`` matching any time)."""
    if RESUME_LATEST not in argv:
        return list(argv)
    from omegaconf import OmegaConf, open_dict, read_write

    from fedjax_exp.experiment.errors import ConfigError
    from fedjax_exp.experiment.run_record import latest_run
    from fedjax_exp.experiment.validation import validate_config

    def fail(message: str) -> NoReturn:
        print(f"error: {RESUME_LATEST}: {message}", file=sys.stderr)
        raise SystemExit(1)

    if any(arg in MULTIRUN_FLAGS for arg in argv):
        fail("it resumes one run; a sweep resumes when run again with hydra.sweep.dir=ITS_DIR")
    rest = [arg for arg in argv if arg != RESUME_LATEST]
    cfg = _compose(config_dir, config_name, rest, return_hydra_config=True)
    with read_write(cfg), open_dict(cfg):
        template = OmegaConf.to_container(cfg.hydra.run, resolve=False)["dir"]
        cfg.hydra.run.dir = re.sub(r"\$\{now:[^}]*\}", "*", template)
        pattern = str(cfg.hydra.run.dir)  # Its other interpolations resolved.
        del cfg["hydra"]
    try:
        run_dir = latest_run(pattern, validate_config(cfg))
    except ConfigError as e:
        fail(str(e))
    if run_dir is None:
        fail(f"no run of this config in {pattern}: start one without {RESUME_LATEST}")
    return [arg for arg in rest if not arg.startswith("hydra.run.dir=")] + [
        f"hydra.run.dir={run_dir}"
    ]


def resume_command(argv: Sequence[str], sweep_dir: str | None, checkpointed: bool) -> str:
    """``resume with: COMMAND`` for ``python run.py ARGV`` (a sweep: again in its dir; a run:
    with ``trainer.resume=latest``), or ``start again with: ...`` without a checkpoint."""
    if sweep_dir is not None:
        kept = [arg for arg in argv if not arg.startswith("hydra.sweep.dir=")]
        argv = [*kept, f"hydra.sweep.dir={sweep_dir}"]
    elif checkpointed:
        argv = [arg for arg in argv if not arg.startswith("trainer.resume=")] + [RESUME_LATEST]
    again = "resume" if checkpointed or sweep_dir is not None else "start again"
    return f"{again} with: {shlex.join(['python', 'run.py', *argv])}"
