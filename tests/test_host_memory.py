"""trainer.reuse_host_memory: which backends it applies to, and bad input.

What it is worth is measured by scripts/bench_speed.py and scripts/bench_dispatch.py
(docs/performance-notes.md), not asserted here.
"""

from __future__ import annotations

import pytest

from fedjax_exp.experiment import host_memory, parallel


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
