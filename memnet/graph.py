"""hnswlib graphs over slot vectors, and the on-disk cache of a model's initial graph.

Building the graph over ``memory_init`` costs minutes at a million slots, and every worker
must search the very same graph for replays to be deterministic. So the graph is built once
per model and machine, saved under a name derived from the model's fingerprint and the
file's sha256, and published atomically; every worker of the machine loads that one file.
It is built on one thread with a fixed seed: hnswlib's multithreaded build inserts in an
order the threads decide, so another machine (a takeover, a deleted cache) would build
another graph, and answer some queries differently.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from memnet.config import IndexConfig
from memnet.distance import squared_norms
from memnet.errors import SnapshotError

log = logging.getLogger(__name__)

HNSW_LOCK_BYTES = 40  # a std::mutex (x86-64 glibc)
HNSW_LABEL_LOCKS = 65_536  # hnswlib's MAX_LABEL_OPERATION_LOCKS: per index, whatever its size


@dataclass(eq=False)
class GraphBase:
    """An hnswlib graph (labels = slot numbers) and the slot vectors it was built from."""

    vectors: np.ndarray  # [S, M] slot vectors as indexed (read-only while shared)
    filled: np.ndarray  # [S] bool: slot is in the graph
    index: hnswlib.Index
    id: str  # names this exact state; a base is never changed while another memory uses it
    shared: bool = False
    users: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet, repr=False)
    max_norm: float = 0.0  # an upper bound of every filled row's norm (valid after norms())
    fresh: bool = False  # the index was read from bytes and has drawn no level since (update)
    _norms: np.ndarray | None = field(default=None, repr=False)

    def norms(self) -> np.ndarray:
        """[S] float32 squared norms of the rows, +inf for empty slots (computed once)."""
        if self._norms is None:
            self._norms, self.max_norm = squared_norms(self.vectors, self.filled)
        return self._norms

    def take_over(self) -> None:
        """Its last user makes it private: it may change from now on."""
        self.shared = False
        if not self.vectors.flags.writeable:  # the model's memory_init: copy, never modify
            self.vectors = self.vectors.copy()

    def update(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        """Re-index slots [n] (sorted) with vectors [n, M]; only on a base nobody shares."""
        assert not self.shared
        adds = not self.filled[slots].all()
        if adds and not self.fresh:
            self._reload()
        self.vectors[slots] = vectors
        self.filled[slots] = True
        if self._norms is not None:
            self._norms[slots] = squared_norms(vectors, None)[0]
            self.max_norm = self._largest_norm()
        self.index.add_items(vectors, slots, num_threads=1)
        self.fresh = self.fresh and not adds
        self.id = uuid.uuid4().hex

    def _reload(self) -> None:
        """Read the index back from its own bytes, as a restore does (codec.decode_base).

        hnswlib draws a random level for each label it adds for the first time (an
        appending G's new slots), from a generator its index file does not keep: a graph
        read back from a snapshot draws from the state every load leaves, one that never
        stopped from wherever its earlier adds left it, so the two would grow different
        graphs and answer some queries differently. So every add of new labels starts from
        an index just read back, whichever way the graph came (built, copied, loaded):
        a copy of the index per re-index that adds labels, none once the memory is full,
        and none for a G whose memory starts full (gated-nearest). Re-indexing existing
        labels draws only where hnswlib's update probability (1.0) makes no difference."""
        ef = self.index.ef
        with tempfile.TemporaryDirectory() as tmp:  # hnswlib reads and writes only paths
            path = os.path.join(tmp, "index.hnsw")
            self.index.save_index(path)
            if not os.path.exists(path) or os.path.getsize(path) == 0:
                raise SnapshotError(f"base {self.id}: hnswlib wrote no index (disk full?)")
            self.index, self.fresh = _read_index(path, self.vectors, ef), True

    def _largest_norm(self) -> float:
        """The largest norm of the filled rows, exactly as squared_norms computes it from
        the vectors (so a base read back from a snapshot has the same: the search routes
        queries by it, GraphSlots._route). The rows of the largest float32 squared norm hold
        the largest float64 one (rounding to float32 never reverses an order): only they
        are summed again."""
        finite = self._norms[np.isfinite(self._norms)]  # type: ignore[index]
        if not len(finite):
            return 0.0
        rows = np.flatnonzero(self._norms == finite.max())
        return squared_norms(self.vectors[rows], None)[1]

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        filled: np.ndarray,
        cfg: IndexConfig,
        base_id: str,
        threads: int = 1,
    ) -> GraphBase:
        """Build with a fixed seed; on one thread the graph is the same on every machine."""
        slots, dim = vectors.shape
        index = hnswlib.Index(space="l2", dim=dim)
        index.init_index(
            max_elements=slots, ef_construction=cfg.ef_construction, M=cfg.m, random_seed=cfg.seed
        )
        labels = np.flatnonzero(filled)
        if len(labels):
            index.add_items(vectors[labels], labels, num_threads=threads)
        index.set_ef(cfg.ef_search)
        return cls(vectors, filled.copy(), index, base_id)

    @classmethod
    def load(
        cls, path: Path, vectors: np.ndarray, filled: np.ndarray, cfg: IndexConfig, base_id: str
    ) -> GraphBase:
        """Load a graph file whose checksum the caller verified, into a fresh Index."""
        index = _read_index(str(path), vectors, cfg.ef_search)
        if index.get_current_count() != int(filled.sum()):
            raise SnapshotError(
                f"{path}: holds {index.get_current_count()} items, expected {int(filled.sum())}"
            )
        return cls(vectors, filled, index, base_id, fresh=True)

    def clone(self) -> GraphBase:
        index = copy.deepcopy(self.index)
        index.set_ef(self.index.ef)
        copied = GraphBase(self.vectors.copy(), self.filled.copy(), index, uuid.uuid4().hex)
        if self._norms is not None:
            copied._norms, copied.max_norm = self._norms.copy(), self.max_norm
        return copied

    @property
    def count(self) -> int:
        return int(self.index.get_current_count())

    @property
    def nbytes(self) -> int:
        """About what it holds: its arrays, and hnswlib's index (per slot its vector,
        2m level-0 links with their count, a label and a lock; the upper levels, a 1/m
        share of the slots with m links a level; and a table of 65,536 locks, whatever the
        index's size: 2.6 MB)."""
        slots, dim = self.vectors.shape
        m = int(self.index.M)
        per_slot = 4 * dim + 4 * (2 * m + 1) + 8 + HNSW_LOCK_BYTES + 4 * (m + 1) // max(1, m - 1)
        ours = self.vectors.nbytes + self.filled.nbytes
        ours += 0 if self._norms is None else self._norms.nbytes
        return ours + slots * per_slot + HNSW_LABEL_LOCKS * HNSW_LOCK_BYTES


def _read_index(path: str, vectors: np.ndarray, ef: int) -> hnswlib.Index:
    """An index file read into a fresh Index, the one way every graph is read back (a
    restore and GraphBase._reload must leave hnswlib's level generator in one state)."""
    index = hnswlib.Index(space="l2", dim=vectors.shape[1])  # never reuse an Index
    index.load_index(path, max_elements=len(vectors))
    index.set_ef(ef)  # (ef is not stored in the file)
    return index


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOCK_STALE_S = 600.0  # a build lock untouched this long is a dead builder's
LOCK_TOUCH_S = 30.0  # how often a live builder touches it


class _BuildHere(Exception):
    """The process building the initial graph died: this one builds it."""


def _touch_until(lock: Path, done: threading.Event) -> None:
    """Keep the build lock's time fresh while the build runs (however long it takes)."""
    while not done.wait(LOCK_TOUCH_S):
        with contextlib.suppress(OSError):
            os.utime(lock)


class InitGraphCache:
    """``<dir>/init-<fingerprint>.json`` names the published graph file and its checksum."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = Path(directory)
        # "1t": built on one thread (graphs cached before, on all cores, are not reused:
        # they differ from machine to machine)
        self.stem = f"init-1t-{fingerprint[:24]}"
        self.pointer = self.directory / f"{self.stem}.json"

    def get(self, vectors: np.ndarray, filled: np.ndarray, cfg: IndexConfig) -> GraphBase:
        """The published graph; built and published first if there is none."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.pointer.exists():
            self._build_or_wait(vectors, filled, cfg)
        info = json.loads(self.pointer.read_text())
        path = self.directory / info["file"]
        if (
            not path.exists()
            or path.stat().st_size != info["size"]
            or (sha256_file(path) != info["sha256"])
        ):
            raise SnapshotError(
                f"{path}: does not match {self.pointer} (damaged index cache); "
                f"delete both to rebuild"
            )
        return GraphBase.load(path, vectors, filled, cfg, "init")

    def _build_or_wait(self, vectors: np.ndarray, filled: np.ndarray, cfg: IndexConfig) -> None:
        lock = self.directory / f"{self.stem}.lock"
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                return self._wait_for_pointer()
            except _BuildHere:
                fd = os.open(lock, os.O_CREAT | os.O_WRONLY)  # a builder died: build anyway
                os.utime(lock)
        os.close(fd)
        alive = threading.Event()
        beat = threading.Thread(target=_touch_until, args=(lock, alive), daemon=True)
        beat.start()  # (the build holds no lock of Python's: hnswlib releases it)
        try:
            if not self.pointer.exists():  # (published since this process looked)
                self._publish(vectors, filled, cfg)
        finally:
            alive.set()
            beat.join()
            lock.unlink(missing_ok=True)
        return None

    def _wait_for_pointer(self) -> None:
        """Until the builder publishes; if it died (its lock gone without a graph, or not
        touched for LOCK_STALE_S), build here instead."""
        log.info("another process is building %s; waiting", self.pointer)
        lock = self.directory / f"{self.stem}.lock"
        while not self.pointer.exists():
            try:
                stale = time.time() - lock.stat().st_mtime >= LOCK_STALE_S
            except FileNotFoundError:
                stale = not self.pointer.exists()  # (it may have just published)
            if stale:
                raise _BuildHere
            time.sleep(0.5)

    def _publish(self, vectors: np.ndarray, filled: np.ndarray, cfg: IndexConfig) -> None:
        started = time.monotonic()
        log.info("building the initial graph over %d slots (once per model)", len(vectors))
        base = GraphBase.build(vectors, filled, cfg, "init", threads=1)  # (module docstring)
        tmp = self.directory / f".{self.stem}-{uuid.uuid4().hex}.hnsw"
        base.index.save_index(str(tmp))
        if not tmp.exists() or tmp.stat().st_size == 0:
            raise SnapshotError(f"{tmp}: hnswlib wrote no index (disk full?)")
        fsync_path(tmp)
        digest = sha256_file(tmp)
        final = self.directory / f"{self.stem}-{digest[:16]}.hnsw"
        os.replace(tmp, final)
        pointer_tmp = self.directory / f".{self.stem}-{uuid.uuid4().hex}.json"
        pointer_tmp.write_text(
            json.dumps({"file": final.name, "sha256": digest, "size": final.stat().st_size})
        )
        fsync_path(pointer_tmp)
        try:
            os.link(pointer_tmp, self.pointer)  # the first published graph wins
        except FileExistsError:  # another builder's: remove ours unless it is that very file
            if json.loads(self.pointer.read_text()).get("file") != final.name:
                final.unlink(missing_ok=True)
        finally:
            pointer_tmp.unlink(missing_ok=True)
        fsync_path(self.directory)
        log.info("initial graph built and published in %.1f s", time.monotonic() - started)
