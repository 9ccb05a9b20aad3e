"""Partition ownership: the table of owned partitions and every epoch-checked call made for
them -- leases taken and handed over, fair shares, restoring a partition, the fenced reads,
commits, trims -- and what a fault of one partition does to it (``contain``).

A fault is contained to its partition: fenced (another worker owns it now): drop it; Redis
lost data: drop it and take it again at once, which rebuilds it from its newest snapshot;
the consumer group is gone: recreate it at the applied position; a stored memory failed its
checksum (moved aside): take it again at once, from a snapshot that does not need it;
anything else (a missing ACL right, an unreachable snapshot store, an unexpected error):
release it and back off before taking it again. Only a
connection fault escapes (``UNAVAILABLE``): the worker loop backs off as a whole; except in
a Redis Cluster, where a node out of reach or a slot being migrated holds back only the
partitions of its slots (``out_of_reach``), each retried alone, and the others serve on.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import memnet.store
from memnet import Engine, SnapshotError
from memnet.errors import CorruptBlob
from memnet.snapshot import SnapshotStore
from memnet.store import Store
from worker import metrics
from worker.archive import Archive
from worker.connection import Client, is_cluster, text
from worker.faults import Backoff, Kind, Throttled, classify
from worker.leases import fair_share
from worker.partition import Batch, Partition
from worker.protocol import GROUP, Keys, parse_id
from worker.scripts import Scripts, fenced
from worker.settings import Settings, SettingsError
from worker.streams import Entries, StreamIO

log = logging.getLogger(__name__)

PROBE_S = 0.5  # how long a cluster node out of reach has to answer before a retry
SERVED_FOR_S = 60.0  # served this long since its take, a partition's backoff starts over


class Ownership:
    def __init__(
        self,
        settings: Settings,
        client: Client,
        scripts: Scripts,
        engine: Engine,
        snapshot: Callable[[Partition, Callable[[], bool] | None], None],
    ) -> None:
        self.s = settings
        self.keys = Keys(settings.prefix)
        self.client = client
        self.scripts = scripts
        self.engine = engine
        self.model = engine.model.fingerprint
        self.active = True  # this worker's model is the one the deployment serves
        self.snapshot = snapshot  # the worker's: snapshot(part, abort)
        self.io = StreamIO(
            client, scripts, self.keys, settings.worker_id, settings.batch_size,
            settings.response_maxlen,
        )  # fmt: skip
        self.parts: dict[int, Partition] = {}
        self.idle: set[int] = set()
        self._lock = threading.Lock()
        self._lost: dict[int, bool] = {}  # from the lease keeper: p -> Redis lost data
        self._retry: dict[int, Backoff] = {}  # partitions released after a fault
        self._floor: dict[int, int] = {}  # epochs seen, for a Redis that forgot them
        self.throttled = Throttled(log)
        self.rebuild_due = False  # a partition was dropped to be rebuilt: rebalance now
        # In a Redis Cluster, a node out of reach or a slot being migrated faults only the
        # partitions it holds: each waits alone (out_of_reach), the others serve on.
        self.cluster = is_cluster(client)
        self.unreachable: dict[int, Backoff] = {}
        self.quick = client  # calls that may skip a node: the keeper's client (Worker sets it;
        # in a cluster, with timeouts well within a lease)

    # ---- the table -----------------------------------------------------------------------
    def owned(self) -> dict[int, int]:
        """Partition -> epoch (read by the lease keeper's thread)."""
        with self._lock:
            return {p: part.epoch for p, part in self.parts.items()}

    @contextlib.contextmanager
    def holding(self, p: int, epoch: int) -> Iterator[bool]:
        """For the lease keeper: whether p is still owned at epoch, kept so while its lease
        is renewed (the table cannot change meanwhile)."""
        with self._lock:
            part = self.parts.get(p)
            yield part is not None and part.epoch == epoch

    def mark_lost(self, p: int, epoch: int, data_lost: bool) -> None:
        """The lease keeper could not renew p at epoch (data_lost: Redis forgot it)."""
        with self._lock:
            self._lost[p] = (epoch, data_lost or self._lost.get(p) == (epoch, True))

    def drop_lost(self) -> None:
        """Drop the partitions whose leases the keeper lost: at the epoch it lost (the
        main loop may have dropped one and taken it again since, at a newer epoch)."""
        with self._lock:
            lost, self._lost = self._lost, {}
        for p, (epoch, data_lost) in lost.items():
            part = self.parts.get(p)
            if part is None or part.epoch != epoch:
                continue
            if data_lost:
                self._redis_lost(part, "its epoch is gone or went down")
            else:
                self.drop(p, "lease lost")

    def drop(self, p: int, why: str) -> None:
        """Forget a partition at once (its memories may be ahead of Redis)."""
        with self._lock:
            part = self.parts.pop(p, None)
            self.share_budget()
        self.idle.discard(p)
        self.unreachable.pop(p, None)
        if part is not None:
            self._floor[p] = max(self._floor.get(p, 0), part.epoch)
            log.warning("dropping partition %d (epoch %d): %s", p, part.epoch, why)
        metrics.OWNED.set(len(self.parts))

    # ---- faults --------------------------------------------------------------------------
    @contextlib.contextmanager
    def contained(self, part: Partition) -> Iterator[None]:
        """Run a call for one partition; its faults stay with that partition."""
        try:
            yield
        except Exception as e:
            if self.escapes(e):
                raise
            self.contain(part, e)

    def escapes(self, error: BaseException) -> bool:
        """Whether a fault backs the whole loop off: Redis unavailable, on a standalone
        server (in a cluster, only the partitions of a node out of reach wait: out_of_reach)."""
        return not self.cluster and classify(error) is Kind.UNAVAILABLE

    def contain(self, part: Partition, error: BaseException) -> None:
        """What a fault of one partition does to it (the module docstring has the table)."""
        if self.escapes(error):
            raise error
        kind = classify(error)
        if self.parts.get(part.number) is not part:
            return  # already dropped or replaced
        if kind is Kind.UNAVAILABLE:
            self.out_of_reach(part, error)
        elif isinstance(error, CorruptBlob):  # moved aside: the next load falls back
            self.rebuild(part, str(error))
        elif kind is Kind.FENCED:
            self.drop(part.number, str(error))
        elif kind is Kind.LOST:
            self._redis_lost(part, str(error))
        elif kind is Kind.NOGROUP:
            self._recreate_group(part, error)
        else:
            self._back_off(part, kind, error)

    def out_of_reach(self, part: Partition, error: BaseException) -> None:
        """A cluster's node holding part's slot is out of reach, or the slot is being
        migrated (TRYAGAIN): part keeps its memories, and the batch it could not commit
        (``held``), and waits alone with backoff (Worker.ready_parts tries it again: the
        held batch committed, its replay planned again), while the others serve on. Its
        lease lapses if the node stays away: the keeper's verdict drops it then."""
        p = part.number
        self.idle.discard(p)  # (a burst run waits for it)
        delay = self.unreachable.setdefault(p, Backoff(base_s=0.1, cap_s=5.0)).fail()
        metrics.ERRORS.labels("redis").inc()
        self.throttled.log(
            f"unreachable-{p}", logging.WARNING, "partition %d: its Redis node is out of reach "
            "or its slot is moving (%s); the other partitions serve on, it is tried again in "
            "%.1f s", p, error, delay,
        )  # fmt: skip

    def probe(self, part: Partition) -> None:
        """Raise (UNAVAILABLE) unless the cluster node holding part's slot answers a PING
        within PROBE_S: one that stopped answering (frozen, cut off) would hold the loop
        for the client's whole timeout at each retry, the other partitions with it."""
        node = self.client.get_node_from_key(self.keys.inp(part.number))
        pool = node.redis_connection.connection_pool
        options = {**pool.connection_kwargs, "socket_timeout": PROBE_S}
        probe = pool.connection_class(**{**options, "socket_connect_timeout": PROBE_S})
        try:  # (a connection of the node's own kind: its credentials, TLS, and no retry)
            probe.send_command("PING")
            probe.read_response()
        finally:
            probe.disconnect()

    def reachable(self, part: Partition) -> None:
        if self.unreachable.pop(part.number, None) is not None:
            self.throttled.clear(
                f"unreachable-{part.number}", "partition %d: Redis reached again", part.number
            )

    def served(self, part: Partition) -> None:
        """part read (and committed what it read) without a fault: its backoff starts over,
        once it has served SERVED_FOR_S since it was taken. Not at a take, nor at its first
        commit: a fault that comes back after each take (a revoked XREADGROUP), or later in
        the pass that committed (a revoked XTRIM, after the snapshot), would otherwise be
        retried every second, with a release, a restore and a log line each time."""
        if self.parts.get(part.number) is not part:
            return  # (dropped meanwhile: its backoff stays)
        if time.monotonic() - part.taken_at < SERVED_FOR_S:
            return
        if self._retry.pop(part.number, None) is not None:
            p = part.number
            for key in (*(kind.name for kind in Kind), "take", "nogroup"):
                self.throttled.clear(f"{key}-{p}", "partition %d serves again", p)

    def _redis_lost(self, part: Partition, why: str) -> None:
        metrics.ERRORS.labels("redis_data_lost").inc()
        log.error(
            "partition %d: Redis lost data this worker had committed (%s): FLUSHALL, a restart "
            "from an older snapshot or a failover to a lagging replica? Rebuilding it from the "
            "newest snapshot and replaying what Redis still has; input entries and responses "
            "Redis lost are gone",
            part.number,
            why,
        )
        self.rebuild(part, "Redis lost data")

    def rebuild(self, part: Partition, why: str) -> None:
        """Release a partition and take it again at once: from its snapshot, plus replay."""
        self.drop(part.number, f"rebuilding: {why}")
        with contextlib.suppress(Exception):
            self.release(part)
        self.rebuild_due = True

    def _recreate_group(self, part: Partition, error: BaseException) -> None:
        p = part.number
        at = part.position or "0"
        self.throttled.log(
            f"nogroup-{p}",
            logging.ERROR,
            "partition %d: its consumer group is gone (%s); recreating it at %s",
            p,
            str(error).split(" script:")[0],
            at,
        )
        metrics.ERRORS.labels("group_missing").inc()
        with self.contained(part):
            self.ensure_group(part, at)
            part.seen = part.position
            self.plan_replay(part)

    def _back_off(self, part: Partition, kind: Kind, error: BaseException) -> None:
        p = part.number
        retry = self._retry.setdefault(p, Backoff(base_s=1.0, cap_s=60.0))
        delay = retry.fail()
        metrics.ERRORS.labels(kind.name.lower()).inc()
        self.throttled.log(
            f"{kind.name}-{p}",
            logging.ERROR,
            "partition %d: %s (%s); releasing it, taking it again in %.0f s at the earliest",
            p,
            kind.value,
            error,
            delay,
            exc_info=error if kind is Kind.OTHER else None,
        )
        self.drop(p, f"{kind.value}: released")
        with contextlib.suppress(Exception):
            self.release(part)

    # ---- taking and handing over ---------------------------------------------------------
    def rebalance(self, members: list[str], grace: bool) -> None:
        """Hand over what is over this worker's fair share, take free partitions up to it
        (none while its model is not the one the deployment serves)."""
        target = fair_share(self.s.partitions, members, self.s.worker_id) if self.active else 0
        for p in sorted(self.parts, reverse=True)[: max(0, len(self.parts) - target)]:
            self.hand_over(p)
        self.rebuild_due = False
        if len(self.parts) < target and grace:
            for p in self.free_partitions():
                if len(self.parts) >= target:
                    break
                self.take(p)
        metrics.OWNED.set(len(self.parts))

    def share_budget(self) -> None:
        """Split MEMNET_RESIDENT_MB evenly over the partitions owned."""
        share = (self.s.resident_mb << 20) // max(1, len(self.parts))
        for part in self.parts.values():
            part.budget_bytes = share

    def free_partitions(self) -> list[int]:
        pipe = self.quick.pipeline(transaction=False)  # (short timeouts: the keeper's)
        for p in range(self.s.partitions):
            pipe.exists(self.keys.part(p, "lease"))
        try:
            held = pipe.execute()
        except Exception as e:  # in a cluster, one node out of reach: ask each alone, a
            if classify(e) is not Kind.UNAVAILABLE or not self.cluster:  # partition
                raise  # whose node does not answer counts as held (one try a node)
            down: set[str] = set()
            held = [self._held(p, down) for p in range(self.s.partitions)]
        free = [
            p
            for p in range(self.s.partitions)
            if not held[p] and p not in self.parts and self._retry.get(p, Backoff()).ready
        ]
        shift = sum(map(ord, self.s.worker_id)) % max(1, len(free))  # spread first tries
        return free[shift:] + free[:shift]

    def _held(self, p: int, down: set[str]) -> bool:
        key = self.keys.part(p, "lease")
        node = self.quick.get_node_from_key(key).name
        if node in down:
            return True
        try:
            return bool(self.quick.exists(key))
        except Exception as e:
            if classify(e) is not Kind.UNAVAILABLE:
                raise
            down.add(node)
            return True

    def take(self, p: int) -> None:
        try:
            store = open_store(self.s, p, self.engine)
            floor = max(store.newest_epoch(), self._floor.get(p, 0))
            names = ("lease", "epoch", "taker", "serve", "model", "switch", "offset")
            took = self.scripts.acquire(
                keys=[self.keys.part(p, n) for n in names],
                args=[self.s.worker_id, self.s.lease_ms, floor, self.model],
            )
        except Exception as e:  # an unreadable store, a refused ACQUIRE: not this time
            if self.escapes(e):
                raise
            delay = self._retry.setdefault(p, Backoff(base_s=1.0, cap_s=60.0)).fail()
            self.throttled.log(
                f"take-{p}", logging.ERROR, "partition %d: cannot take it (%s); next try in "
                "%.0f s", p, e, delay,
            )  # fmt: skip
            return
        if took is None or took == -1:  # (held; or another model serves it: a deploy)
            return
        epoch, before = int(took[0]), text(took[1]) if took[1] else None
        part = Partition(p, epoch, self.engine, store, self.s.partitions, self.s.max_message_bytes)
        if before is not None and before != self.model:
            log.info("partition %d: switched to model %s after entry %s (model %s before)",
                     p, self.model[:12], text(took[2]), before[:12])  # fmt: skip
        with self._lock:
            self.parts[p] = part
            self.share_budget()
        try:
            if not self._start(part):
                return
        except Exception as e:
            if classify(e) is Kind.UNAVAILABLE:  # half started: let the lease expire
                self.drop(p, "Redis unavailable while taking it")
            self.contain(part, e)
            return
        self.idle.discard(p)
        log.info(
            "took partition %d (epoch %d) at %s, replaying to %s",
            p,
            part.epoch,
            part.position,
            part.replay_until,
        )

    def _start(self, part: Partition) -> bool:
        """Restore, check what Redis holds against the snapshot, then plan the replay;
        False if the partition cannot be rebuilt exactly (released, tried again later)."""
        p = part.number
        if not self.restore(part):
            self.drop(p, "released: nothing to rebuild it from")
            self.release(part)
            self._retry.setdefault(p, Backoff(base_s=60.0, cap_s=60.0)).fail()
            return False
        committed = self.client.get(self.keys.part(p, "offset"))
        part.committed = text(committed) if committed is not None else None
        if part.position and (
            part.committed is None or parse_id(part.committed) < parse_id(part.position)
        ):
            log.error(
                "partition %d: Redis lost data: its committed offset is %s, but a snapshot "
                "covers up to %s (FLUSHALL, a restart from an older snapshot, or a failover "
                "to a lagging replica?); serving from the snapshot on",
                p,
                part.committed or "gone",
                part.position,
            )
            metrics.ERRORS.labels("redis_data_lost").inc()
        self.ensure_group(part, part.position or "0")
        self.plan_replay(part)
        return True

    def restore(self, part: Partition) -> bool:
        """Load the newest good snapshot; False if the partition cannot be rebuilt exactly."""
        try:
            for reason in part.restore():
                log.warning("partition %d: skipped snapshot: %s", part.number, reason)
            refused = None
        except SnapshotError as e:
            refused = str(e)
        trimmed = self.client.get(self.keys.part(part.number, "trimmed"))
        if part.position is not None:
            return self._after_trim(part, trimmed)
        if trimmed is not None:
            log.error(
                "partition %d cannot be rebuilt exactly: no usable snapshot (%s) and the "
                "input was trimmed up to %s. Restore a good snapshot into %s.",
                part.number,
                refused or "none found",
                trimmed.decode(),
                f"{self.s.store_url}/{model_prefix(part.number, self.engine.model.fingerprint)}",
            )
            return False
        if refused:
            log.warning(
                "partition %d: %s; replaying its whole history instead", part.number, refused
            )
        return True

    def _after_trim(self, part: Partition, trimmed: bytes | None) -> bool:
        """Whether the input still holds every entry after the loaded snapshot: the input
        is trimmed at the oldest kept snapshot's position, and when the newer ones are
        refused (damaged), the store falls back to an older one its chains keep."""
        if trimmed is None or parse_id(part.position) >= parse_id(text(trimmed)):  # type: ignore[arg-type]
            return True
        log.error(
            "partition %d cannot be rebuilt exactly: its newest usable snapshot is at entry "
            "%s, but the input was trimmed up to %s (the newer snapshots were refused: see "
            "above). Restore a good snapshot into %s.",
            part.number,
            part.position,
            text(trimmed),
            f"{self.s.store_url}/{model_prefix(part.number, self.engine.model.fingerprint)}",
        )
        return False

    def ensure_group(self, part: Partition, at: str) -> None:
        """Create the consumer group at ``at`` unless it exists (fenced)."""
        p = part.number
        fenced(
            self.scripts.ensure_group,
            keys=[self.keys.part(p, "epoch"), self.keys.inp(p), self.keys.part(p, "taker")],
            args=[part.epoch, at, self.s.worker_id],
        )

    def plan_replay(self, part: Partition) -> None:
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

    def hand_over(self, p: int, abort: Callable[[], bool] | None = None) -> None:
        """Snapshot (if everything applied is committed) and release the lease. A snapshot
        that fails or is abandoned (abort) costs only a longer replay for the next owner."""
        part = self.parts.get(p)
        if part is None:
            return
        if not part.uncommitted and part.since_snapshot:
            self.snapshot(part, abort)
        if self.parts.get(p) is not part:
            return  # the snapshot found it superseded
        with self._lock:
            self.parts.pop(p, None)
            self.share_budget()
        self.idle.discard(p)
        if self.unreachable.pop(p, None) is not None:  # (its node out of reach: a release
            log.warning("partition %d: its node is out of reach; its lease lapses", p)
        else:  # would wait out the client's timeout, at a stop past the supervisor's kill)
            try:
                self.release(part)
            except Exception as e:  # in a cluster, its node out of reach: its lease lapses
                if not self.cluster or classify(e) is not Kind.UNAVAILABLE:
                    raise
                log.warning("partition %d: its lease could not be released (%s); it lapses", p, e)
        metrics.OWNED.set(len(self.parts))
        log.info("released partition %d (epoch %d) at %s", p, part.epoch, part.position)

    def release(self, part: Partition) -> None:
        """Give up the lease (fenced). Callers take the partition out of the table first:
        the lease keeper renews only what is in it (``holding``), so a released lease is
        never renewed again behind the release."""
        self.scripts.release(
            keys=[self.keys.part(part.number, "epoch"), self.keys.part(part.number, "lease")],
            args=[part.epoch, self.s.worker_id],
        )

    # ---- the fenced data path ------------------------------------------------------------
    def read(self, parts: list[Partition]) -> dict[Partition, Entries | Exception]:
        """Each partition's next entries (replayed, or new), or its fault."""
        out: dict[Partition, Any] = {}
        for part in (p for p in parts if p.replay_until):
            try:
                out[part] = self.io.replay(part)
            except Exception as e:
                if self.escapes(e):
                    raise
                out[part] = e
        live = [p for p in parts if p not in out]
        if live:
            out.update(self.io.read(live))
        return out

    def commit(self, batches: dict[Partition, Batch]) -> dict[Partition, bool]:
        """Commit in one round trip (raises on a connection fault; committing is
        idempotent, so the caller may send it again); True where it landed."""
        done, refused = {}, None
        replies = self.io.commit(batches)
        for part, error in replies.items():  # every landed commit recorded first
            if error is None:
                part.uncommitted = False
                part.committed = batches[part].last_id
                self.served(part)
            done[part] = error is None
        for part, error in replies.items():
            if error is None:
                continue
            if classify(error) is not Kind.UNAVAILABLE:
                self.contain(part, error)
            elif self.cluster:  # its node out of reach: it holds its batch, the others go on
                part.held = batches[part]
                self.contain(part, error)
            else:  # (Redis refusing writes: OOM, READONLY)
                refused = refused or error  # the caller retries the whole commit (idempotent)
        if refused is not None:
            raise refused
        return done

    def trim(self, part: Partition, point: str) -> None:
        """Archive the input below point (MEMNET_ARCHIVE), then trim it there; nothing is
        trimmed that could not be archived, or while a deploy to another model runs."""
        p = part.number
        archiving = ("archive", "archiving", "input not trimmed until it succeeds")
        if self.s.archive and not self._quietly(part, archiving, self.archive, part, point):
            return  # nothing trimmed that is not archived
        with self.contained(part):
            names = ("epoch", "in", "trimmed", "deploying", "unarchived", "taker")
            keys = [self.keys.part(p, k) for k in names]
            archived = "1" if self.s.archive else "0"  # (else memnet rebuild refuses the hole)
            args = [part.epoch, point, self.model, archived, self.s.worker_id]
            if fenced(self.scripts.trim, keys=keys, args=args) == -1:
                self.throttled.log(
                    f"deploying-{p}", logging.WARNING, "partition %d: input not trimmed while "
                    "memnet deploy switches to another model (%s); if none runs, an "
                    "interrupted one left it: call it off with memnet deploy --model (the "
                    "served model's file)", p, self.keys.part(p, "deploying"),
                )  # fmt: skip
        if self.parts.get(p) is part:  # (not after the trim found it fenced)
            self.prune_quietly(part)

    def prune_quietly(self, part: Partition) -> None:
        """Archive retention (MEMNET_ARCHIVE_DAYS), its store's faults logged, not the
        partition's: it serves on (and trims: a prune is never what a trim waits for)."""
        pruning = ("archive_prune", "pruning the archive", "old segments kept meanwhile")
        self._quietly(part, pruning, self.prune, part)

    def _quietly(self, part: Partition, what: tuple[str, str, str], call: Any, *args: Any) -> bool:
        """call(*args); False if the store failed (full, read-only, S3 down): logged once a
        minute, the partition serving on, as after a failed snapshot. Redis's own faults are
        contained as everywhere. True if it succeeded. what: (metric label, the action,
        what its failure means)."""
        label, action, meaning = what
        p, key = part.number, f"{label}-{part.number}"
        try:
            call(*args)
        except Exception as e:
            if classify(e) is not Kind.OTHER:
                self.contain(part, e)
                return False
            metrics.ERRORS.labels(label).inc()
            self.throttled.log(
                key, logging.ERROR, "partition %d: %s failed (%s); serving on, %s",
                p, action, e, meaning,
            )  # fmt: skip
            return False
        self.throttled.clear(key, "partition %d: %s succeeds again", p, action)
        return True

    def archive(self, part: Partition, point: str) -> None:
        """Append the entries before point not yet archived to the partition's archive."""
        archive = Archive(store_at(self.s.store_url), part.number)
        if part.archived is None:  # (the first archiving since the take)
            archive.clean_temporary()
            part.archived = archive.last()
        start = "-" if part.archived is None else "(" + part.archived
        while True:
            got = self.client.xrange(self.keys.inp(part.number), start, "(" + point, count=10_000)
            if not got:
                break
            archive.append([(text(i), fields.get(b"msg", b"")) for i, fields in got])
            part.archived = text(got[-1][0])
            start = "(" + part.archived

    def prune(self, part: Partition) -> None:
        """Apply MEMNET_ARCHIVE_DAYS to the partition's archive: at each trim, and (called
        by the worker) at least hourly on a partition without input, archiving on or off,
        so erasure by retention does not wait for traffic or for archiving."""
        part.pruned_at = time.monotonic()
        if self.s.archive_days:
            Archive(store_at(self.s.store_url), part.number).prune(self.s.archive_days)

    def tidy(self, part: Partition) -> None:
        """Once replay is over, drop the group's other consumers (nothing pending there)."""
        part.tidy = True
        with self.contained(part):
            fenced(
                self.scripts.tidy,
                keys=[self.keys.part(part.number, n) for n in ("epoch", "in", "taker")],
                args=[part.epoch, self.s.worker_id],  # (the last: the taker's id, _CHECK)
            )


def open_store(
    settings: Settings, p: int, engine: Engine | None, model: str | None = None
) -> SnapshotStore:
    """The snapshots of partition p for a model: under pP/MODEL/ of MEMNET_SNAPSHOT_URL (or
    _DIR), MODEL the first 16 hex digits of its fingerprint (each model keeps its own, so a
    rebuild for a new one runs beside the serving one). ``model`` (a fingerprint) with
    engine None opens it for listing only."""
    fingerprint = engine.model.fingerprint if engine is not None else model
    if fingerprint is None:
        raise ValueError("open_store needs an engine or a model fingerprint")
    return SnapshotStore(
        store_at(settings.store_url), engine, settings.snapshots_kept, model_prefix(p, fingerprint)
    )


def model_prefix(p: int, fingerprint: str) -> str:
    return f"p{p}/{fingerprint[:16]}"


@functools.cache
def store_at(url: str) -> Store:
    """One store client per URL and process (an S3 client keeps its connections)."""
    return memnet.store.open_store(url)


DEPLOYMENT = "deployment.json"  # at the store's root: the deployment it belongs to


def deployed_model(settings: Settings) -> str | None:
    """The model the last memnet deploy switched to, as recorded in the snapshot store
    (None: never deployed, or the store cannot be read now): what survives Redis losing
    everything (FLUSHALL), PREFIX:meta and the partitions' serve keys included."""
    try:
        return json.loads(store_at(settings.store_url).get(DEPLOYMENT)).get("model")
    except Exception:  # (no record, an unreachable store: nothing to go by)
        return None


def record_deployed(settings: Settings, model: str) -> None:
    """After a deploy's switch: the model, beside the deployment's prefix (claim_store)."""
    data = json.dumps({"prefix": settings.prefix, "model": model}).encode()
    try:
        store_at(settings.store_url).put(DEPLOYMENT, data)
    except Exception as e:  # (the switch stands; only the record for a lost Redis is old)
        log.warning("could not record the deployed model in the snapshot store (%s)", e)


def _check_creates(store: Store, settings: Settings, claim: bytes) -> None:
    """A store that ignores conditional writes (S3's If-None-Match: some S3-compatible
    services) lets two writers publish the same manifest, each over the other, and two
    deployments claim one store: refused at start-up. (Told by creating what was just
    created, which must fail.)"""
    try:
        store.create(DEPLOYMENT, claim)
    except memnet.store.AlreadyExists:
        return
    raise SettingsError(
        f"MEMNET_SNAPSHOT_URL: the store {settings.store_url} does not refuse to create an "
        "object that exists (it ignores S3's conditional writes, If-None-Match: *), which "
        "snapshots and leases of the store rely on: use a store that honours them (AWS S3, "
        "MinIO, Cloudflare R2 and others do)"
    )


def claim_store(settings: Settings) -> None:
    """The snapshot store belongs to one deployment (MEMNET_PREFIX): its keys (pP/MODEL/,
    archive/pP/) do not name the prefix, so two deployments pointed at one store would load
    each other's snapshots and mix their input archives. The first worker records its
    prefix there; a worker, rebuild or deploy of another prefix is refused (SettingsError).
    A store that cannot be reached now is not checked (snapshots retry on their own)."""
    claim = json.dumps({"prefix": settings.prefix})
    try:
        store = store_at(settings.store_url)
        try:
            store.create(DEPLOYMENT, claim.encode())
            _check_creates(store, settings, claim.encode())
            return
        except memnet.store.AlreadyExists:
            owner = json.loads(store.get(DEPLOYMENT)).get("prefix")
    except SettingsError:
        raise
    except Exception as e:  # (unreachable, or a client that cannot be made yet)
        log.warning("could not check the snapshot store's deployment (%s)", e)
        return
    if owner != settings.prefix:
        raise SettingsError(
            f"MEMNET_SNAPSHOT_URL: the store {settings.store_url} holds the deployment "
            f"MEMNET_PREFIX={owner}, not {settings.prefix} (its snapshots and input archive "
            "would be mixed up with this one's): give each deployment its own store"
        )
