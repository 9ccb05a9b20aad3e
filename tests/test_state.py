"""State beyond RAM, against a real redis-server: forgetting (op delete), memories evicted
under MEMNET_RESIDENT_MB answering exactly as resident ones, snapshots and stops whose cost
follows what changed, not how many memories exist."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import REGISTRY

from memnet import Engine, SnapshotError, load_model
from memnet.snapshot import SnapshotStore
from tests.conftest import WORKER_MODEL
from tests.streams import (
    assert_same_answer,
    events,
    library_answers,
    outputs,
    send,
    with_deletes,
    worker_settings,
)
from worker.ownership import model_prefix
from worker.protocol import partition_of
from worker.worker import Worker

PREFIX = "st"
PARTITIONS = 2
DIMS = (WORKER_MODEL.input_dim, WORKER_MODEL.memory_dim)


def run(redis_url, tmp_path, model_file, prefix=PREFIX, **overrides):
    s = worker_settings(redis_url, tmp_path, model_file, prefix, PARTITIONS, **overrides)
    Worker(s, Engine(load_model(model_file))).run(burst=True)


def views(tmp_path, model_file):
    model = load_model(model_file).fingerprint
    return {
        p: SnapshotStore(tmp_path / "snap", None, prefix=model_prefix(p, model))
        for p in range(PARTITIONS)
    }


def test_a_deleted_memory_starts_again_from_memory_init_and_leaves_the_snapshots(
    redis_url, redis_server, tmp_path, model_file
):
    r = redis_server.client()
    rng = np.random.default_rng(31)
    names = [f"user-{i}" for i in range(12)]
    batch = with_deletes(events(600, names, DIMS, rng), rng, every=9)
    ids = send(r, PREFIX, PARTITIONS, batch)
    run(redis_url, tmp_path, model_file)
    expected = library_answers(Engine(load_model(model_file)), batch)
    out = outputs(r, PREFIX, PARTITIONS)
    answers = [m for _, m in out if "deleted" not in m]
    assert len(answers) == len(expected) and not outputs(r, PREFIX, PARTITIONS, "dead")
    for response in answers:
        assert_same_answer(response, expected[response["id"]])
    # a delete with an id is answered at its own entry id; one without is not answered
    deletes = {e["id"]: (e["memory"], i) for e, i in zip(batch, ids, strict=True) if "id" in e
               and e["op"] == "delete"}  # fmt: skip
    got = {m["id"]: (m["memory"], i) for i, m in out if m.get("deleted") is True}
    assert got == deletes and len(got) == sum(e["op"] == "delete" for e in batch) / 2
    # a memory is in the snapshot if it was written after its last delete, and only then
    kept: dict[str, bool] = {}
    for e in batch:
        if e["op"] != "query":
            kept[e["memory"]] = e["op"] == "write"
    assert not all(kept.values())
    for p, store in views(tmp_path, model_file).items():
        body = store.manifests()[0][1]
        assert body["count"] == sum(v for n, v in kept.items() if partition_of(n, PARTITIONS) == p)


def test_memories_evicted_under_the_budget_answer_as_if_always_resident(
    redis_url, redis_server, tmp_path, model_file
):
    """1 MB holds about 450 of these memories: 3,000 of them, snapshotted every 400 entries,
    are evicted and fetched back again and again; every answer equals the library's."""
    r = redis_server.client()
    rng = np.random.default_rng(32)
    names = [f"device-{i}" for i in range(3000)]
    batch = events(9000, names, DIMS, rng)
    loads = REGISTRY.get_sample_value("memnet_memory_loads_total") or 0.0
    evictions = REGISTRY.get_sample_value("memnet_memory_evictions_total") or 0.0
    send(r, PREFIX, PARTITIONS, batch)
    run(redis_url, tmp_path, model_file, resident_mb=1, snapshot_every_entries=400,
        batch_size=200)  # fmt: skip
    expected = library_answers(Engine(load_model(model_file)), batch)
    out = outputs(r, PREFIX, PARTITIONS)
    assert len(out) == len(expected)
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])
    assert REGISTRY.get_sample_value("memnet_memory_evictions_total") - evictions > 1000
    assert REGISTRY.get_sample_value("memnet_memory_loads_total") - loads > 100


def test_a_snapshot_and_a_stop_write_what_changed_whatever_the_number_of_memories(
    redis_url, redis_server, tmp_path, model_file
):
    """The same five memories changed after 200 or after 4,000 memories were written: the
    final snapshot of the stop writes those five, in both cases."""
    r = redis_server.client()
    rng = np.random.default_rng(33)
    written = {}
    for n in (200, 4000):
        prefix_dir = tmp_path / f"n{n}"
        names = [f"m{n}-{i}" for i in range(n)]
        first = [{"op": "write", "memory": m, "x": rng.standard_normal(DIMS[0]).astype("<f4")
                  .tobytes()} for m in names]  # fmt: skip
        s = {"prefix": f"{PREFIX}{n}"}
        send(r, s["prefix"], PARTITIONS, first)
        run(redis_url, prefix_dir, model_file, s["prefix"])
        changed = [{**e, "x": rng.standard_normal(DIMS[0]).astype("<f4").tobytes()}
                   for e in first[:5]]  # fmt: skip
        send(r, s["prefix"], PARTITIONS, changed)
        run(redis_url, prefix_dir, model_file, s["prefix"])
        written[n] = 0
        for p in range(PARTITIONS):
            prefix = model_prefix(p, load_model(model_file).fingerprint)
            store = SnapshotStore(prefix_dir / "snap", None, prefix=prefix)
            newest = store.manifests()[0][1]
            index = json.loads((prefix_dir / "snap" / newest["index"]["key"]).read_text())
            assert newest["parent"] is not None, "an incremental snapshot"
            written[n] += len(index["memories"])
    assert written == {200: 5, 4000: 5}


def test_memnet_memories_lists_every_memory_resident_or_not(
    redis_url, redis_server, tmp_path, model_file, monkeypatch, capsys
):
    from worker.cli import main as cli

    r = redis_server.client()
    rng = np.random.default_rng(34)
    names = [f"user-{i}" for i in range(40)]
    batch = [*events(300, names, DIMS, rng, p_write=1.0), {"op": "delete", "memory": "user-3"}]
    send(r, PREFIX, PARTITIONS, batch)
    run(redis_url, tmp_path, model_file, resident_mb=1)
    writes: dict[str, int] = {}
    for e in batch:
        writes[e["memory"]] = writes.get(e["memory"], 0) + 1 if e["op"] == "write" else 0
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MEMNET_PREFIX", PREFIX)
    monkeypatch.setenv("MEMNET_SNAPSHOT_DIR", str(tmp_path / "snap"))
    monkeypatch.setenv("MEMNET_PARTITIONS", "1")  # (this shell's; the deployment's is read)
    assert cli(["memories", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    listed = {name: n for part in found for name, n in part["memories"].items()}
    assert listed == {name: n for name, n in writes.items() if n}
    assert all(partition_of(m, PARTITIONS) == part["partition"] for part in found
               for m in part["memories"])  # fmt: skip
    p = partition_of("user-3", PARTITIONS)  # deleted: listed nowhere
    assert cli(["memories", "--partition", str(p)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"partition {p}: ") and "  user-3\t" not in text and "  user-" in text
    assert cli(["memories", "--partition", str(PARTITIONS)]) == 2


def test_snapshots_of_the_first_format_are_named_not_silently_ignored(tmp_path, model_file):
    old = tmp_path / "p0" / "snap-000000000002-000000000007"
    old.mkdir(parents=True)
    (old / "MANIFEST.json").write_text("{}")
    store = SnapshotStore(tmp_path, Engine(load_model(model_file)), prefix="p0")
    with pytest.raises(
        SnapshotError,
        match=r"snap-000000000002-000000000007/MANIFEST.json: a "
        r"snapshot of format 1 \(memnet 0.1\), which this version does not read",
    ):
        store.load()  # fmt: skip
    assert SnapshotStore(tmp_path, None, prefix="p1").load() is None
