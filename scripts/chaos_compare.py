"""Figures of the chaos suite: the faulty run against the uninterrupted reference run.

When Redis itself lost data (a FLUSHALL), the responses it held just before are passed as
``flushed``: those gone at the end are ``responses_lost_by_redis`` (not missing), every
pre-flush response must still equal the reference, and one that reappears must equal its
pre-flush self.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

from memnet import Engine, load_model
from memnet.snapshot import SnapshotStore
from worker.protocol import Keys

TOLERANCE = 1e-5
# The figures that must all be 0.
COUNTS = (
    "updates_lost",
    "updates_applied_twice",
    "responses_missing",
    "responses_duplicated",
    "responses_differ",
    "memories_differ",
    "workers_died",
)


def responses(client: redis.Redis, prefix: str, partitions: int) -> list[tuple[str, dict]]:
    keys = Keys(prefix)
    out = []
    for p in range(partitions):
        for entry_id, fields in client.xrange(keys.out(p)):
            out.append((entry_id.decode(), msgpack.unpackb(fields[b"msg"], raw=False)))
    return out


def differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if ("error" in a) != ("error" in b) or a.get("slots") != b.get("slots"):
        return True
    if "error" in a:
        return a["error"] != b["error"]
    return any(np.abs(np.subtract(a[k], b[k])).max(initial=0) > TOLERANCE for k in ("y", "weights"))


def final_memories(snapshots: Path, engine: Engine, partitions: int) -> dict[str, Any]:
    memories = {}
    for p in range(partitions):
        loaded = SnapshotStore(snapshots, engine, prefix=f"p{p}").load()
        if loaded is not None:
            memories.update(loaded.memories)
    return memories


def compare_responses(
    got: list[tuple[str, dict]],
    want: dict[str, dict],
    flushed: list[tuple[str, dict]] | None = None,
) -> dict[str, int]:
    """Responses at the end (and just before a FLUSHALL, if any) against the reference."""
    before = {m["id"]: m for _, m in flushed or []}
    by_id = {m["id"]: m for _, m in got}
    duplicated = sum(
        n - 1
        for seen in (Counter(m["id"] for _, m in got), Counter(m["id"] for _, m in flushed or []))
        for n in seen.values()
    )
    missing = lost = differ = 0
    for q, m in want.items():
        now, then = by_id.get(q), before.get(q)
        if now is None and then is None:
            missing += 1
        elif now is None:
            lost += 1
        differ += any(
            differs(a, b)
            for a, b in ((now, m), (then, m), (now, then))
            if a is not None and b is not None
        )
    return {
        "responses_missing": missing,
        "responses_duplicated": duplicated,
        "responses_differ": differ,
        "responses_lost_by_redis": lost,
    }


def compare(
    run: redis.Redis,
    ref: redis.Redis,
    run_snapshots: Path,
    ref_snapshots: Path,
    model: Path,
    entries: list,
    prefix: str,
    partitions: int,
    flushed: list[tuple[str, dict]] | None = None,
) -> dict[str, Any]:
    want = {m["id"]: m for _, m in responses(ref, prefix, partitions)}
    figures: dict[str, Any] = compare_responses(responses(run, prefix, partitions), want, flushed)
    engine = Engine(load_model(model))
    mine = final_memories(run_snapshots, engine, partitions)
    theirs = final_memories(ref_snapshots, engine, partitions)
    writes = Counter(
        msgpack.unpackb(msg, raw=False)["memory"] for _, _, msg, qid in entries if qid is None
    )
    lost = twice = differ = 0
    for name, expected in writes.items():
        applied = mine[name].writes if name in mine else 0
        lost += max(0, expected - applied)
        twice += max(0, applied - expected)
        if name not in mine or name not in theirs:
            differ += 1
            continue
        gap = np.abs(mine[name].matrix() - theirs[name].matrix()).max()
        differ += int(gap > TOLERANCE or mine[name].writes != theirs[name].writes)
    figures.update(
        updates_lost=lost, updates_applied_twice=twice, memories_differ=differ, memories=len(writes)
    )
    return figures
