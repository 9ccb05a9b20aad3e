"""`memnet demo` (the README's run command) on each of its Redis choices."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_demo(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--events", "600"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    answered = re.search(r"answered (\d+)/(\d+) queries, 0 errors", done.stdout)
    assert answered and answered[1] == answered[2], done.stdout
    assert "own the 8 partitions as 4/4" in done.stdout
    return done.stdout


@pytest.mark.slow
def test_demo_starts_a_private_redis_server():
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    assert "a private redis-server" in run_demo(env)


@pytest.mark.slow
def test_demo_falls_back_to_embedded_fakeredis(tmp_path):
    bin_dir = tmp_path / "bin"  # a PATH with python but without redis-server
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["PATH"] = str(bin_dir)
    assert "an embedded fakeredis server" in run_demo(env)


@pytest.mark.slow
def test_demo_uses_redis_url_and_cleans_up(redis_url, redis_server):
    out = run_demo({**os.environ, "REDIS_URL": redis_url})
    assert "Redis: REDIS_URL" in out
    assert redis_server.client().keys("memnet-demo-*") == []


def test_local_workers_never_use_the_callers_snapshot_store(tmp_path, monkeypatch):
    """memnet demo and eval-babi run in a shell that may export a deployment's settings:
    their workers must not snapshot or archive into its store."""
    from worker.local import worker_env
    from worker.settings import Settings

    monkeypatch.setenv("MEMNET_SNAPSHOT_URL", "s3://production/memnet")
    monkeypatch.setenv("PORT", "9100")
    monkeypatch.setenv("MEMNET_WORKER_ID", "prod-1")  # (two demo workers sharing it: a hang)
    monkeypatch.setenv("MEMNET_BATCH_SIZE", "7")
    env = worker_env("redis://127.0.0.1:1/0", tmp_path / "m.safetensors", "demo", tmp_path, 8)
    settings = Settings.from_env(env)
    assert settings.store_url == str(tmp_path / "snapshots-demo")
    assert settings.worker_id != "prod-1" and settings.batch_size == Settings().batch_size
    assert settings.cache_dir == tmp_path / "cache"  # (nothing left where it was run)
