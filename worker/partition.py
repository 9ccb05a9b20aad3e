"""One owned partition: its memories, its stream position, and turning entries into outputs.

``prepare`` and ``finish`` know nothing of Redis: between them the engine applies a batch of
entries to the memories, in stream order, and ``finish`` returns what must be published and
acknowledged. The worker commits that in one fenced script.

``position`` is the id of the last entry applied; ``committed`` the last one Redis recorded
as committed (the partition's offset key). Snapshots carry the position of committed state,
and a new owner resumes strictly *after* it, so an entry is applied exactly once.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memnet import Answer, Engine, InvalidInput, Memory, Rejected
from memnet.snapshot import Snapshots
from worker import protocol
from worker.faults import Backoff
from worker.protocol import BadMessage, parse_id

log = logging.getLogger(__name__)


@dataclass
class Batch:
    last_id: str
    responses: list[tuple[str, bytes]] = field(default_factory=list)  # (entry id, msg)
    dead: list[tuple[str, bytes]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class Pending:
    """A batch between decoding and the engine: its items, and what each came from."""

    batch: Batch
    entries: int
    items: list[tuple[Memory, Any]] = field(default_factory=list)
    applied: list[tuple[str, protocol.Message, bytes | None]] = field(default_factory=list)


class Partition:
    def __init__(
        self,
        number: int,
        epoch: int,
        engine: Engine,
        store: Snapshots,
        partitions: int,
        max_message_bytes: int,
    ) -> None:
        self.number = number
        self.epoch = epoch
        self.engine = engine
        self.store = store
        self.partitions = partitions
        self.max_message_bytes = max_message_bytes
        self.memories: dict[str, Memory] = {}
        self.position: str | None = None  # last applied entry id
        self.committed: str | None = None  # what the offset key holds (last commit)
        self.seen: str | None = None  # last entry id delivered to us (XREAD waits after it)
        self.replay_until: str | None = None  # replay (position, replay_until] before ">"
        self.uncommitted = False  # memories are ahead of what Redis acknowledged
        self.tidy = False  # other consumers of the group removed after replay
        self.since_snapshot = 0
        self.snapshot_at = time.monotonic()
        self.snapshot_retry = Backoff(base_s=1.0, cap_s=60.0)  # after a failed snapshot

    # ---- state ---------------------------------------------------------------------------
    def restore(self) -> list[str]:
        """Load the newest good snapshot (SnapshotError if snapshots exist, none usable)."""
        self.store.clean_temporary()
        loaded = self.store.load()
        if loaded is None:
            return []
        self.memories = loaded.memories
        self.position = self.seen = loaded.position
        return loaded.refused

    def snapshot_due(self, every_entries: int, every_s: float) -> bool:
        if self.uncommitted or not self.since_snapshot or not self.snapshot_retry.ready:
            return False
        return (
            self.since_snapshot >= every_entries or time.monotonic() - self.snapshot_at >= every_s
        )

    def snapshot(self, abort: Callable[[], bool] | None = None) -> None:
        """Save the memories at the position (SnapshotError if it cannot be written)."""
        written = {name: m for name, m in self.memories.items() if m.writes}
        self.store.save(written, self.position, self.epoch, abort=abort)
        self.since_snapshot = 0
        self.snapshot_at = time.monotonic()
        self.snapshot_retry.reset()

    def trim_point(self) -> str | None:
        """The oldest kept snapshot's position: entries below it are no longer needed."""
        positions = self.store.positions()
        if not positions or any(p is None for p in positions):
            return None
        return min(positions, key=parse_id)  # type: ignore[arg-type]

    def memory(self, name: str) -> Memory:
        memory = self.memories.get(name)
        if memory is None:
            memory = self.memories[name] = self.engine.new_memory()
        return memory

    # ---- processing ----------------------------------------------------------------------
    def prepare(self, entries: list[tuple[str, dict[bytes, Any]]]) -> Pending:
        """Decode and check entries; the valid ones become engine items (nothing applied)."""
        pending = Pending(Batch(last_id=entries[-1][0]), len(entries))
        batch, items, applied = pending.batch, pending.items, pending.applied
        after = parse_id(self.position) if self.position else None
        for entry_id, fields in entries:
            batch.acks.append(entry_id)
            if after is not None and parse_id(entry_id) <= after:
                batch.counts["skipped"] += 1  # applied before (redelivered): never twice
                continue
            raw = fields.get(b"msg")
            try:
                message = protocol.decode(raw, self.number, self.partitions, self.max_message_bytes)
                event = self._event(message)
            except BadMessage as e:
                self._reject(batch, entry_id, e.reason, raw, e.query_id, e.memory)
                continue
            items.append((self.memory(message.memory), event))
            applied.append((entry_id, message, raw))
        return pending

    def finish(self, pending: Pending, results: list[Answer | Rejected | None]) -> Batch:
        """Turn the engine's results for pending.items into the batch's outputs."""
        batch = pending.batch
        for (entry_id, message, raw), result in zip(pending.applied, results, strict=True):
            self._emit(batch, entry_id, message, raw, result)
        batch.responses.sort(key=lambda r: parse_id(r[0]))
        batch.dead.sort(key=lambda r: parse_id(r[0]))
        self.position = batch.last_id
        self.seen = max(self.seen or batch.last_id, batch.last_id, key=parse_id)
        self.since_snapshot += pending.entries
        self.uncommitted = True
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
