"""Partition.prepare / finish without Redis: a batch's outputs (responses, dead letters,
acks) are exactly those of its entries applied one at a time, in stream order, whatever mix
of writes, queries, deletes and bad entries it holds."""

from __future__ import annotations

import numpy as np

from memnet import Engine, load_model
from memnet.snapshot import SnapshotStore
from tests.conftest import WORKER_MODEL
from worker.partition import MIN_READ, Partition
from worker.protocol import pack, parse_id, partition_of

PARTITIONS = 2
D_IN, D_M = WORKER_MODEL.input_dim, WORKER_MODEL.memory_dim


def names(n):
    return [m for m in (f"m{i}" for i in range(200)) if partition_of(m, PARTITIONS) == 0][:n]


def mixed_entries(rng, start, n, memories):
    """(entry id, fields) of every kind the wire brings, ids ascending from start."""
    out = []
    for j in range(n):
        m = memories[int(rng.integers(len(memories)))]
        kind = j % 11
        if kind in (0, 1, 2, 3):
            msg = {"op": "write", "memory": m, "x": rng.standard_normal(D_IN).astype("<f4")}
            msg["x"] = msg["x"].tobytes()
        elif kind in (4, 5):
            msg = {"op": "query", "memory": m, "id": f"q{start + j}"}
            msg["q"] = rng.standard_normal(D_M).astype("<f4").tobytes()
        elif kind == 6:
            msg = {"op": "query", "memory": m, "id": f"q{start + j}", "x": [0.5] * D_IN}
        elif kind == 7:
            msg = {"op": "delete", "memory": m, **({"id": f"d{start + j}"} if j % 2 else {})}
        elif kind == 8:
            msg = {"op": "query", "memory": m, "id": f"bad{start + j}", "q": [1.0] * (D_M + 1)}
        elif kind == 9:
            msg = {"op": "write", "memory": names(1)[0], "x": [float("nan")] * D_IN}
        else:
            msg = {"op": "write", "memory": "elsewhere-1", "x": [0.0] * D_IN}
        fields = {b"msg": pack(msg)} if j % 17 != 3 else {b"other": b"1"}
        out.append((f"{start + j}-{j % 3}", fields))
    return out


def partition(model_file, tmp_path, store_dir="empty"):
    engine = Engine(load_model(model_file))
    store = SnapshotStore(tmp_path / store_dir, engine, prefix="p0")
    part = Partition(0, 1, engine, store, PARTITIONS, 1 << 20)
    part.restore()
    return part


def apply(part, entries):
    pending = part.prepare(entries)
    return part.finish(pending, part.engine.process(pending.items))


def test_a_batch_gives_what_its_entries_give_one_at_a_time(model_file, tmp_path):
    rng = np.random.default_rng(5)
    entries = mixed_entries(rng, 1000, 300, names(6))
    batched = apply(partition(model_file, tmp_path), entries)
    single = partition(model_file, tmp_path)
    one_by_one = [apply(single, [entry]) for entry in entries]
    for field in ("responses", "dead", "acks"):
        assert getattr(batched, field) == [x for b in one_by_one for x in getattr(b, field)]
    ids = [parse_id(i) for i, _ in batched.responses]
    assert ids == sorted(ids) and len(batched.responses) > 50 and len(batched.dead) > 50
    assert batched.last_id == entries[-1][0] == single.position


def test_entries_already_applied_are_acknowledged_not_applied_again(model_file, tmp_path):
    rng = np.random.default_rng(6)
    entries = mixed_entries(rng, 2000, 60, names(3))
    part = partition(model_file, tmp_path)
    first = apply(part, entries[:40])
    again = apply(part, entries[30:])  # 30..39 redelivered
    assert again.counts["skipped"] == 10 and again.acks == [i for i, _ in entries[30:]]
    fresh = partition(model_file, tmp_path)
    whole = apply(fresh, entries)
    assert first.responses + again.responses == whole.responses
    assert first.dead + again.dead == whole.dead


def test_a_batch_wholly_applied_before_never_moves_the_position_back(model_file, tmp_path):
    """After Redis lost data (a restart from an older RDB, a lagging replica) the group
    delivers entries a restored snapshot already covers: skipped, they must not pull the
    applied position back below the snapshot's, or later ones below it apply twice."""
    rng = np.random.default_rng(8)
    entries = mixed_entries(rng, 3000, 90, names(3))
    part = partition(model_file, tmp_path)
    apply(part, entries)  # (the restored state: applied up to the last entry)
    position = part.position
    for chunk in (entries[:30], entries[30:60], entries[60:]):  # delivered again
        again = apply(part, chunk)
        assert again.counts["skipped"] == len(chunk) and again.responses == again.dead == []
        assert part.position == position


def test_memories_in_the_snapshot_store_are_fetched_as_before(model_file, tmp_path):
    rng = np.random.default_rng(7)
    memories = names(5)
    history = mixed_entries(rng, 3000, 80, memories)
    writer = partition(model_file, tmp_path, "snap")
    apply(writer, history)
    writer.uncommitted = False
    writer.snapshot()
    later = mixed_entries(rng, 4000, 120, [*memories, *names(8)[5:]])
    restored = partition(model_file, tmp_path, "snap")
    assert len(restored.store.view) > 0 and not restored.memories
    got = apply(restored, later)
    expected = apply(writer, later)  # the writer kept every memory resident
    assert got.responses == expected.responses and got.dead == expected.dead


def writes(rng, start, memories):
    x = [rng.standard_normal(D_IN).astype("<f4").tobytes() for _ in memories]
    return [
        (f"{start + j}-0", {b"msg": pack({"op": "write", "memory": m, "x": v})})
        for j, (m, v) in enumerate(zip(memories, x, strict=True))
    ]


def test_a_batch_makes_room_for_its_memories_before_it_runs(model_file, tmp_path):
    """Under a budget, clean memories leave as a batch brings new ones in, not after it
    (the batch's new memories stay until the next snapshot, so RAM would otherwise reach
    the budget plus every partition's batch), and never the batch's own; answers stay
    those of a partition that keeps everything."""
    rng = np.random.default_rng(8)
    memories = names(40)
    budgeted, keeper = partition(model_file, tmp_path, "a"), partition(model_file, tmp_path, "b")
    history = writes(rng, 5000, memories[:30])
    for part in (budgeted, keeper):
        apply(part, history)
        part.uncommitted = False
        part.snapshot()
    each = budgeted.resident_bytes // len(budgeted.memories)
    budgeted.budget_bytes = 20 * each
    assert budgeted.evict() == 10 and len(budgeted.memories) == 20
    evicted = [m for m in memories[:30] if m not in budgeted.memories]
    queries = [{"op": "query", "memory": m, "id": m, "x": [0.5] * D_IN} for m in evicted[:3]]
    queries += [{"op": "query", "memory": m, "id": m, "x": [0.5] * D_IN} for m in memories[30:33]]
    batch = writes(rng, 6000, memories[30:])
    batch += [(f"{6100 + j}-0", {b"msg": pack(q)}) for j, q in enumerate(queries)]
    pending = budgeted.prepare(batch)
    wanted = {*memories[30:], *evicted[:3]}
    assert wanted <= set(budgeted.memories) and budgeted.resident_bytes <= budgeted.budget_bytes
    got = budgeted.finish(pending, budgeted.engine.process(pending.items))
    expected = apply(keeper, batch)
    assert got.responses == expected.responses and len(got.responses) == 6


def test_a_small_budget_reads_fewer_entries_at_a_time(model_file, tmp_path):
    part = partition(model_file, tmp_path)
    assert part.read_count(1000) == 1000  # no budget
    each = part.engine.memory_bytes(part.engine.new_memory())
    part.budget_bytes = 4 * 300 * each
    assert part.read_count(1000) == 300  # a quarter of the budget's memories
    part.budget_bytes = 4 * 5000 * each
    assert part.read_count(1000) == 1000
    part.budget_bytes = each
    assert part.read_count(1000) == MIN_READ


def test_a_rebuild_leaves_queries_out_and_ends_with_the_same_memories(model_file, tmp_path):
    """prepare(queries=False), what `memnet rebuild` runs: no answers, and every memory
    (its slots, flags and write count) as if the queries had been answered."""
    rng = np.random.default_rng(8)
    entries = mixed_entries(rng, 3000, 600, names(20))
    served, rebuilt = partition(model_file, tmp_path), partition(model_file, tmp_path)
    answered = apply(served, entries)
    pending = rebuilt.prepare(entries, queries=False)
    batch = rebuilt.finish(pending, rebuilt.engine.process(pending.items))
    assert batch.last_id == entries[-1][0] == rebuilt.position
    left = set(answered.responses) - set(batch.responses)  # answers, errors of bad queries
    assert all(b"weights" in msg or b"error" in msg for _, msg in left)
    assert sum(b"weights" in msg for _, msg in left) > 100
    assert not any(b"weights" in msg for _, msg in batch.responses)
    assert len(pending.items) < len(entries) - 100  # the queries were left out
    assert served.dirty == rebuilt.dirty and served.dirty
    for name in served.dirty:
        a, b = served.memories[name], rebuilt.memories[name]
        np.testing.assert_array_equal(a.matrix(), b.matrix())
        np.testing.assert_array_equal(a.search.changed, b.search.changed)
        assert a.writes == b.writes


def test_a_delete_is_erased_from_the_store_without_waiting_for_more_input(model_file, tmp_path):
    """A deleted memory's blobs go once the delete's snapshot is the oldest kept one:
    MEMNET_SNAPSHOTS_KEPT - 1 more snapshots. On a partition with no more input they are
    now taken on time (snapshot_due), not only when entries come."""
    part = partition(model_file, tmp_path)
    name, other = names(2)
    x = np.ones(D_IN, "<f4").tobytes()
    apply(
        part, [("1-0", {b"msg": pack({"op": "write", "memory": n, "x": x})}) for n in (name, other)]
    )
    part.uncommitted = False
    part.snapshot()
    blobs = tmp_path / "empty" / "p0" / "blobs"

    def holding(n):
        return [b for b in blobs.iterdir() if n.encode() in b.read_bytes()]

    assert holding(name)
    apply(part, [("2-0", {b"msg": pack({"op": "delete", "memory": name})})])
    part.uncommitted = False
    assert part.snapshot_due(10**9, 0.0)
    part.snapshot()
    for _ in range(part.store.keep - 1):
        assert part.snapshot_due(10**9, 0.0)  # (no entries since: owed to the delete)
        part.snapshot()
    assert not part.snapshot_due(10**9, 0.0)  # (erased: nothing more is owed)
    assert not holding(name) and holding(other)
