"""The chaos suite's CI version: kills, a pause past the lease, a Redis kill, a full and a
read-only snapshot store, a destroyed consumer group, a deleted meta record, a FLUSHALL and a
model deploy mid-stream, with the workers on a minimal ACL user; all counts 0, every answer
from the model its partition's switch point says, every worker still alive; and, fast, how
the comparison picks that model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fakeredis
import numpy as np
import pytest

from memnet import random_model, save_model
from scripts.chaos_compare import COUNTS, Reference, compare_responses, expected, switches
from tests.conftest import WORKER_MODEL
from worker.protocol import Keys, pack

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
    assert None not in result["recovery_s"], result["recovery_s"]  # every kill taken over
    assert "paused" in done.stdout
    # Every operational fault was applied (the snapshot-store ones need root and a tmpfs).
    applied = {"kill", "pause", "redis", "group", "meta", "flushall", "deploy"}
    if result["store_faults_skipped"] is None:
        applied |= {"full", "readonly"}
        assert "filled the snapshot store" in done.stdout
        assert "snapshot store read-only for" in done.stdout  # (not "could not remount ...")
        assert result["snapshot_failures_full"] > 0 and result["snapshot_failures_readonly"] > 0
    assert applied <= set(result["faults"]), (result["faults"], done.stdout)
    assert "destroyed consumer group" in done.stdout and "FLUSHALL" in done.stdout
    assert result["group_back_s"] is not None and result["meta_back_s"] is not None
    assert result["redis_loss_reported"] is True, done.stdout
    # The deploy: every partition switched from A to B, both answered, kills went on after.
    assert result["partitions_switched"] == 8, done.stdout
    assert result["answered_by_A"] > 0 and result["answered_by_B"] > 0, done.stdout
    assert result["answered_by_A"] + result["answered_by_B"] == result["queries"]
    faults = result["faults"]
    assert "kill" in faults[faults.index("deploy") :], faults  # and the kills went on
    assert result["workers_retired"] == 3 and result["retired_exit_codes"] == ["0"]
    alive = result["workers_started"] - result["workers_killed"] - result["workers_retired"]
    assert result["workers_alive"] == alive
    assert done.returncode == 0, done.stdout


def test_each_answer_is_compared_with_the_model_its_switch_point_names(tmp_path):
    prefix, keys = "t", Keys("t")
    models = {}
    for seed, name in enumerate("AB"):
        models[name] = tmp_path / f"{name}.safetensors"
        save_model(random_model(WORKER_MODEL, seed=seed), models[name])
    refs = [Reference(n, fakeredis.FakeRedis(), tmp_path, m) for n, m in models.items()]
    # Partition 0 switched after entry 5-2; partition 1 has no switch record.
    entries = [(0, "5-1", b"", "q1"), (0, "5-2", b"", "q2"), (0, "5-3", b"", None),
               (0, "6-0", b"", "q3"), (1, "5-4", b"", "q4")]  # fmt: skip
    for ref in refs:
        for p, entry_id, _, qid in entries:
            if qid:
                answer = {"id": qid, "y": [float(ref.name == "B")], "weights": [], "slots": 1}
                ref.client.xadd(keys.out(p), {"msg": pack(answer)}, id=entry_id)
    run = fakeredis.FakeRedis()
    a, b = (r.fingerprint for r in refs)
    run.hset(keys.part(0, "switch"), mapping={"from": a, "to": b, "after": "5-2", "epoch": 3})

    switched = switches(run, prefix, 2)
    assert list(switched) == [0]
    want, count = expected(entries, refs, switched, prefix, 2)
    assert {q: m["y"] for q, m in want.items()} == {"q1": [0], "q2": [0], "q3": [1], "q4": [0]}
    assert count == {"A": 3, "B": 1}
    served = [(i, want[q]) for _, i, _, q in entries if q]
    assert compare_responses(served, want)["responses_differ"] == 0
    wrong = [(i, {**m, "y": [0.0]}) if m["id"] == "q3" else (i, m) for i, m in served]
    assert compare_responses(wrong, want)["responses_differ"] == 1  # q3 was A's: wrong model
    wrong = [(i, {**m, "y": [np.nextafter(np.float32(1), 2)]}) if m["id"] == "q3" else (i, m)
             for i, m in served]  # fmt: skip
    assert compare_responses(wrong, want)["responses_differ"] == 1  # one bit off: differs

    # After a FLUSHALL: a response gone at the end was Redis's loss only if the snapshot its
    # partition was rebuilt from covers the query; after it, the replay must answer again.
    before_flush, after = served, [(i, m) for i, m in served if m["id"] in ("q1", "q4")]
    covered = {"q2": True, "q3": False}.__getitem__
    figures = compare_responses(after, want, before_flush, covered)
    assert (figures["responses_lost_by_redis"], figures["responses_missing"]) == (1, 1)

    # A record naming a model without a reference counts as no switch at all.
    run.hset(keys.part(0, "switch"), "to", "f" * 64)
    want, count = expected(entries, refs, switches(run, prefix, 2), prefix, 2)
    assert count == {"A": 4, "B": 0} and want["q3"]["y"] == [0]


def test_the_suites_workers_never_take_a_deployments_settings(monkeypatch, tmp_path):
    """Run from a shell set up for production, the chaos workers and its operator commands
    must not snapshot into its store (MEMNET_SNAPSHOT_URL wins over the suite's directory),
    use its credentials, Redis or metrics port."""
    from scripts import chaos
    from worker.local import own_env

    for key in ("MEMNET_SNAPSHOT_URL", "MEMNET_ARCHIVE_DAYS", "AWS_ACCESS_KEY_ID", "PORT"):
        monkeypatch.setenv(key, "production")
    monkeypatch.setenv("REDIS_URL", "redis://production:6379/0")
    env = own_env()
    assert not [k for k in env if k.startswith(("MEMNET_", "AWS_")) or k in ("PORT", "REDIS_URL")]
    assert env["PATH"] == os.environ["PATH"]
    started = []
    monkeypatch.setattr(chaos, "WorkerProcess", lambda env, log, inherit: started.append(inherit))
    chaos.Cluster(tmp_path, "redis://127.0.0.1:1/0", Path("m"), 1)
    assert started == [False]
