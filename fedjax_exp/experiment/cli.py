"""Command-line helpers for ``run.py``: one-line reports of config composition errors.

Hydra reports a bad override (unknown group option, unknown key) as a multi-line message with
the config search path. ``precheck_overrides`` composes the config first with Hydra's public
compose API (for a multirun, once per option of each swept group) and turns such an error
into one line that still names the problem and the options.
"""

from __future__ import annotations

import pathlib
import re
import sys
from collections.abc import Sequence


def one_line(error: BaseException) -> str:
    """The lines of a Hydra/OmegaConf error (and its cause) joined into one line."""
    parts: list[str] = []
    options: list[str] = []
    for exc in (error, error.__cause__):
        if exc is None:
            continue
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
    """Composes ``config_name`` with the command-line overrides; on a composition error
    prints one line to stderr and exits with status 1.

    A multirun (``-m``) is checked with one composition per option of each swept config
    group (``model=mlp,cnnn``) and with every swept key present (its values are the
    sweeper's business), before Hydra creates the sweep dir.
    """
    flags = [arg for arg in argv if arg.startswith("-")]
    if any(flag not in MULTIRUN_FLAGS for flag in flags):
        return  # --cfg, --help, --info, ...: Hydra's own handling.
    overrides = [a for a in argv if not a.startswith("-")]
    overrides = [a for a in overrides if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    variants = _sweep_variants(config_dir, overrides) if flags else [overrides]
    for variant in variants:
        _compose_or_exit(config_dir, config_name, variant)


def _sweep_variants(config_dir: str, overrides: list[str]) -> list[list[str]]:
    """The override lists that together try every option of each swept config group, with
    other swept keys at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
    # Every swept group at its first option, every swept key at its first value; then each
    # other option of each swept group once.
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
        if not (pathlib.Path(config_dir) / override.key_or_group).is_dir():
            # A swept key: its first value checks its name and type; the values are the
            # sweeper's business (null when it samples them).
            base.append(f"{key}={options[0] if options else 'null'}")
            continue
        if options:
            others.append((len(base), key, options[1:]))
            base.append(f"{key}={options[0]}")
    variants = [base]
    for position, key, options in others:
        for option in options:
            variant = list(base)
            variant[position] = f"{key}={option}"
            variants.append(variant)
    return variants


def _compose_or_exit(config_dir: str, config_name: str, overrides: list[str]) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from fedjax_exp.experiment.validation import omegaconf_error_line, unknown_key_message

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        message = one_line(e)
        unknown = re.match(r"Could not override '([^']+)'", message)
        if not unknown and isinstance(e.__cause__, OmegaConfBaseException) and e.__cause__.full_key:
            # A value of the wrong type for a schema (conf/trainer, conf/logger).
            message = omegaconf_error_line(e.__cause__)
        if unknown:
            # A misspelled key: Hydra's hint (append it with +) would add a key nothing
            # reads; name the nearest existing key instead.
            key = unknown.group(1)
            rest = [o for o in overrides if not o.startswith(f"{key}=")]
            message = unknown_key_message(key, _known_keys(config_dir, config_name, rest))
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def _known_keys(config_dir: str, config_name: str, overrides: Sequence[str]) -> list[str]:
    """Every key of the config composed with ``overrides``, inner nodes included (a typo may
    be in a group name such as trainer.eval_*); none when it does not compose."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except Exception:  # noqa: BLE001 - only a hint: another error will be reported anyway.
        return []
    from fedjax_exp.experiment.run_record import flatten

    leaves = flatten(OmegaConf.to_container(cfg, resolve=False))
    return sorted({".".join(k.split(".")[:i]) for k in leaves for i in range(1, k.count(".") + 2)})
