"""One owned partition: its memories, its stream position, and turning entries into outputs.

``prepare`` and ``finish`` know nothing of Redis: between them the engine applies a batch of
entries to the memories, in stream order, and ``finish`` returns what must be published and
acknowledged. The worker commits that in one fenced script.

``position`` is the id of the last entry applied; ``committed`` the last one Redis recorded
as committed (the partition's offset key). Snapshots carry the position of committed state,
and a new owner resumes strictly *after* it, so an entry is applied exactly once.

Memories are resident (in RAM, least recently used first) or only in the snapshot store:
``prepare`` fetches the ones a batch needs, and ``evict`` drops least recently used ones
beyond ``budget_bytes`` once their state is in a published snapshot (never one written or
deleted since), so answers are the same as if nothing were ever evicted. A delete drops
the memory: its next event starts from memory_init, and the next snapshot leaves it out.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memnet import Answer, Engine, InvalidInput, Memory, Rejected
from memnet.snapshot import SnapshotStore
from worker import metrics, protocol
from worker.faults import Backoff
from worker.protocol import BadMessage, parse_id

log = logging.getLogger(__name__)

MIN_READ = 16  # entries read per partition and step, however small the budget
READ_SHARE = 0.25  # of a partition's budget, kept for the new memories of its next batches


@dataclass
class Batch:
    last_id: str
    responses: list[tuple[str, bytes]] = field(default_factory=list)  # (entry id, msg)
    dead: list[tuple[str, bytes]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    refused_writes: int = 0  # well-formed writes this model cannot take (its input or encoding)


@dataclass
class Pending:
    """A batch between decoding and the engine: its items, and what each came from."""

    batch: Batch
    entries: int
    items: list[tuple[Memory, Any]] = field(default_factory=list)
    applied: list[tuple[str, protocol.Message, bytes | None]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)  # memories written


class Partition:
    def __init__(
        self,
        number: int,
        epoch: int,
        engine: Engine,
        store: SnapshotStore,
        partitions: int,
        max_message_bytes: int,
        budget_bytes: int | None = None,
    ) -> None:
        self.number = number
        self.epoch = epoch
        self.engine = engine
        self.store = store
        self.partitions = partitions
        self.max_message_bytes = max_message_bytes
        self.memories: OrderedDict[str, Memory] = OrderedDict()  # resident, LRU first
        self.sizes: dict[str, int] = {}  # estimated bytes of each resident memory
        self.resident_bytes = 0
        self.budget_bytes = budget_bytes  # None: keep every memory resident
        self._fresh_bytes: int | None = None  # a new memory's size (read_count)
        self.dirty: set[str] = set()  # written since the last snapshot
        self.deleted: set[str] = set()  # deleted since the last snapshot
        self.archived: str | None = None  # the newest input entry in the archive, once known
        self.position: str | None = None  # last applied entry id
        self.committed: str | None = None  # what the offset key holds (last commit)
        self.seen: str | None = None  # last entry id delivered to us (XREAD waits after it)
        self.replay_until: str | None = None  # replay (position, replay_until] before ">"
        self.uncommitted = False  # memories are ahead of what Redis acknowledged
        self.held: Batch | None = None  # a batch whose commit met its cluster node out of reach
        self.tidy = False  # other consumers of the group removed after replay
        self.since_snapshot = 0
        self.snapshot_at = self.taken_at = time.monotonic()
        # Snapshots still owed to a delete: its own and MEMNET_SNAPSHOTS_KEPT - 1 more make
        # the deleted memory's blobs (and, with the trim after them, its input entries) go,
        # taken on time even if no input comes (erasure must not wait for traffic).
        self.erasing = 0
        self.pruned_at = time.monotonic()  # (the archive's retention, Ownership.prune)
        self.snapshot_retry = Backoff(base_s=1.0, cap_s=60.0)  # after a failed snapshot

    # ---- state ---------------------------------------------------------------------------
    def restore(self) -> list[str]:
        """Load the newest good snapshot's view (SnapshotError if snapshots exist, none
        usable); memories are fetched from the store as events need them."""
        self.store.clean_temporary()
        loaded = self.store.load()
        if loaded is None:
            return []
        self.position = self.seen = loaded.position
        return loaded.refused

    def snapshot_due(self, every_entries: int, every_s: float) -> bool:
        if self.uncommitted or not self.snapshot_retry.ready:
            return False
        if not self.since_snapshot:  # (nothing new: only a delete's erasure is owed)
            return self.erasing > 0 and time.monotonic() - self.snapshot_at >= every_s
        return (
            self.since_snapshot >= every_entries
            or time.monotonic() - self.snapshot_at >= every_s
            or self.over_budget(room=READ_SHARE)  # (so the next batches fit in the budget)
        )

    def read_count(self, batch_size: int) -> int:
        """How many entries to read next: batch_size, or fewer where a batch of new
        memories could take more than READ_SHARE of this partition's budget. A batch's
        memories are written, so they stay resident until the snapshot after it; a
        snapshot evicts down to the budget less that share, so the next batches fit in it.
        (Without this, RAM would reach the budget plus every partition's whole batch.)"""
        if self.budget_bytes is None:
            return batch_size
        if self._fresh_bytes is None:
            self._fresh_bytes = self.engine.memory_bytes(self.engine.new_memory())
        each = max(self._fresh_bytes, self.resident_bytes // max(1, len(self.memories)))
        return max(MIN_READ, min(batch_size, int(self.budget_bytes * READ_SHARE) // each))

    def over_budget(self, room: float = 0.0) -> bool:
        """Whether the resident memories take more than the budget less a room share."""
        if self.budget_bytes is None:
            return False
        return self.resident_bytes > int(self.budget_bytes * (1 - room))

    def snapshot(self, abort: Callable[[], bool] | None = None) -> None:
        """Save what changed since the last snapshot at the position (SnapshotError if it
        cannot be written), then evict what the budget does not hold."""
        changed = {name: self.memories[name] for name in self.dirty}
        self.store.save(changed, self.position, self.epoch, abort=abort, deleted=self.deleted)
        self.erasing = self.store.keep - 1 if self.deleted else max(0, self.erasing - 1)
        self.dirty.clear()
        self.deleted.clear()
        self.since_snapshot = 0
        self.snapshot_at = time.monotonic()
        self.snapshot_retry.reset()
        self.evict(room=READ_SHARE)  # (the next batches' new memories stay until a snapshot)

    def trim_point(self) -> str | None:
        """The oldest kept snapshot's position: entries below it are no longer needed."""
        positions = self.store.positions()
        if not positions or any(p is None for p in positions):
            return None
        return min(positions, key=parse_id)  # type: ignore[arg-type]

    def memory(self, name: str) -> Memory:
        memory = self.memories.get(name)
        if memory is not None:
            self.memories.move_to_end(name)
            return memory
        if name in self.store.view and name not in self.deleted:
            memory = self.store.fetch([name])[name]
            metrics.LOADS.inc()
        else:
            memory = self.engine.new_memory()
        self._admit(name, memory)
        return memory

    def fetch(self, names: set[str]) -> None:
        """Make these memories resident: those in the store fetched in one go, the others
        new (one look at the view each, so ``memory`` finds every one resident)."""
        todo = []
        view = self.store.view
        stored = len(view) > 0  # (an empty view holds none: no lookup per new memory)
        for n in names:
            if n in self.memories:
                continue
            if stored and n not in self.deleted and n in view:
                todo.append(n)
            else:
                self._admit(n, self.engine.new_memory())
        if todo:
            for name, memory in self.store.fetch(todo).items():
                self._admit(name, memory)
            metrics.LOADS.inc(len(todo))
        # Room for them now, not after the batch: what the budget does not hold and a
        # snapshot does must go before the next partition's batch takes more rows.
        self.evict(keep=names)

    def _admit(self, name: str, memory: Memory) -> None:
        self.memories[name] = memory
        size = self.engine.memory_bytes(memory)
        self.resident_bytes += size - self.sizes.get(name, 0)
        self.sizes[name] = size

    def _drop(self, name: str) -> None:
        if self.memories.pop(name, None) is not None:
            self.resident_bytes -= self.sizes.pop(name)

    def delete(self, name: str) -> None:
        self._drop(name)
        self.dirty.discard(name)
        self.deleted.add(name)

    def evict(self, keep: set[str] | frozenset[str] = frozenset(), room: float = 0.0) -> int:
        """Drop least recently used memories whose state is in the newest snapshot (and
        not in keep: a batch's own) until the resident ones fit the budget, less a room
        share of it; how many were dropped."""
        if not self.over_budget(room):
            return 0
        excess = self.resident_bytes - int(self.budget_bytes * (1 - room))  # type: ignore[operator]
        victims = []
        for name in self.memories:  # least recently used first
            if excess <= 0:
                break
            if name not in self.dirty and name not in keep:
                victims.append(name)
                excess -= self.sizes[name]
        for name in victims:
            self._drop(name)
        metrics.EVICTIONS.inc(len(victims))
        return len(victims)

    def resize(self, touched: set[str]) -> None:
        """Update the size estimates of memories a batch changed."""
        for name in touched:
            memory = self.memories.get(name)
            if memory is not None:
                self._admit(name, memory)

    # ---- processing ----------------------------------------------------------------------
    def prepare(self, entries: list[tuple[str, dict[bytes, Any]]], queries: bool = True) -> Pending:
        """Decode and check entries, fetch the memories they need from the store, apply
        deletes; the valid writes and queries become engine items (nothing applied).
        queries=False (a rebuild, which keeps no responses): queries are left out, since
        they change no memory."""
        pending = Pending(Batch(last_id=entries[-1][0]), len(entries))
        batch = pending.batch
        batch.acks = [entry_id for entry_id, _ in entries]
        decoded = []
        after = parse_id(self.position) if self.position else None
        for entry_id, fields in entries:
            if after is not None:
                if parse_id(entry_id) <= after:
                    batch.counts["skipped"] += 1  # applied before (redelivered): never twice
                    continue
                after = None  # entries come in id order: every later one is new too
            raw, message = fields.get(b"msg"), None
            try:
                message = protocol.decode(
                    raw, self.number, self.partitions, self.max_message_bytes, queries
                )
                if message is None:  # a query, left out
                    continue
                event = None if message.op == "delete" else self._event(message)
            except BadMessage as e:
                if message is not None and message.op == "write":  # (decoded: the model's)
                    batch.refused_writes += 1
                self._reject(batch, entry_id, e.reason, raw, e.query_id, e.memory)
                continue
            decoded.append((entry_id, message, raw, event))
        first: dict[str, bool] = {}  # memory -> its first event here is not a delete
        for _, message, _, event in decoded:
            first.setdefault(message.memory, event is not None)
        self.fetch({name for name, needed in first.items() if needed})
        self._items(pending, decoded)
        return pending

    def _items(self, pending: Pending, decoded: list[tuple[str, Any, Any, Any]]) -> None:
        """The engine items of decoded entries, in order; deletes applied as they come."""
        memories, items, applied = self.memories, pending.items, pending.applied
        for entry_id, message, raw, event in decoded:
            name = message.memory
            if event is None:
                self._forget(pending.batch, entry_id, message)
                continue
            if message.op == "write":
                self.dirty.add(name)
                pending.touched.add(name)
            memory = memories.get(name)
            if memory is None:  # (deleted earlier in this batch)
                memory = self.memory(name)
            else:
                memories.move_to_end(name)  # what self.memory(name) does for a resident one
            items.append((memory, event))
            applied.append((entry_id, message, raw))

    def _forget(self, batch: Batch, entry_id: str, message: protocol.Message) -> None:
        self.delete(message.memory)
        batch.counts["delete"] += 1
        if message.query_id is not None:
            reply = protocol.deleted_message(message.query_id, message.memory)
            batch.responses.append((entry_id, reply))

    def finish(self, pending: Pending, results: list[Answer | Rejected | None]) -> Batch:
        """Turn the engine's results for pending.items into the batch's outputs."""
        batch = pending.batch
        # Outputs made here come in stream order (entries do: XREADGROUP, XRANGE); those of
        # prepare (bad entries, then deletes) need sorting in with them.
        before = len(batch.responses), len(batch.dead)
        for (entry_id, message, raw), result in zip(pending.applied, results, strict=True):
            self._emit(batch, entry_id, message, raw, result)
        for outputs, made_before in zip((batch.responses, batch.dead), before, strict=True):
            if made_before:
                outputs.sort(key=lambda r: parse_id(r[0]))
        # Never back: after Redis lost data the group may deliver entries the restored
        # snapshot covers; prepare skips them, and later ones must still be seen as applied.
        if self.position is None or parse_id(batch.last_id) > parse_id(self.position):
            self.position = batch.last_id
        self.seen = max(self.seen or batch.last_id, batch.last_id, key=parse_id)
        self.since_snapshot += pending.entries
        self.uncommitted = True
        if not self.engine.small_memories:  # (a small memory's size never changes)
            self.resize(pending.touched)
        self.evict()
        return batch

    def _event(self, message: protocol.Message) -> Any:
        try:
            if message.op == "write":
                value = message.text if message.text is not None else message.x
                return self.engine.write(value)
            if message.q is not None:
                return self.engine.query(q=message.q)
            return self.engine.query(x=message.text if message.text is not None else message.x)
        except InvalidInput as e:
            raise BadMessage(str(e), message.query_id, message.memory) from None

    def _emit(
        self,
        batch: Batch,
        entry_id: str,
        message: protocol.Message,
        raw: bytes | None,
        result: Answer | Rejected | None,
    ) -> None:
        if isinstance(result, Rejected):
            batch.refused_writes += message.op == "write"
            self._reject(batch, entry_id, result.reason, raw, message.query_id, message.memory)
            return
        batch.counts[message.op] += 1
        if isinstance(result, Answer):
            assert message.query_id is not None
            batch.responses.append(
                (
                    entry_id,
                    protocol.answer_message(
                        message.query_id,
                        message.memory,
                        result.y,
                        result.slots,
                        result.weights,
                        result.extra,
                    ),
                )
            )

    def _reject(
        self,
        batch: Batch,
        entry_id: str,
        reason: str,
        raw: bytes | None,
        query_id: str | None,
        memory: str | None,
    ) -> None:
        batch.counts["dead"] += 1
        keep_raw = raw if raw is not None and len(raw) <= self.max_message_bytes else None
        batch.dead.append((entry_id, protocol.dead_letter(entry_id, reason, keep_raw)))
        if query_id is not None:
            batch.responses.append((entry_id, protocol.error_message(query_id, memory, reason)))
