"""Runs a command and writes its exit code, wall time and peak RSS as JSON to a file.

    python -m bench.launch RESULT.json CMD ARG...

Why a launcher: on Linux a child's ``ru_maxrss`` includes the RSS its parent had when it
forked (exec keeps the old address space's high-water mark). Measured from the benchmark
process, which holds gigabytes of datasets, every child would look that big. This launcher is
small, so the figure it reports is the command's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        raise SystemExit("usage: python -m bench.launch RESULT.json CMD [ARG...]")
    result_path, cmd = argv[0], argv[1:]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: KiB on Linux, bytes on macOS
    with open(result_path, "w") as f:
        json.dump(
            {
                "returncode": os.waitstatus_to_exitcode(status),
                "wall_s": wall,
                "max_rss_bytes": usage.ru_maxrss * scale,
            },
            f,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
