"""Partition ownership: leases taken and handed over, fair shares, restoring a partition.

A mixin of ``Worker``: it uses the worker's settings (``s``), ``keys``, ``client``,
``scripts``, ``engine``, ``keeper``, ``parts`` (guarded by ``_lock``) and ``snapshot()``.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from memnet import Engine, SnapshotError
from memnet.snapshot import Snapshots, SnapshotStore
from worker import metrics
from worker.connection import text
from worker.leases import LeaseKeeper, fair_share
from worker.partition import Partition
from worker.protocol import GROUP, Keys, parse_id
from worker.scripts import Scripts
from worker.settings import Settings

log = logging.getLogger(__name__)


class Ownership:
    s: Settings
    keys: Keys
    client: Any
    scripts: Scripts
    engine: Engine
    keeper: LeaseKeeper
    parts: dict[int, Partition]
    burst: bool
    _lock: threading.Lock
    _lost: set[int]
    _idle: set[int]
    _started: float
    _refused_until: dict[int, float]

    def snapshot(self, part: Partition) -> None:
        raise NotImplementedError

    def _owned(self) -> dict[int, int]:
        with self._lock:
            return {p: part.epoch for p, part in self.parts.items()}

    def _mark_lost(self, p: int) -> None:
        with self._lock:
            self._lost.add(p)

    def _drop_lost(self) -> None:
        with self._lock:
            lost, self._lost = self._lost, set()
        for p in lost:
            self.drop(p, "lease lost")

    def drop(self, p: int, why: str) -> None:
        """Forget a partition at once (its memories may be ahead of Redis)."""
        with self._lock:
            part = self.parts.pop(p, None)
        self._idle.discard(p)
        if part is not None:
            log.warning("dropping partition %d (epoch %d): %s", p, part.epoch, why)
        metrics.OWNED.set(len(self.parts))

    def rebalance(self) -> None:
        target = fair_share(self.s.partitions, self.keeper.members, self.s.worker_id)
        for p in sorted(self.parts, reverse=True)[: max(0, len(self.parts) - target)]:
            self.hand_over(p)
        grace = self.burst or time.monotonic() - self._started >= self.s.renew_every_s
        if len(self.parts) < target and grace:
            for p in self._free_partitions():
                if len(self.parts) >= target:
                    break
                self.take(p)
        metrics.OWNED.set(len(self.parts))

    def _free_partitions(self) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for p in range(self.s.partitions):
            pipe.exists(self.keys.part(p, "lease"))
        held = pipe.execute()
        now = time.monotonic()
        free = [
            p
            for p in range(self.s.partitions)
            if not held[p] and p not in self.parts and self._refused_until.get(p, 0) <= now
        ]
        shift = sum(map(ord, self.s.worker_id)) % max(1, len(free))  # spread first tries
        return free[shift:] + free[:shift]

    def take(self, p: int) -> None:
        store = open_store(self.s, p, self.engine)
        epoch = self.scripts.acquire(
            keys=[self.keys.part(p, "lease"), self.keys.part(p, "epoch")],
            args=[self.s.worker_id, self.s.lease_ms, store.newest_epoch()],
        )
        if epoch is None:
            return
        part = Partition(
            p, int(epoch), self.engine, store, self.s.partitions, self.s.max_message_bytes
        )
        if not self._restore(part):
            self._release(part)
            self._refused_until[p] = time.monotonic() + 60
            return
        self._ensure_group(p)
        self._plan_replay(part)
        with self._lock:
            self.parts[p] = part
        self._idle.discard(p)
        log.info(
            "took partition %d (epoch %d) at %s, replaying to %s",
            p,
            part.epoch,
            part.position,
            part.replay_until,
        )

    def _restore(self, part: Partition) -> bool:
        """Load the newest good snapshot; False if the partition cannot be rebuilt exactly."""
        try:
            for reason in part.restore():
                log.warning("partition %d: skipped snapshot: %s", part.number, reason)
            refused = None
        except SnapshotError as e:
            refused = str(e)
        if part.position is not None:
            return True
        trimmed = self.client.get(self.keys.part(part.number, "trimmed"))
        if trimmed is not None:
            log.error(
                "partition %d cannot be rebuilt exactly: no usable snapshot (%s) and the "
                "input was trimmed up to %s. Restore a good snapshot into %s.",
                part.number,
                refused or "none found",
                trimmed.decode(),
                Path(self.s.snapshot_dir) / f"p{part.number}",
            )
            return False
        if refused:
            log.warning(
                "partition %d: %s; replaying its whole history instead", part.number, refused
            )
        return True

    def _ensure_group(self, p: int) -> None:
        try:
            self.client.xgroup_create(self.keys.inp(p), GROUP, id="0", mkstream=True)
        except Exception as e:  # only BUSYGROUP (the group exists) is expected
            if "BUSYGROUP" not in str(e):
                raise

    def _plan_replay(self, part: Partition) -> None:
        """Replay (position, last delivered] before reading new entries."""
        groups = self.client.xinfo_groups(self.keys.inp(part.number))
        last = next(
            (text(g["last-delivered-id"]) for g in groups if text(g["name"]) == GROUP), None
        )
        if (
            last
            and last != "0-0"
            and (part.position is None or parse_id(last) > parse_id(part.position))
        ):
            part.replay_until = last
            part.seen = last
        elif part.seen is None and last:
            part.seen = last

    def hand_over(self, p: int) -> None:
        """Snapshot (if everything applied is committed) and release the lease."""
        part = self.parts.get(p)
        if part is None:
            return
        if not part.uncommitted and part.since_snapshot:
            self.snapshot(part)
        self._release(part)
        self._forget(p)
        log.info("released partition %d (epoch %d) at %s", p, part.epoch, part.position)

    def _forget(self, p: int) -> None:
        with self._lock:
            self.parts.pop(p, None)
        self._idle.discard(p)
        metrics.OWNED.set(len(self.parts))

    def _release(self, part: Partition) -> None:
        self.scripts.release(
            keys=[self.keys.part(part.number, "epoch"), self.keys.part(part.number, "lease")],
            args=[part.epoch, self.s.worker_id],
        )


def open_store(settings: Settings, p: int, engine: Engine) -> Snapshots:
    """The snapshot store of partition p: a directory every worker can reach."""
    return SnapshotStore(Path(settings.snapshot_dir) / f"p{p}", engine, settings.snapshots_kept)
