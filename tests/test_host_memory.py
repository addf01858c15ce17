"""trainer.reuse_host_memory: freed large blocks are reused instead of mapped afresh.

The effect is counted, not timed: a block served by a fresh mmap page-faults on every page
when first written; a reused heap block does not. Each case runs in a fresh interpreter, since
the setting is process-wide.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from fedjax_exp.experiment import host_memory, parallel

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates and fills a 64 MiB array 8 times; prints the minor page faults of the last 7.
_FAULTS = """
import json, resource, sys
import numpy as np
from fedjax_exp.experiment import parallel
applied = parallel.configure_host_memory({"reuse_host_memory": %r}, "cpu")
def fill():
    a = np.empty(64 << 18, np.float32)  # 64 MiB: above glibc's largest dynamic mmap threshold.
    a.fill(1.0)
    del a
fill()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(7):
    fill()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": applied, "faults": after - before}))
"""


def _faults(setting: object) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS % (setting,)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_reuse_avoids_page_faults_on_every_large_allocation():
    plain = _faults(False)
    reused = _faults(True)
    assert plain["applied"] is False and reused["applied"] is True
    # glibc's defaults map each 64 MiB block afresh, so it faults again on every fill (fewer
    # faults than 4 KiB pages where the kernel backs the mapping with huge pages).
    assert plain["faults"] >= 7 * 32
    # Reused: the heap block is already mapped (a few faults from the interpreter at most).
    assert reused["faults"] * 20 < plain["faults"]


def test_auto_follows_the_backend_and_false_changes_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert parallel.configure_host_memory({"reuse_host_memory": "auto"}, "gpu") is False
    assert parallel.configure_host_memory({"reuse_host_memory": False}, "cpu") is False
    assert calls == []
    assert parallel.configure_host_memory({}, "cpu") is True
    assert parallel.configure_host_memory({"reuse_host_memory": True}, "gpu") is True
    assert calls == [1, 1]


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="threshold_bytes must be positive"):
        host_memory.reuse_freed_memory(0)
