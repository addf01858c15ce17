#!/usr/bin/env python
"""Compare experiment runs: see ``python scripts/compare_runs.py --help``.

A thin wrapper around ``fedjax_exp.compare`` (also installed as the console command
``fedjax-compare``), so the report works from a checkout without installing the package.
"""

from __future__ import annotations

import pathlib
import sys

# Running from a checkout: make the package importable without `pip install -e .`.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fedjax_exp.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
