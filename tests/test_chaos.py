"""The chaos suite's CI version: kills, a pause past the lease, a Redis kill; all counts 0."""

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
    assert done.returncode == 0
