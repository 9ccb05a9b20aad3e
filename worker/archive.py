"""The input archive: every entry of a partition's input, kept in the snapshot store before
Redis trims it, so that a new model can be run over the whole history (``memnet rebuild``).

A segment is ``archive/pP/<first id>_<last id>_<sha256>.mpz``: zlib-compressed msgpack of
``[[entry id, msg bytes], ...]`` in stream order, exactly the entries Redis held (bad input
included: a rebuild dead-letters it again, silently). Ids in names are zero-padded (13 and
10 digits, wider where an id is), and segments are read in the order of their ids.
Appending is idempotent: a segment written twice (a crash between archiving and trimming)
repeats entries a reader skips by id.

Retention: MEMNET_ARCHIVE_DAYS (0: forever) deletes segments whose last entry is older;
``archive/pP/PRUNED`` then records up to which entry, and a rebuild refuses to start from
a history with a hole at its beginning. Deletes are archived like any entry, so a rebuild
forgets what was forgotten; erasing a memory's archived writes means rewriting the segments
that hold them (docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import re
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import msgpack

from memnet.errors import SnapshotError
from memnet.store import NotFound, Store
from worker.protocol import parse_id

# (ids Redis makes have 13 digits of ms and seq below 10^10; an id a producer gives may be
# wider, up to 20 digits each: its name is longer, and segments() sorts by id, not name)
_SEGMENT = re.compile(r"^(\d{13,20}-\d{10,20})_(\d{13,20}-\d{10,20})_([0-9a-f]{64})\.mpz$")


@dataclass(frozen=True)
class Segment:
    first: str
    last: str
    key: str


def _spans(entries: list[tuple[str, bytes]], segment: Segment) -> bool:
    """Whether entries run from the segment's first id to its last (append writes them in
    stream order: read from Redis, ids increasing)."""
    return bool(entries) and entries[0][0] == segment.first and entries[-1][0] == segment.last


def _padded(entry_id: str) -> str:
    ms, seq = parse_id(entry_id)
    return f"{ms:013d}-{seq:010d}"


def _plain(padded: str) -> str:
    ms, seq = padded.split("-")
    return f"{int(ms)}-{int(seq)}"


class Archive:
    def __init__(self, store: Store, partition: int) -> None:
        self.store = store
        self.prefix = f"archive/p{partition}/"

    def clean_temporary(self) -> None:
        """Remove leftovers of appends a crash interrupted (a new owner, before its first:
        listings do not show them, so nothing else would)."""
        remove = getattr(self.store, "remove_temporary", None)
        if remove is not None:
            remove(self.prefix)

    def segments(self) -> list[Segment]:
        """Every segment, in stream order."""
        found = []
        for item in self.store.list(self.prefix):
            match = _SEGMENT.match(item.key.rsplit("/", 1)[-1])
            if match:
                found.append(Segment(_plain(match[1]), _plain(match[2]), item.key))
        return sorted(found, key=lambda s: (parse_id(s.first), parse_id(s.last)))

    def last(self) -> str | None:
        """The newest archived entry id (None: nothing archived)."""
        found = self.segments()
        return max((s.last for s in found), key=parse_id) if found else None

    def append(self, entries: list[tuple[str, bytes]]) -> None:
        """Archive entries (id, msg bytes), in stream order."""
        if not entries:
            return
        data = zlib.compress(msgpack.packb([[i, raw] for i, raw in entries]), 6)
        name = f"{_padded(entries[0][0])}_{_padded(entries[-1][0])}_"
        self.store.put(self.prefix + name + hashlib.sha256(data).hexdigest() + ".mpz", data)

    def pruned(self) -> str | None:
        """The last entry retention deleted, if any."""
        try:
            return self.store.get(self.prefix + "PRUNED").decode()
        except NotFound:
            return None

    def read(self, after: str | None) -> Iterator[tuple[str, bytes]]:
        """Every archived entry after ``after`` (all if None), in stream order, once."""
        floor = parse_id(after) if after else (-1, -1)
        for segment in self.segments():
            if parse_id(segment.last) <= floor:
                continue
            entries = self._entries(segment)
            if parse_id(segment.first) > floor and _spans(entries, segment):
                yield from entries  # (all after floor, in order: no id parsed per entry)
                floor = parse_id(segment.last)
                continue
            for entry_id, raw in entries:  # (overlapping segments: a re-archive after a
                at = parse_id(entry_id)  # crash between an append and its trim)
                if at > floor:
                    floor = at
                    yield entry_id, raw

    def _entries(self, segment: Segment) -> list[tuple[str, bytes]]:
        data = self.store.get(segment.key)
        if hashlib.sha256(data).hexdigest() != segment.key[-68:-4]:
            raise SnapshotError(f"{self.store.url}/{segment.key}: checksum mismatch (archive)")
        return [(str(i), bytes(raw)) for i, raw in msgpack.unpackb(zlib.decompress(data))]

    def prune(self, days: float) -> int:
        """Delete segments whose last entry is older than ``days``; how many."""
        if days <= 0:
            return 0
        horizon = (time.time() - days * 86400) * 1000
        old = [s for s in self.segments() if parse_id(s.last)[0] < horizon]
        if not old:
            return 0
        newest = max((s.last for s in old), key=parse_id)
        before = self.pruned()  # (only up: a slower prune of an older listing, an old
        if before is not None and parse_id(before) > parse_id(newest):  # owner's, must not
            newest = before  # bring it down below segments another prune deleted)
        self.store.put(self.prefix + "PRUNED", newest.encode())
        self.store.delete(s.key for s in old)
        return len(old)
