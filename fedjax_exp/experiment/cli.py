"""Command-line helpers for ``run.py``: one-line reports of config composition errors.

Hydra reports a bad override (unknown group option, unknown key) as a multi-line message with
the config search path. For a single run, ``precheck_overrides`` composes the config first
with Hydra's public compose API and turns such an error into one line that still names the
problem and the options. Multiruns (sweep syntax) are left to Hydra.
"""

from __future__ import annotations

import difflib
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


def precheck_overrides(config_dir: str, config_name: str, argv: Sequence[str]) -> None:
    """Composes ``config_name`` with the command-line overrides of a single run; on a
    composition error prints one line to stderr and exits with status 1."""
    if any(arg.startswith("-") for arg in argv):
        return  # -m/--multirun, --cfg, --help, ...: Hydra's own handling.
    overrides = [a for a in argv if not a.lstrip("+~").startswith(("hydra.", "hydra/"))]
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        message = one_line(e)
        unknown = re.match(r"Could not override '([^']+)'", message)
        if unknown:
            # A misspelled key: Hydra's hint (append it with +) would add a key nothing
            # reads; name the nearest existing key instead.
            key = unknown.group(1)
            rest = [o for o in overrides if not o.startswith(f"{key}=")]
            message = f"unknown config key {key!r}" + _nearest_key_hint(
                config_dir, config_name, rest, key
            )
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1) from None


def _nearest_key_hint(config_dir: str, config_name: str, overrides: Sequence[str], key: str) -> str:
    """``"; did you mean 'KEY'?"`` for the config key closest to ``key`` (else a pointer to
    ``--cfg job``, which prints every key)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    fallback = "; `python run.py --cfg job` prints every key"
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except Exception:  # noqa: BLE001 - only a hint: another error will be reported anyway.
        return fallback
    keys = _dotted_keys(OmegaConf.to_container(cfg, resolve=False))
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent] or keys
    match = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else fallback


def _dotted_keys(tree: object, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix] if prefix else []
    keys = [prefix] if prefix else []
    for name, value in tree.items():
        keys.extend(_dotted_keys(value, f"{prefix}.{name}" if prefix else str(name)))
    return keys
