"""A snapshot's view (memory name -> Entry) kept on disk, not in RAM.

A partition may hold millions of memories, most of them only in the snapshot store; their
entries (blob key, size, write count) would cost about 300 bytes each as Python objects, and
grow RAM with the number of memories, which MEMNET_RESIDENT_MB is meant to bound. So the
view lives in SQLite's private temporary database (an empty file name: on disk, deleted when
closed, a page cache of 256 KB; the operating system caches the file): a lookup costs
microseconds, and only on an event for a memory that is not resident.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator

from memnet.manifest import Entry


class View:
    """A mapping of memory name -> Entry (the part of a dict's API snapshots use)."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA cache_size=-256")  # KiB: one view per partition adds up
        self._db.execute(
            "CREATE TABLE view (name TEXT PRIMARY KEY, blob TEXT, entry TEXT) WITHOUT ROWID"
        )
        self._db.execute("CREATE INDEX by_blob ON view (blob)")
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __contains__(self, name: object) -> bool:
        row = self._db.execute("SELECT 1 FROM view WHERE name = ?", (name,)).fetchone()
        return row is not None

    def __getitem__(self, name: str) -> Entry:
        found = self.get(name)
        if found is None:
            raise KeyError(name)
        return found

    def get(self, name: str) -> Entry | None:
        row = self._db.execute("SELECT entry FROM view WHERE name = ?", (name,)).fetchone()
        return None if row is None else Entry.from_json(json.loads(row[0]))

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self.items())

    def items(self) -> Iterator[tuple[str, Entry]]:
        """Every (name, entry), by name (a snapshot of the table: safe to change it after)."""
        rows = self._db.execute("SELECT name, entry FROM view ORDER BY name").fetchall()
        return ((name, Entry.from_json(json.loads(raw))) for name, raw in rows)

    def values(self) -> Iterator[Entry]:
        return (entry for _, entry in self.items())

    def update(self, entries: dict[str, Entry] | Iterable[tuple[str, Entry]]) -> None:
        pairs = entries.items() if isinstance(entries, dict) else entries
        rows = [(name, entry.key, json.dumps(entry.to_json())) for name, entry in pairs]
        if len(rows) < 1000:
            self._count += sum(name not in self for name, _, _ in rows)
            self._db.executemany("INSERT OR REPLACE INTO view VALUES (?, ?, ?)", rows)
            return
        self._db.executemany("INSERT OR REPLACE INTO view VALUES (?, ?, ?)", rows)
        self._count = self._db.execute("SELECT COUNT(*) FROM view").fetchone()[0]

    def users(self, key: str) -> int:
        """How many memories' entries name this blob (a pack holds many)."""
        return int(
            self._db.execute("SELECT COUNT(*) FROM view WHERE blob = ?", (key,)).fetchone()[0]
        )

    def names_in(self, key: str) -> list[str]:
        """The memories whose entries name this blob."""
        rows = self._db.execute("SELECT name FROM view WHERE blob = ?", (key,)).fetchall()
        return [name for (name,) in rows]

    def remove(self, names: Iterable[str]) -> None:
        for name in names:
            cursor = self._db.execute("DELETE FROM view WHERE name = ?", (name,))
            self._count -= cursor.rowcount

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        self.remove([name])

    def close(self) -> None:
        self._db.close()
