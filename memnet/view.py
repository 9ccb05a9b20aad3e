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
        self._db.execute("PRAGMA temp.cache_size=-64")  # (merged_json's table; 2 MB else)
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

    def get_many(self, names: Iterable[str]) -> dict[str, Entry]:
        """name -> Entry of those of names the view holds, in one query (a snapshot looks up
        every memory it changes: one query each cost ~20 us)."""
        rows = self._db.execute(
            "SELECT name, entry FROM view WHERE name IN (SELECT value FROM json_each(?))",
            (json.dumps(list(names)),),
        ).fetchall()
        return {name: Entry.from_json(json.loads(raw)) for name, raw in rows}

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

    # ---- whole-view work, done by SQLite --------------------------------------------------
    # A partition's view may hold millions of entries. Loading an index, writing a full one,
    # checking blobs and sweeping go through every entry; as Python objects, all at once,
    # they would cost hundreds of bytes each, and the allocator keeps such a peak (pymalloc
    # returns an arena only once every object in it is gone): RSS would grow with the number
    # of memories, which MEMNET_RESIDENT_MB is meant to bound. So SQLite does these, and
    # Python sees one string, or the few distinct blobs.

    def apply_index(self, data: bytes) -> None:
        """Apply an index blob (JSON: "memories" name -> entry, and "removed" names); a
        ValueError says what is wrong with it."""
        db = self._db
        try:
            text = data.decode()
            if db.execute("SELECT json_type(?)", (text,)).fetchone()[0] != "object":
                raise ValueError("not a JSON object")
            bad = db.execute(
                "SELECT key FROM json_each(?, '$.memories')"
                " WHERE json_type(value) IS NOT 'array' OR json_type(value, '$[0]') IS NOT 'text'"
                " OR json_type(value, '$[1]') IS NOT 'integer'"
                " OR json_type(value, '$[2]') IS NOT 'integer' LIMIT 1",
                (text,),
            ).fetchone()
            if bad is not None:
                raise ValueError(f"the entry of memory {bad[0]!r} is malformed")
            db.execute(
                "DELETE FROM view WHERE name IN (SELECT value FROM json_each(?, '$.removed'))",
                (text,),
            )
            db.execute(
                "INSERT OR REPLACE INTO view SELECT key, json_extract(value, '$[0]'), value"
                " FROM json_each(?, '$.memories')",
                (text,),
            )
        except (UnicodeDecodeError, sqlite3.Error) as e:
            raise ValueError(str(e)) from None
        self._count = db.execute("SELECT COUNT(*) FROM view").fetchone()[0]

    def merged_json(self, changes: dict[str, Entry], gone: Iterable[str]) -> str:
        """{name: entry} of the view with changes applied and gone removed, as canonical
        JSON text (keys sorted, no spaces), without changing the view."""
        db = self._db
        db.execute("CREATE TEMP TABLE IF NOT EXISTS pending (name TEXT PRIMARY KEY, entry TEXT)")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO pending VALUES (?, ?)",
                [(n, json.dumps(e.to_json())) for n, e in changes.items()]
                + [(n, None) for n in gone if n not in changes],
            )
            row = db.execute(
                "SELECT json_group_object(name, json(entry)) FROM ("
                " SELECT name, entry FROM pending WHERE entry IS NOT NULL"
                " UNION ALL SELECT name, entry FROM view"
                "  WHERE NOT EXISTS (SELECT 1 FROM pending WHERE pending.name = view.name)"
                " ORDER BY name)"
            ).fetchone()
        finally:
            db.execute("DELETE FROM pending")
        return str(row[0])

    def blob_sizes(self) -> list[tuple[str, int, str]]:
        """(blob, size, a memory naming it) for each distinct blob a memory's entry names
        (a pack is named by many), its graph bases included."""
        rows = self._db.execute(
            "SELECT blob, json_extract(entry, '$[1]'), MIN(name) FROM view GROUP BY 1, 2"
            " UNION SELECT json_extract(entry, '$[3][1]'), json_extract(entry, '$[3][2]'),"
            "  MIN(name) FROM view WHERE json_type(entry, '$[3]') = 'array' GROUP BY 1, 2"
            " UNION SELECT json_extract(entry, '$[3][3]'), json_extract(entry, '$[3][4]'),"
            "  MIN(name) FROM view WHERE json_type(entry, '$[3]') = 'array' GROUP BY 1, 2"
        ).fetchall()
        return [(str(key), int(size), str(name)) for key, size, name in rows]

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
