"""Incremental, content-addressed snapshots of a set of named memories, on any store.

Keys under a partition's prefix (memnet/store.py: a directory or an S3 bucket)::

    manifests/snap-<epoch>-<serial>.json
        format, version, model fingerprint and config, position, epoch, serial, the parent
        snapshot, the index blob, the blobs this snapshot dropped; its own sha256 beside it
    index/<sha256>      JSON: memory name -> [blob key, size, writes, base], either every
                        memory (a full index) or the changes since the parent (a delta)
    blobs/<sha256>      a pack of memories (memnet/codec.py blobs end to end, ~PACK_BYTES;
                        the index names each memory's slice and its sha256), or a graph
                        base's arrays or index

A snapshot writes only the memories changed since the previous one, packed a few MB to a
blob (a small memory is a couple of KB: one write per memory would cost a request or a
fsync each, ~1 ms), then a delta index,
then publishes its manifest last with a create-if-absent (a hard link on disk, If-None-Match
on S3): a snapshot appears whole or not at all, and two writers never publish the same name.
Its cost follows what changed: a full index is written only once the deltas since the last
one add up to a quarter of the memories (or 32 snapshots), so that cost is amortised too.

Loading resolves the newest snapshot's chain of indexes back to a full one, verifying every
manifest's and index's checksum and the model fingerprint, and checks that every blob it
names exists with its size; it falls back to the previous snapshot otherwise. Memories are
then fetched on demand (``fetch``), each blob verified against its hash before decoding, so a
worker need not hold every memory in RAM; a blob that fails is moved to ``corrupt/`` and the
fetch fails, so the next ``load`` falls back to a snapshot that does not need it (the worker
releases the partition and takes it again). Nothing is pickled.

Retention: the newest ``keep`` snapshots are kept (with the manifests and indexes their
chains need). A blob is deleted once no kept snapshot references it: each manifest lists the
blobs it dropped (memories changed or deleted since its parent; a pack once the last memory
it holds has moved on), deleted when that manifest becomes the oldest kept. A snapshot that
deletes a memory copies the other memories of its pack into its own packs, so a deleted
memory's bytes go exactly when they would in a blob of its own. Blobs of snapshots that
were never published (a crash mid-write) are swept at each full index, once older than
``SWEEP_GRACE_S``.

The position is the caller's: the worker stores the last stream entry applied to these
memories, and resumes *after* it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from memnet.codec import decode_base, decode_memory, encode_base, encode_memory, own_base
from memnet.engine import Engine
from memnet.errors import CorruptBlob, SnapshotAborted, SnapshotError, StaleSnapshot
from memnet.graph import GraphBase
from memnet.manifest import (
    FORMAT,
    NAME,
    VERSION,
    Entry,
    SnapshotInfo,
    canonical,
    digest,
    read_manifest,
    sealed,
    verify,
)
from memnet.memory import Memory
from memnet.store import (
    AlreadyExists,
    NotFound,
    Store,
    StoreError,
    create_many,
    get_many,
    get_ranges,
    open_store,
)
from memnet.view import View

log = logging.getLogger(__name__)

MAX_DEPTH = 32  # deltas between full indexes at most
MIN_FULL_CHANGES = 1024  # a full index before this many changes only at MAX_DEPTH
PACK_BYTES = 4 << 20  # memories packed to a blob until it holds this many bytes
LOOKUP_CHUNK = 1000  # changed memories whose previous entries are read from the view at once
SWEEP_GRACE_S = 3600.0  # an unreferenced blob younger than this may be a writer's in flight

# A memory going into a pack: (name, its blob, write count, its own graph base if any).
_Member = tuple[str, bytes, int, tuple[str, str, int, str, int] | None]


@dataclass
class Loaded:
    entries: View  # name -> Entry (the store's current view: valid until its next load)
    position: str | None
    epoch: int
    name: str
    refused: list[str]  # why newer snapshots were skipped
    store: SnapshotStore = field(repr=False)

    @cached_property
    def memories(self) -> dict[str, Memory]:
        """Every memory of the snapshot, fetched now (tools and tests; a worker fetches
        memories as events need them)."""
        return self.store.fetch(list(self.entries))


class SnapshotStore:
    """Snapshots of one set of memories (the worker keeps one per partition) under
    ``prefix`` of ``store``. After ``load`` or ``save`` it knows the newest snapshot's view
    (name -> Entry), so the next ``save`` writes only what changed."""

    def __init__(
        self,
        store: Store | str | os.PathLike[str],
        engine: Engine | None,
        keep: int = 3,
        prefix: str = "",
    ) -> None:
        """store: a Store, or a directory path or URL for open_store; engine may be None
        for a store that only lists snapshots."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.store: Store = store if hasattr(store, "create") else open_store(store)  # type: ignore[arg-type]
        self.prefix = prefix.rstrip("/") + "/" if prefix else ""
        self._engine = engine
        self.keep = keep
        self.view = View()  # on disk: see memnet/view.py
        self.head: tuple[SnapshotInfo, dict[str, Any]] | None = None
        self._resolved = False  # view and head reflect the store's newest snapshot
        self._bodies: dict[str, dict[str, Any]] = {}  # manifest key -> verified body
        self._gc_mark: SnapshotInfo | None = None  # dropped lists processed up to here
        self._mine: list[SnapshotInfo] = []  # published by this writer, not yet retired

    @property
    def where(self) -> str:
        return f"{self.store.url}/{self.prefix}".rstrip("/")

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise SnapshotError("this snapshot store was opened for listing only")
        return self._engine

    # ---- listing -------------------------------------------------------------------------
    def snapshots(self) -> list[SnapshotInfo]:
        """Published snapshots, newest first (by epoch, then serial)."""
        found = []
        for item in self.store.list(self.prefix + "manifests/"):
            match = NAME.match(item.key.rsplit("/", 1)[-1])
            if match:
                found.append(SnapshotInfo(int(match[1]), int(match[2]), item.key))
        return sorted(found, reverse=True)

    def _listed(self) -> list[SnapshotInfo]:
        """snapshots(), with those this writer published and has not retired even where
        the listing does not show them yet (stores whose listings lag behind creates: by
        one or several; a kept snapshot missing from it would not count as kept, and the
        sweep would delete what it needs)."""
        found = self.snapshots()
        listed = set(found)
        missing = [info for info in self._mine if info not in listed]
        if self.head is not None and self.head[0] not in listed and self.head[0] not in missing:
            missing.append(self.head[0])
        return sorted([*found, *missing], reverse=True) if missing else found

    def manifests(self) -> list[tuple[SnapshotInfo, dict[str, Any]]]:
        """(snapshot, manifest body) newest first, for those whose manifest verifies."""
        out = []
        for info in self.snapshots():
            try:
                out.append((info, self._body(info.key)))
            except SnapshotError:
                continue
        return out

    def positions(self) -> list[str | None]:
        """Positions of the kept snapshots, newest first (unreadable manifests skipped)."""
        return [body["position"] for _, body in self.manifests()[: self.keep]]

    def newest_epoch(self) -> int:
        found = self.snapshots()
        return found[0].epoch if found else 0

    def clean_temporary(self) -> None:
        """Remove leftovers of interrupted writes (call when taking ownership)."""
        remove = getattr(self.store, "remove_temporary", None)
        if remove is not None:
            remove(self.prefix)

    def _body(self, key: str) -> dict[str, Any]:
        body = self._bodies.get(key)
        if body is None:
            body = self._bodies[key] = read_manifest(self.store, key)
        return body

    # ---- loading -------------------------------------------------------------------------
    def load(self) -> Loaded | None:
        """The newest snapshot that verifies (its view; memories come from ``fetch``), or
        None if there is none. Each refused snapshot is logged with its reason and listed in
        ``Loaded.refused``; if snapshots exist but none verifies, SnapshotError lists them."""
        refused: list[str] = []
        found = self.snapshots()
        present = {b.key: b.size for b in self.store.list(self.prefix + "blobs/")} if found else {}
        for info in found:
            try:
                view, body = self._resolve(info)
                try:
                    self._check_present(info, view, present)
                except SnapshotError:
                    view.close()
                    raise
            except StoreError as e:
                if isinstance(e, NotFound):
                    log.warning("refusing snapshot: %s", e)
                    refused.append(str(e))
                    continue
                raise  # the store is unreachable: not a reason to fall back
            except SnapshotError as e:
                log.warning("refusing snapshot: %s", e)
                refused.append(str(e))
                continue
            self._replace_view(view)
            self.head, self._resolved = (info, body), True
            return Loaded(view, body["position"], body["epoch"], info.name, refused, self)
        self._replace_view(View())
        self.head, self._resolved = None, True
        if not found:
            refused += self._format_1()
        if refused:
            raise SnapshotError(f"no usable snapshot in {self.where}: " + " | ".join(refused))
        return None

    def _replace_view(self, view: View) -> None:
        if view is not self.view:
            self.view.close()
            self.view = view

    def _format_1(self) -> list[str]:
        """Why snapshots of the first format (snap-*/MANIFEST.json) here are not used."""
        old = [i.key for i in self.store.list(self.prefix) if i.key.endswith("/MANIFEST.json")]
        if not old:
            return []
        return [
            f"{self.store.url}/{old[0]}: a snapshot of format 1 (memnet 0.1), which this "
            "version does not read: replay the input, or start under a new MEMNET_PREFIX"
        ]

    def _resolve(self, info: SnapshotInfo) -> tuple[dict[str, Entry], dict[str, Any]]:
        """The full view of a snapshot: its chain of indexes applied from the full one."""
        body = self._body(info.key)
        if self._engine is not None and body["model"] != self.engine.model.fingerprint:
            raise SnapshotError(
                f"{self.store.url}/{info.key}: written for model {body['model'][:12]}, "
                f"but this model is {self.engine.model.fingerprint[:12]} (another model)"
            )
        chain = [body]
        while chain[-1]["parent"] is not None and len(chain) <= MAX_DEPTH + 1:
            chain.append(self._body(self.prefix + "manifests/" + chain[-1]["parent"] + ".json"))
        if chain[-1]["parent"] is not None:
            raise SnapshotError(f"{self.store.url}/{info.key}: a chain of indexes too long")
        view = View()
        try:
            for link in reversed(chain):
                key, data = self._index(link)
                try:
                    view.apply_index(data)
                except ValueError as e:
                    raise SnapshotError(f"{self.store.url}/{key}: unreadable ({e})") from None
        except BaseException:
            view.close()
            raise
        return view, body

    def _index(self, body: dict[str, Any]) -> tuple[str, bytes]:
        """(key, data) of a manifest's index blob, verified (not parsed: see View)."""
        key, size = body["index"]["key"], body["index"]["size"]
        data = self.store.get(key)
        where = f"{self.store.url}/{key}"
        if len(data) != size:
            raise SnapshotError(f"{where}: {len(data)} bytes, expected {size} (truncated?)")
        if digest(data) != key.rsplit("/", 1)[-1]:
            raise SnapshotError(f"{where}: checksum mismatch (index corrupted)")
        return key, data

    def _check_present(self, info: SnapshotInfo, view: View, present: dict[str, int]) -> None:
        for key, size, name in view.blob_sizes():
            if key not in present:
                raise SnapshotError(
                    f"{self.store.url}/{info.key}: blob {key} of memory {name!r} is missing"
                )
            if present[key] != size:
                raise SnapshotError(
                    f"{self.store.url}/{key}: {present[key]} bytes, expected {size} (truncated?)"
                )

    def fetch(self, names: Iterable[str]) -> dict[str, Memory]:
        """The memories of the current view with these names (each blob verified)."""
        todo = [(name, self.view[name]) for name in names]
        blobs = get_ranges(self.store, [_slice(entry) for _, entry in todo])
        out = {}
        for (name, entry), data in zip(todo, blobs, strict=True):
            where = f"{self.store.url}/{entry.key}"
            if entry.part is None:
                self._verified(data, entry.key, (entry.key, entry.size), where)
            else:
                self._verified(
                    data, entry.key, (entry.part[2], entry.part[1]), f"{where} ({name!r})"
                )
            base = None if entry.base is None else self._base(entry.base)
            out[name] = decode_memory(data, self.engine, base, where)
        return out

    def _quarantine(self, key: str) -> None:
        """Move a corrupted blob (a pack: all of it) to corrupt/ (for inspection): every
        snapshot naming it is then refused by ``load``, which falls back to one that does
        not."""
        name = key.rsplit("/", 1)[-1]
        self.store.put(self.prefix + "corrupt/" + name, self.store.get(key))
        self.store.delete([key])
        log.error("%s/%s: corrupted; moved to corrupt/%s", self.store.url, key, name)

    def _base(self, ref: tuple[str, str, int, str, int]) -> GraphBase:
        """A memory's own graph base, loaded afresh (a memory changes its base in place);
        a damaged blob of it is quarantined like a memory's (fetch)."""
        base_id, akey, asize, ikey, isize = ref
        arrays, index = get_many(self.store, [akey, ikey])
        for data, key, size in ((arrays, akey, asize), (index, ikey, isize)):
            self._verified(data, key, (key, size), f"{self.store.url}/{key}")
        return decode_base(arrays, index, self.engine, base_id, f"{self.store.url}/{akey}")

    def _verified(self, data: bytes, key: str, check: tuple[str, int], where: str) -> None:
        """verify data (its sha256 and size: check); if it fails, the blob at key (a
        whole pack) goes to corrupt/ and CorruptBlob is raised: the partition is taken
        again, from a snapshot that does not need it."""
        try:
            verify(data, check[0], check[1], where)
        except SnapshotError as e:
            self._quarantine(key)  # (StoreError if it cannot: back off)
            raise CorruptBlob(str(e)) from None

    # ---- saving --------------------------------------------------------------------------
    def save(
        self,
        memories: Mapping[str, Memory],
        position: str | None,
        epoch: int = 0,
        abort: Callable[[], bool] | None = None,
        deleted: Iterable[str] = (),
    ) -> SnapshotInfo:
        """Publish a snapshot in which ``memories`` (those changed since the last one; the
        others keep their state) have their current state and ``deleted`` are gone.

        Raises StaleSnapshot if one of a newer epoch exists, SnapshotAborted once
        ``abort()`` says so (checked as memories are encoded), and SnapshotError naming
        the store if it cannot be written: then nothing is published, the previous
        snapshots stay."""
        try:
            return self._save(memories, position, epoch, abort, set(deleted))
        except OSError as e:  # (encoding a graph base uses a temporary file)
            raise SnapshotError(f"{self.where}: cannot write a snapshot ({e})") from e

    def _save(
        self,
        memories: Mapping[str, Memory],
        position: str | None,
        epoch: int,
        abort: Callable[[], bool] | None,
        deleted: set[str],
    ) -> SnapshotInfo:
        existing = self._listed()
        self._check_epoch(existing, epoch)
        if not self._resolved:  # opened to save without loading: continue the newest
            try:
                self.load()
            except StoreError:
                raise
            except SnapshotError:  # none usable: start a new chain
                pass
        parent = self.head
        serial = 1 + max((s.serial for s in existing), default=0)
        info = SnapshotInfo(
            epoch, serial, self.prefix + f"manifests/snap-{epoch:012d}-{serial:012d}.json"
        )
        carried = self._evacuate(deleted, memories)
        changes, blobs = self._encode(memories, f"{epoch}-{serial}", abort, carried)
        written: list[str] = []  # what this writer created (removed if it fails)
        try:
            if abort is not None and abort():
                raise SnapshotAborted(f"{self.where}: snapshot abandoned before writing")
            create_many(self.store, blobs, written)
            removed = sorted(n for n in deleted if n in self.view and n not in changes)
            body, index_blob = self._manifest(info, parent, changes, removed, position)
            create_many(self.store, [index_blob], written)
            self._check_epoch(self.snapshots(), epoch)
            self._publish(info.key, json.dumps(sealed(body), indent=1).encode(), written)
        except BaseException:
            try:
                self.store.delete(written)
            except StoreError as e:
                log.warning(
                    "%s: could not remove the unpublished snapshot's blobs: %s", self.where, e
                )
            raise
        self.view.remove(removed)
        self.view.update(changes)
        self.head = (info, body)
        self._mine.append(info)
        self._bodies[info.key] = body
        try:
            self._retire(full=body["parent"] is None)
        except SnapshotError as e:  # the snapshot stands; what it could not delete waits
            log.warning("%s: retiring old snapshots failed: %s", self.where, e)
        return info

    def _publish(self, key: str, manifest: bytes, written: list[str]) -> None:
        """Create the manifest; if that fails, read it back (_landed)."""
        try:
            self.store.create(key, manifest)
        except StoreError as e:  # (AlreadyExists included)
            landed = self._landed(key, manifest)
            if landed is None:  # it may stand: its blobs stay (if not, the sweep's)
                written.clear()
                raise
            if not landed and isinstance(e, AlreadyExists):
                raise StaleSnapshot(
                    f"{self.store.url}/{key}: published by another writer"
                ) from None
            if not landed:
                raise
            log.info("%s: %s was published; its reply was lost (%s)", self.where, key, e)

    def _landed(self, key: str, manifest: bytes) -> bool | None:
        """After a failed create: whether this very manifest stands at key (a create whose
        reply was lost, or whose retry met the object it had stored); None if the store
        cannot tell now. Its blobs are deleted only on False: a published snapshot whose
        blobs are gone is refused on load, yet counts among the kept ones the input is
        trimmed for."""
        try:
            return self.store.get(key) == manifest
        except NotFound:
            return False
        except StoreError:
            return None

    def _check_epoch(self, existing: list[SnapshotInfo], epoch: int) -> None:
        if existing and existing[0].epoch > epoch:
            raise StaleSnapshot(
                f"{self.store.url}/{existing[0].key}: a snapshot of epoch {existing[0].epoch} "
                f"exists; this writer's epoch {epoch} is stale"
            )

    def _evacuate(self, deleted: set[str], memories: Mapping[str, Memory]) -> list[_Member]:
        """The other memories of the packs that hold deleted ones, copied as they are: they
        go into this snapshot's packs, so the old packs (with the deleted memories' bytes)
        leave with this snapshot, as a blob of one memory would. Each copied slice is
        verified on its own: damage in the deleted memories' bytes (or in memories this
        snapshot writes anew) goes with the pack; damage in a copied one is CorruptBlob."""
        packs = set()
        for name in deleted:
            entry = self.view.get(name)
            if entry is not None and entry.part is not None:
                packs.add(entry.key)
        carried: list[_Member] = []
        for key in sorted(packs):
            data = self.store.get(key)
            for name in self.view.names_in(key):
                if name in deleted or name in memories:
                    continue
                e = self.view[name]
                one = data[e.part[0] : e.part[0] + e.part[1]]  # type: ignore[index]
                where = f"{self.store.url}/{key} ({name!r})"
                self._verified(one, key, (e.part[2], e.part[1]), where)  # type: ignore[index]
                carried.append((name, one, e.writes, e.base))
        return carried

    def _encode(
        self,
        memories: Mapping[str, Memory],
        made: str,
        abort: Callable[[], bool] | None,
        carried: list[_Member],
    ) -> tuple[dict[str, Entry], list[tuple[str, bytes]]]:
        """Every memory's blob, packed PACK_BYTES or so to a blob: one write per pack, not
        per memory (a small memory is a couple of KB, and each write is a request or a
        fsync); each memory's entry names its slice and that slice's checksum."""
        changes: dict[str, Entry] = {}
        blobs: list[tuple[str, bytes]] = []
        pack: list[_Member] = []
        size = 0
        for n, (name, memory) in enumerate(sorted(memories.items())):
            if abort is not None and n % 256 == 0 and abort():
                raise SnapshotAborted(f"{self.where}: snapshot abandoned after {n} memories")
            data = encode_memory(name, memory, made)
            pack.append((name, data, memory.writes, self._base_ref(name, memory, made, blobs)))
            size += len(data)
            if size >= PACK_BYTES:
                self._pack(pack, changes, blobs)
                pack, size = [], 0
        pack += carried
        if pack:
            self._pack(pack, changes, blobs)
        return changes, blobs

    def _pack(
        self, members: list[_Member], changes: dict[str, Entry], blobs: list[tuple[str, bytes]]
    ) -> None:
        data = b"".join(m[1] for m in members)
        key = self.prefix + "blobs/" + digest(data)
        blobs.append((key, data))
        at = 0
        for name, one, writes, base in members:
            changes[name] = Entry(key, len(data), writes, base, (at, len(one), digest(one)))
            at += len(one)

    def _base_ref(
        self, name: str, memory: Memory, made: str, blobs: list[tuple[str, bytes]]
    ) -> tuple[str, str, int, str, int] | None:
        base = own_base(memory)
        if base is None:
            return None
        old = self.view.get(name)
        if old is not None and old.base is not None and old.base[0] == base.id:
            return old.base  # unchanged since the last snapshot: already stored
        arrays, index = encode_base(base, name, made)
        akey, ikey = (self.prefix + "blobs/" + digest(b) for b in (arrays, index))
        blobs += [(akey, arrays), (ikey, index)]
        return (base.id, akey, len(arrays), ikey, len(index))

    def _manifest(
        self,
        info: SnapshotInfo,
        parent: tuple[SnapshotInfo, dict[str, Any]] | None,
        changes: dict[str, Entry],
        removed: list[str],
        position: str | None,
    ) -> tuple[dict[str, Any], tuple[str, bytes]]:
        dropped: set[str] = set()
        leaving: dict[str, int] = {}  # pack -> how many of its memories this snapshot moves
        names, known = [*changes, *removed], 0  # (known: how many the view already holds)
        for at in range(0, len(names), LOOKUP_CHUNK):  # (a chunk's entries at a time in RAM)
            olds = self.view.get_many(names[at : at + LOOKUP_CHUNK])
            known += len(olds)
            for name, old in olds.items():
                dropped |= old.blobs() - (changes[name].blobs() if name in changes else set())
                if old.part is not None:
                    leaving[old.key] = leaving.get(old.key, 0) + 1
        for key, n in leaving.items():  # a pack goes only with the last memory it holds
            if n < self.view.users(key):
                dropped.discard(key)
        count = len(self.view) + len(changes) - known  # (removed ones are all known)
        pbody = parent[1] if parent else None
        since = (pbody["since_full"] if pbody else 0) + len(changes) + len(removed)
        full = (
            pbody is None
            or pbody["depth"] >= MAX_DEPTH
            or since > max(MIN_FULL_CHANGES, count // 4)
        )
        if full:  # (the whole view: written by SQLite, see View)
            memories = self.view.merged_json(changes, removed)
            made = json.dumps(info.name, separators=(",", ":"))
            data = f'{{"made":{made},"memories":{memories}}}'.encode()
        else:
            index = {"memories": {n: e.to_json() for n, e in changes.items()}, "removed": removed}
            index["made"] = info.name  # (two snapshots never share an index blob)
            data = canonical(index)
        key = self.prefix + "index/" + digest(data)
        model = self.engine.model
        body = {
            "format": FORMAT,
            "version": VERSION,
            "model": model.fingerprint,
            "config": model.config.to_json(),
            "position": position,
            "epoch": info.epoch,
            "serial": info.serial,
            "created": time.time(),
            "parent": None if full or parent is None else parent[0].name,
            "after": None if parent is None else parent[0].name,  # (its lineage: _lineage)
            "depth": 0 if full else pbody["depth"] + 1,  # type: ignore[index]
            "since_full": 0 if full else since,
            "count": count,
            "index": {"key": key, "size": len(data)},
            "dropped": sorted(dropped),
        }
        return body, (key, data)

    # ---- retention -----------------------------------------------------------------------
    def _retire(self, full: bool) -> None:
        """Keep the newest ``keep`` snapshots and what their chains need; delete the blobs
        no kept snapshot references; after a full index, sweep unpublished leftovers."""
        found = self._listed()
        kept = found[: self.keep]
        oldest = kept[-1]
        needed = {i.key for i in kept}
        for info in kept:
            body = self._body(info.key)
            while body["parent"] is not None:
                key = self.prefix + "manifests/" + body["parent"] + ".json"
                needed.add(key)
                body = self._body(key)
        garbage: list[str] = []
        lineage = self._lineage(found)
        for info in found:
            if info.key not in lineage:  # (a branch off it: what it dropped, ours may use)
                continue
            if info <= oldest and (self._gc_mark is None or info > self._gc_mark):
                try:
                    garbage += self._body(info.key)["dropped"]
                except SnapshotError:
                    continue
        retired = [i for i in found if i.key not in needed]
        for info in retired:
            with contextlib.suppress(SnapshotError):
                garbage.append(self._body(info.key)["index"]["key"])
        self.store.delete(garbage)
        self.store.delete(i.key for i in retired)
        for info in retired:
            self._bodies.pop(info.key, None)
        gone = set(retired)
        self._mine = [info for info in self._mine if info not in gone]
        self._gc_mark = oldest
        if full:
            self._sweep(kept, needed)

    def _lineage(self, found: list[SnapshotInfo]) -> set[str]:
        """The manifests this writer's newest snapshot descends from (itself included),
        through each one's "after": the snapshot it was made on, full or not. A snapshot off
        that line (published, then refused by a later owner that went on from an older
        one: a quarantined blob, a stale writer, a publication reported failed) dropped
        blobs of memories it changed that this line still references: its "dropped" list
        must not be deleted. Manifests of memnet 0.2 have no "after": their line ends at
        their last full index (what was dropped before it is left to _sweep)."""
        present, line = {i.key for i in found}, set()
        key = self.head[0].key if self.head is not None else None
        while key in present and key not in line:
            line.add(key)
            try:
                body = self._body(key)
            except SnapshotError:
                break
            after = body.get("after", body["parent"])
            key = None if after is None else self.prefix + "manifests/" + after + ".json"
        return line

    def _sweep(self, kept: list[SnapshotInfo], needed: set[str]) -> None:
        referenced = {key for key, _, _ in self.view.blob_sizes()}
        for info in kept:
            if info > kept[-1]:
                referenced.update(self._body(info.key)["dropped"])
        referenced.update(self._body(key)["index"]["key"] for key in needed)
        now = time.time()
        stale = [
            item.key
            for prefix in ("blobs/", "index/")
            for item in self.store.list(self.prefix + prefix)
            if item.key not in referenced and now - item.modified > SWEEP_GRACE_S
        ]
        self.store.delete(stale)


def _slice(entry: Entry) -> tuple[str, int, int]:
    """(key, start, length) of a memory's bytes: its slice of a pack, or its whole blob."""
    if entry.part is None:
        return entry.key, 0, entry.size
    return entry.key, entry.part[0], entry.part[1]
