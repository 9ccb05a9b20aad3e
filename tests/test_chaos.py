"""The chaos suite's CI version: kills, a pause past the lease, a Redis kill, a full and a
read-only snapshot store, a destroyed consumer group, a deleted meta record and a FLUSHALL,
with the workers on a minimal ACL user; all counts 0, every worker still alive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.chaos_compare import COUNTS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chaos_quick_loses_repeats_and_changes_nothing(tmp_path):
    figures = tmp_path / "chaos.json"
    done = subprocess.run(
        [sys.executable, "scripts/chaos.py", "--quick", "--json", str(figures)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert figures.exists(), done.stdout + done.stderr
    result = json.loads(figures.read_text())
    for count in COUNTS:
        assert result[count] == 0, (count, done.stdout)
    assert result["kills"] >= 2 and "killed and restarted Redis" in done.stdout
    assert "paused" in done.stdout
    # Every operational fault was applied (the snapshot-store ones need root and a tmpfs).
    expected = {"kill", "pause", "redis", "group", "meta", "flushall"}
    if result["store_faults_skipped"] is None:
        expected |= {"full", "readonly"}
        assert "filled the snapshot store" in done.stdout
        assert "snapshot store read-only" in done.stdout
    assert expected <= set(result["faults"]), (result["faults"], done.stdout)
    assert "destroyed consumer group" in done.stdout and "FLUSHALL" in done.stdout
    assert result["group_back_s"] is not None and result["meta_back_s"] is not None
    assert result["redis_loss_reported"] is True, done.stdout
    assert result["workers_alive"] == result["workers_started"] - result["workers_killed"]
    assert done.returncode == 0, done.stdout
