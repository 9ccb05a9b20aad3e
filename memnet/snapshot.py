"""Snapshots: a set of named memories plus an opaque position, written crash-safely.

Layout of a snapshot directory (one per snapshot, newest ``keep`` kept)::

    snap-<epoch>-<serial>/
        MANIFEST.json        format, version, model fingerprint and config, position, epoch,
                             memory names, and the size and sha256 of every other file;
                             the manifest's own sha256 sits beside its body
        state.safetensors    per memory: the slots changed since its base, and their vectors
        base-<id>.safetensors, base-<id>.hnsw
                             a memory's re-indexed graph and the vectors it was built from
                             (hard-linked from the previous snapshot when unchanged)

Writing goes to ``.tmp-*``, every file and the directory are fsynced, then it is renamed into
place. Loading verifies the manifest, every checksum and the model fingerprint before any
byte reaches hnswlib, refuses a truncated, corrupted or foreign snapshot with a message naming
the file, and falls back to the previous good one. Nothing is pickled.

The position is the caller's: the worker stores the last stream entry applied to these
memories, and resumes *after* it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from memnet.engine import Engine
from memnet.errors import SnapshotAborted, SnapshotError, StaleSnapshot
from memnet.graph import GraphBase, fsync_path, sha256_file
from memnet.memory import Memory
from memnet.search import ExactSlots, GraphSlots

log = logging.getLogger(__name__)

FORMAT = "memnet-snapshot"
VERSION = 1
MANIFEST = "MANIFEST.json"
_NAME = re.compile(r"^snap-(\d{12})-(\d{12})$")


@dataclass(frozen=True, order=True)
class SnapshotInfo:
    epoch: int
    serial: int
    path: Path = field(compare=False)

    @property
    def name(self) -> str:
        return self.path.name


class Snapshots(Protocol):
    """What a worker needs from a snapshot store.

    ``SnapshotStore`` keeps snapshots in a directory (local disk or a mount every worker
    reaches); a store on an object service would provide the same calls, keeping the same
    contract: a snapshot appears whole or not at all, and is verified before use.
    """

    def save(
        self,
        memories: Mapping[str, Memory],
        position: str | None,
        epoch: int = 0,
        abort: Callable[[], bool] | None = None,
    ) -> SnapshotInfo: ...

    def load(self) -> Loaded | None: ...

    def positions(self) -> list[str | None]: ...

    def newest_epoch(self) -> int: ...

    def clean_temporary(self) -> None: ...


@dataclass
class Loaded:
    memories: dict[str, Memory]
    position: str | None
    epoch: int
    name: str
    refused: list[str]  # why newer snapshots were skipped


def _canonical(body: Any) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class SnapshotStore:
    """Snapshots of one set of memories (the worker keeps one store per partition)."""

    def __init__(
        self, directory: str | os.PathLike[str], engine: Engine | None, keep: int = 3
    ) -> None:
        """engine may be None for a store that only lists snapshots."""
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.directory = Path(directory)
        self._engine = engine
        self.keep = keep

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise SnapshotError("this snapshot store was opened for listing only")
        return self._engine

    # ---- listing -------------------------------------------------------------------------
    def snapshots(self) -> list[SnapshotInfo]:
        """Snapshots on disk, newest first (by epoch, then serial)."""
        if not self.directory.is_dir():
            return []
        found = []
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir():
                found.append(SnapshotInfo(int(match[1]), int(match[2]), entry))
        return sorted(found, reverse=True)

    def positions(self) -> list[str | None]:
        """Positions of the kept snapshots, newest first (unreadable manifests skipped)."""
        return [body["position"] for _, body in self.manifests()]

    def manifests(self) -> list[tuple[SnapshotInfo, dict[str, Any]]]:
        """(snapshot, manifest body) newest first, for those whose manifest verifies.

        Only the manifest is checked here; ``load`` verifies every file.
        """
        out = []
        for info in self.snapshots():
            try:
                out.append((info, read_manifest(info.path)))
            except SnapshotError:
                continue
        return out

    def newest_epoch(self) -> int:
        """The highest epoch of any snapshot here (0 if none)."""
        found = self.snapshots()
        return found[0].epoch if found else 0

    def clean_temporary(self) -> None:
        """Remove leftovers of interrupted writes (call when taking ownership)."""
        if self.directory.is_dir():
            for entry in self.directory.glob(".tmp-*"):
                shutil.rmtree(entry, ignore_errors=True)

    # ---- saving --------------------------------------------------------------------------
    def save(
        self,
        memories: Mapping[str, Memory],
        position: str | None,
        epoch: int = 0,
        abort: Callable[[], bool] | None = None,
    ) -> SnapshotInfo:
        """Write a snapshot; raises StaleSnapshot if one of a newer epoch exists,
        SnapshotAborted once ``abort()`` says so (checked as memories are gathered), and
        SnapshotError naming the directory if it cannot be written (a full or read-only
        disk): nothing half-written is left behind, the previous snapshots stay."""
        try:
            return self._save(memories, position, epoch, abort)
        except (OSError, SafetensorError) as e:
            raise SnapshotError(f"{self.directory}: cannot write a snapshot ({e})") from e

    def _save(
        self,
        memories: Mapping[str, Memory],
        position: str | None,
        epoch: int,
        abort: Callable[[], bool] | None,
    ) -> SnapshotInfo:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.snapshots()
        if existing and existing[0].epoch > epoch:
            raise StaleSnapshot(
                f"{existing[0].path}: a snapshot of epoch {existing[0].epoch} "
                f"exists; this writer's epoch {epoch} is stale"
            )
        serial = 1 + max((s.serial for s in existing), default=0)
        tmp = self.directory / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            body = self._write_files(tmp, memories, existing, abort)
            body.update(position=position, epoch=epoch, serial=serial, created=time.time())
            manifest = {"manifest": body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            fsync_path(tmp / MANIFEST)
            fsync_path(tmp)
            final = self.directory / f"snap-{epoch:012d}-{serial:012d}"
            newest = self.snapshots()
            if newest and newest[0].epoch > epoch:
                raise StaleSnapshot(f"{newest[0].path}: a snapshot of a newer epoch appeared")
            os.rename(tmp, final)
            fsync_path(self.directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._retire()
        return SnapshotInfo(epoch, serial, final)

    def _write_files(
        self,
        tmp: Path,
        memories: Mapping[str, Memory],
        existing: list[SnapshotInfo],
        abort: Callable[[], bool] | None,
    ) -> dict[str, Any]:
        arrays: dict[str, np.ndarray] = {}
        entries = []
        files: dict[str, dict[str, Any]] = {}
        for n, (name, memory) in enumerate(sorted(memories.items())):
            if abort is not None and n % 1024 == 0 and abort():
                raise SnapshotAborted(f"{self.directory}: snapshot abandoned after {n} memories")
            key = f"m{n}"
            entry = {"name": name, "key": key, "writes": memory.writes}
            search = memory.search
            if isinstance(search, ExactSlots):
                slots = np.flatnonzero(search.changed)
                entry["kind"] = "exact"
                entry["base"] = None
                rows = search.vectors(slots)
            else:
                slots, rows = search.overlay()
                entry["kind"] = "graph"
                entry["base"] = None if search.base.shared else search.base.id
                if entry["base"]:
                    files.update(self._write_base(tmp, search.base, existing))
            arrays[f"{key}.slots"] = np.ascontiguousarray(slots, np.int64)
            arrays[f"{key}.rows"] = np.ascontiguousarray(rows, np.float32)
            entries.append(entry)
        if abort is not None and abort():
            raise SnapshotAborted(f"{self.directory}: snapshot abandoned before writing")
        save_file(arrays, str(tmp / "state.safetensors"))
        files["state.safetensors"] = self._seal(tmp / "state.safetensors")
        model = self.engine.model
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": model.fingerprint,
            "config": model.config.to_json(),
            "memories": entries,
            "files": files,
        }

    def _write_base(
        self, tmp: Path, base: GraphBase, existing: list[SnapshotInfo]
    ) -> dict[str, dict[str, Any]]:
        names = (f"base-{base.id}.safetensors", f"base-{base.id}.hnsw")
        for info in existing:  # unchanged since an earlier snapshot: link, do not rewrite
            try:
                listed = read_manifest(info.path)["files"]
                if all(n in listed for n in names):
                    for n in names:
                        os.link(info.path / n, tmp / n)
                    return {n: listed[n] for n in names}
            except (SnapshotError, OSError):
                for n in names:
                    (tmp / n).unlink(missing_ok=True)
        save_file(
            {"vectors": base.vectors, "filled": base.filled.astype(np.uint8)}, str(tmp / names[0])
        )
        base.index.save_index(str(tmp / names[1]))
        size = (tmp / names[1]).stat().st_size if (tmp / names[1]).exists() else 0
        if size == 0:
            raise SnapshotError(f"{tmp / names[1]}: hnswlib wrote no index (disk full?)")
        return {n: self._seal(tmp / n) for n in names}

    @staticmethod
    def _seal(path: Path) -> dict[str, Any]:
        fsync_path(path)
        return {"size": path.stat().st_size, "sha256": sha256_file(path)}

    def _retire(self) -> None:
        for info in self.snapshots()[self.keep :]:
            shutil.rmtree(info.path, ignore_errors=True)
        fsync_path(self.directory)

    # ---- loading -------------------------------------------------------------------------
    def load(self) -> Loaded | None:
        """The newest snapshot that verifies, or None if there is none.

        Each refused snapshot is logged with its reason and listed in ``Loaded.refused``;
        if snapshots exist but none verifies, SnapshotError lists every reason.
        """
        refused: list[str] = []
        for info in self.snapshots():
            try:
                memories, body = self._load_one(info.path)
            except SnapshotError as e:
                log.warning("refusing snapshot: %s", e)
                refused.append(str(e))
                continue
            return Loaded(memories, body["position"], body["epoch"], info.name, refused)
        if refused:
            raise SnapshotError(
                "no usable snapshot in " + str(self.directory) + ": " + " | ".join(refused)
            )
        return None

    def _load_one(self, path: Path) -> tuple[dict[str, Memory], dict[str, Any]]:
        body = read_manifest(path)
        model = self.engine.model
        if body["model"] != model.fingerprint:
            raise SnapshotError(
                f"{path / MANIFEST}: written for model {body['model'][:12]}, "
                f"but this model is {model.fingerprint[:12]} (another model)"
            )
        for name, meta in body["files"].items():
            self._verify(path / name, meta)
        arrays = self._read(path / "state.safetensors")
        memories = {}
        for entry in body["memories"]:
            try:
                slots = arrays[f"{entry['key']}.slots"]
                rows = arrays[f"{entry['key']}.rows"]
            except KeyError as e:
                raise SnapshotError(f"{path / 'state.safetensors'}: no array {e}") from None
            memory = self._rebuild(path, entry, slots, rows)
            memories[entry["name"]] = memory
        return memories, body

    @staticmethod
    def _verify(path: Path, meta: dict[str, Any]) -> None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise SnapshotError(f"{path}: missing") from None
        if size != meta["size"]:
            raise SnapshotError(f"{path}: {size} bytes, expected {meta['size']} (truncated?)")
        if sha256_file(path) != meta["sha256"]:
            raise SnapshotError(f"{path}: checksum mismatch (file corrupted)")

    @staticmethod
    def _read(path: Path) -> dict[str, np.ndarray]:
        try:
            with safe_open(str(path), framework="numpy") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, OSError, ValueError) as e:
            raise SnapshotError(f"{path}: unreadable ({e})") from None

    def _rebuild(
        self, path: Path, entry: dict[str, Any], slots: np.ndarray, rows: np.ndarray
    ) -> Memory:
        cfg = self.engine.config
        n = len(slots)
        bad = (
            rows.shape != (n, cfg.memory_dim)
            or slots.dtype != np.int64
            or (n and (slots.min() < 0 or slots.max() >= cfg.slots))
        )
        if bad:
            raise SnapshotError(
                f"{path / 'state.safetensors'}: arrays of memory "
                f"{entry['name']!r} do not fit this model"
            )
        if entry["kind"] == "exact":
            if len(np.unique(slots)) != n:
                raise SnapshotError(
                    f"{path / 'state.safetensors'}: memory {entry['name']!r} lists a slot twice"
                )
            memory = self.engine.new_memory()
            if not isinstance(memory.search, ExactSlots):
                raise SnapshotError(f"{path / MANIFEST}: an exact memory, but this model's are not")
            memory.search.set_many(slots, rows)
            memory.writes = entry["writes"]
            return memory
        base = (
            self.engine.init_base()
            if entry["base"] is None
            else self._load_base(path, entry["base"])
        )
        search = GraphSlots(base, cfg.index)
        for slot, row in zip(slots, rows, strict=True):
            search.set(int(slot), row)
        return Memory(search, entry["writes"])

    def _load_base(self, path: Path, base_id: str) -> GraphBase:
        cfg = self.engine.config
        arrays = self._read(path / f"base-{base_id}.safetensors")
        vectors, filled = arrays.get("vectors"), arrays.get("filled")
        if (
            vectors is None
            or filled is None
            or vectors.shape != (cfg.slots, cfg.memory_dim)
            or vectors.dtype != np.float32
            or filled.shape != (cfg.slots,)
        ):
            raise SnapshotError(f"{path / f'base-{base_id}.safetensors'}: does not fit this model")
        return GraphBase.load(
            path / f"base-{base_id}.hnsw",
            np.array(vectors),
            filled.astype(bool),
            cfg.index,
            base_id,
        )


def read_manifest(path: Path) -> dict[str, Any]:
    """The verified manifest body of the snapshot at path (SnapshotError naming the file)."""
    where = path / MANIFEST
    try:
        outer = json.loads(where.read_text())
        body = outer["manifest"]
        digest = outer["sha256"]
    except FileNotFoundError:
        raise SnapshotError(f"{where}: missing") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SnapshotError(f"{where}: unreadable ({e.__class__.__name__}: {e})") from None
    if hashlib.sha256(_canonical(body)).hexdigest() != digest:
        raise SnapshotError(f"{where}: checksum mismatch (manifest corrupted)")
    if body.get("format") != FORMAT or body.get("version") != VERSION:
        raise SnapshotError(f"{where}: not a {FORMAT} version {VERSION} manifest")
    return body
