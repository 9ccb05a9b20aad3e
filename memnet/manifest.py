"""Manifests of snapshots (memnet/snapshot.py): names, entries, checksums, JSON only.

A manifest is ``{"manifest": BODY, "sha256": sha256 of BODY's canonical JSON}``; a blob's
key ends in the sha256 of its bytes, so every read is checked against what names it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from memnet.errors import SnapshotError
from memnet.store import NotFound, Store, StoreError

FORMAT = "memnet-snapshot"
VERSION = 3  # 3: memories packed many to a blob (2: one blob each; still read)
READS = (2, 3)
NAME = re.compile(r"^snap-(\d{12})-(\d{12})\.json$")


@dataclass(frozen=True, order=True)
class SnapshotInfo:
    epoch: int
    serial: int
    key: str = field(compare=False)

    @property
    def name(self) -> str:
        return f"snap-{self.epoch:012d}-{self.serial:012d}"


@dataclass(frozen=True)
class Entry:
    """Where one memory's state is: its blob (or its slice of a pack of many), and its own
    graph base if it has one."""

    key: str  # the blob, or the pack holding the memory
    size: int  # the blob's (the pack's) size
    writes: int
    base: tuple[str, str, int, str, int] | None = None  # (id, arrays key, size, index key, size)
    part: tuple[int, int, str] | None = None  # in a pack: (offset, length, sha256 of the slice)

    def blobs(self) -> set[str]:
        return {self.key} if self.base is None else {self.key, self.base[1], self.base[3]}

    def to_json(self) -> list[Any]:
        head: list[Any] = [self.key, self.size, self.writes]
        if self.base is not None or self.part is not None:
            head.append(None if self.base is None else list(self.base))
        return head if self.part is None else [*head, list(self.part)]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Entry:
        base = tuple(raw[3]) if len(raw) > 3 and raw[3] is not None else None
        part = (int(raw[4][0]), int(raw[4][1]), str(raw[4][2])) if len(raw) > 4 else None
        return cls(str(raw[0]), int(raw[1]), int(raw[2]), base, part)  # type: ignore[arg-type]


def canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sealed(body: dict[str, Any]) -> dict[str, Any]:
    return {"manifest": body, "sha256": digest(canonical(body))}


def verify(data: bytes, key: str, size: int, where: str) -> None:
    if len(data) != size:
        raise SnapshotError(f"{where}: {len(data)} bytes, expected {size} (truncated?)")
    if digest(data) != key.rsplit("/", 1)[-1]:
        raise SnapshotError(f"{where}: checksum mismatch (blob corrupted)")


def read_manifest(store: Store, key: str) -> dict[str, Any]:
    """The verified manifest body at key (SnapshotError naming it)."""
    where = f"{store.url}/{key}"
    try:
        outer = json.loads(store.get(key))
        body = outer["manifest"]
        sealed_with = outer["sha256"]
    except NotFound:
        raise SnapshotError(f"{where}: missing") from None
    except StoreError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{where}: unreadable ({e.__class__.__name__}: {e})") from None
    if digest(canonical(body)) != sealed_with:
        raise SnapshotError(f"{where}: checksum mismatch (manifest corrupted)")
    if body.get("format") != FORMAT or body.get("version") not in READS:
        versions = " or ".join(map(str, READS))
        raise SnapshotError(f"{where}: not a {FORMAT} version {versions} manifest")
    return body
