"""Command-line helpers for ``run.py``: one-line reports of config composition errors.

Hydra reports a bad override (unknown group option, unknown key) as a multi-line message with
the config search path. For a single run, ``precheck_overrides`` composes the config first
with Hydra's public compose API and turns such an error into one line that still names the
problem and the options. Multiruns (sweep syntax) are left to Hydra.
"""

from __future__ import annotations

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
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
