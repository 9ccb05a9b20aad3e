"""Figures of the chaos suite: the faulty run against uninterrupted reference runs.

One reference run per model the faulty run served (A, then B after ``memnet deploy``), each
over the whole input. A partition that switched models recorded where
(``PREFIX:{p}:switch``: from, to, after): each of its queries must equal the reference of
model ``from`` if its entry id is at most ``after``, else that of model ``to`` (which
computed over the whole history, as if it had served from the start). A partition without
a switch record must equal the first model's throughout. The final memories (slot matrices
and write counts of the final snapshots) are those of the last model, under its snapshot
prefix (``pP/MODEL/``).

When Redis itself lost data (a FLUSHALL), the responses it held just before are passed as
``flushed``: those gone at the end are ``responses_lost_by_redis`` (not missing), every
pre-flush response must still equal the reference, and one that reappears must equal its
pre-flush self.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

from memnet import Engine, load_model
from memnet.snapshot import SnapshotStore
from worker.connection import text
from worker.ownership import model_prefix
from worker.protocol import Keys, parse_id

# The figures that must all be 0.
COUNTS = (
    "updates_lost",
    "updates_applied_twice",
    "responses_missing",
    "responses_duplicated",
    "responses_differ",
    "memories_differ",
    "workers_died",
    "reference_missing",
)


@dataclass(frozen=True)
class Reference:
    """One model's uninterrupted run: its Redis (the responses), its snapshot directory and
    its model file; ``name`` is what the figures call the model ("A", "B")."""

    name: str
    client: redis.Redis
    snapshots: Path
    model: Path

    @functools.cached_property
    def fingerprint(self) -> str:
        return load_model(self.model).fingerprint

    def answers(self, prefix: str, partitions: int) -> dict[str, dict]:
        return {m["id"]: m for _, m in responses(self.client, prefix, partitions)}


def responses(client: redis.Redis, prefix: str, partitions: int) -> list[tuple[str, dict]]:
    keys = Keys(prefix)
    out = []
    for p in range(partitions):
        for entry_id, fields in client.xrange(keys.out(p)):
            out.append((entry_id.decode(), msgpack.unpackb(fields[b"msg"], raw=False)))
    return out


def switches(client: redis.Redis, prefix: str, partitions: int) -> dict[int, dict[str, str]]:
    """Each partition's switch record (from, to, after, epoch), where it has one."""
    keys, out = Keys(prefix), {}
    for p in range(partitions):
        record = client.hgetall(keys.part(p, "switch"))
        if record:
            out[p] = {text(k): text(v) for k, v in record.items()}
    return out


def expected(
    entries: list,
    refs: list[Reference],
    switched: dict[int, dict[str, str]],
    prefix: str,
    partitions: int,
) -> tuple[dict[str, dict], Counter]:
    """Query id -> the reference answer of the model its partition's switch point says; and
    how many queries each model answers. A record naming a model without a reference counts
    as no switch (the first model's answers then differ from what was served)."""
    by_model = {r.fingerprint: r for r in refs}
    answers = {r.name: r.answers(prefix, partitions) for r in refs}
    want, count = {}, Counter({r.name: 0 for r in refs})
    for p, entry_id, _, qid in entries:
        if qid is None:
            continue
        ref, record = refs[0], switched.get(p)
        if record and record["from"] in by_model and record["to"] in by_model:
            before = parse_id(entry_id) <= parse_id(record["after"])
            ref = by_model[record["from"] if before else record["to"]]
        count[ref.name] += 1
        if qid in answers[ref.name]:
            want[qid] = answers[ref.name][qid]
    return want, count


def differs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if ("error" in a) != ("error" in b) or a.get("slots") != b.get("slots"):
        return True
    if "error" in a:
        return a["error"] != b["error"]
    # bitwise, as docs/reliability.md promises: both runs are this code on this CPU, and a
    # tolerance would hide exactly the batch-dependent last-bit drift the promise is about
    return any(
        not np.array_equal(np.asarray(a[k], np.float32), np.asarray(b[k], np.float32))
        for k in ("y", "weights")
    )


def final_memories(snapshots: Path, engine: Engine, partitions: int) -> dict[str, Any]:
    """The newest snapshot's memories of every partition, under the engine's model."""
    memories = {}
    for p in range(partitions):
        loaded = SnapshotStore(
            snapshots, engine, prefix=model_prefix(p, engine.model.fingerprint)
        ).load()
        if loaded is not None:
            memories.update(loaded.memories)
    return memories


def compare_responses(
    got: list[tuple[str, dict]],
    want: dict[str, dict],
    flushed: list[tuple[str, dict]] | None = None,
    covered: Callable[[str], bool] | None = None,
) -> dict[str, int]:
    """Responses at the end (and just before a FLUSHALL, if any) against the reference. A
    response there before the FLUSHALL and gone at the end was lost by Redis only if the
    snapshot its partition was rebuilt from covers its query (``covered``); a query after
    that snapshot was replayed from the re-sent input and must have been answered again."""
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
        elif now is None and (covered is None or covered(q)):
            lost += 1
        elif now is None:
            missing += 1
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


def compare_memories(mine: dict[str, Any], theirs: dict[str, Any], entries: list) -> dict:
    """Per-memory write counts against the input, slot matrices against the reference."""
    writes = Counter(
        msgpack.unpackb(msg, raw=False)["memory"] for _, _, msg, qid in entries if qid is None
    )
    lost = twice = differ = 0
    for name, expected_writes in writes.items():
        applied = mine[name].writes if name in mine else 0
        lost += max(0, expected_writes - applied)
        twice += max(0, applied - expected_writes)
        if name not in mine or name not in theirs:
            differ += 1
            continue
        same = np.array_equal(mine[name].matrix(), theirs[name].matrix())  # bitwise
        differ += int(not same or mine[name].writes != theirs[name].writes)
    return {
        "updates_lost": lost,
        "updates_applied_twice": twice,
        "memories_differ": differ,
        "memories": len(writes),
    }


def compare(
    run: redis.Redis,
    run_snapshots: Path,
    refs: list[Reference],
    entries: list,
    prefix: str,
    partitions: int,
    flushed: list[tuple[str, dict]] | None = None,
    rebuilt_at: dict[int, str | None] | None = None,
) -> dict[str, Any]:
    """The figures; ``refs`` in the order the models served (the last one's final memories
    are compared); ``rebuilt_at``: each partition's snapshot position at its first take
    after the FLUSHALL (None: no snapshot; a partition not in it: every loss counts)."""
    switched = switches(run, prefix, partitions)
    want, count = expected(entries, refs, switched, prefix, partitions)
    at = {qid: (p, entry_id) for p, entry_id, _, qid in entries if qid is not None}

    def covered(qid: str) -> bool:
        p, entry_id = at[qid]
        position = (rebuilt_at or {}).get(p)
        return position is not None and parse_id(entry_id) <= parse_id(position)

    figures: dict[str, Any] = compare_responses(
        responses(run, prefix, partitions), want, flushed, covered
    )
    figures["reference_missing"] = sum(count.values()) - len(want)
    figures.update({f"answered_by_{name}": n for name, n in count.items()})
    last = refs[-1]
    engine = Engine(load_model(last.model))
    mine = final_memories(run_snapshots, engine, partitions)
    theirs = final_memories(last.snapshots, engine, partitions)
    figures.update(compare_memories(mine, theirs, entries))
    figures["partitions_switched"] = sum(
        r["from"] == refs[0].fingerprint and r["to"] == last.fingerprint for r in switched.values()
    )
    return figures
