"""The worker loop: own partitions, read them in batches, apply in order, publish, snapshot.

Per owned partition, in order:
  1. take over: acquire the lease (the epoch goes up), load the newest good snapshot, and
     replay from just after its position up to what the group had delivered (pending
     entries included), then read new entries with XREADGROUP ">" (fenced);
  2. apply each batch with the memnet engine, strictly in stream order;
  3. commit it in one fenced script: responses at their query's entry id (a replayed
     publish is refused by Redis, so never duplicated), dead letters, acks, offset;
  4. every N entries / T seconds, snapshot the memories with the last applied entry id, then
     trim the input below the oldest kept snapshot.
SIGTERM: finish the batch, snapshot, release the leases, exit. A second one exits at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster

from memnet import Engine, SnapshotError, load_model
from memnet.errors import StaleSnapshot
from memnet.snapshot import Snapshots, SnapshotStore
from worker import metrics
from worker.connection import ERRORS, connect, is_cluster, text
from worker.leases import LeaseKeeper, fair_share
from worker.partition import Batch, Partition
from worker.protocol import GROUP, PROTOCOL, Keys, parse_id
from worker.scripts import Fenced, Scripts, fenced
from worker.settings import Settings, SettingsError, redact

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.s = settings
        self.keys = Keys(settings.prefix)
        if engine is None:
            if settings.model is None:
                raise SettingsError("MEMNET_MODEL is not set: give the model file to serve")
            engine = Engine(load_model(settings.model))
        self.engine = engine
        self.client = connect(settings.redis_url, timeout_s=settings.block_ms / 1000 + 5)
        self.scripts = Scripts(self.client)
        self.cluster = is_cluster(self.client)
        self.parts: dict[int, Partition] = {}
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._lost: set[int] = set()
        self._progress = time.monotonic()
        self._started = time.monotonic()
        self._next_cycle = 0.0
        self._backoff = 0.0
        self._refused_until: dict[int, float] = {}
        self._idle: set[int] = set()
        self._run_id: str | None = None
        self._resync = False  # a Redis call failed: re-plan from Redis's state before reading
        self.burst = False
        self.keeper = LeaseKeeper(
            settings,
            connect(settings.redis_url),
            self._owned,
            self._mark_lost,
            lambda: self._progress,
            stall_s=max(30.0, 10 * settings.lease_ms / 1000),
        )

    # ---- lifecycle -----------------------------------------------------------------------
    def run(self, burst: bool = False) -> None:
        """Serve until stopped; with burst, stop once every partition it holds is drained."""
        self.burst = burst
        # Compile first, join after: a worker that joins takes its share at once, which
        # keeps takeovers after a crash short.
        self.engine.warm_up(self.s.batch_size)
        self._until_reachable(self._start_up)
        self.keeper.start()
        self._started = time.monotonic()
        try:
            while not self.stopping.is_set():
                try:
                    if self._loop_once():
                        break
                    self._backoff = 0.0
                except ERRORS as e:
                    self._on_redis_error(e)
        finally:
            self.shutdown()

    def _start_up(self) -> None:
        self.scripts.load()
        self.keeper.scripts.load()
        self.check_meta()
        self._run_id = self._redis_run_id()
        log.info(
            "worker %s serving %s (model %s, %d partitions, redis %s)",
            self.s.worker_id,
            self.s.prefix,
            self.engine.model.fingerprint[:12],
            self.s.partitions,
            redact(self.s.redis_url),
        )
        self.keeper.tick()  # be counted by peers from now on

    def _until_reachable(self, action: Any) -> None:
        """Run action, retrying with backoff while Redis is unreachable (until stopped)."""
        delay = 0.1
        while True:
            try:
                with credentials_checked():
                    action()
                return
            except ERRORS as e:
                if self.stopping.is_set():
                    raise
                log.warning("Redis unavailable at start-up (%s); retrying in %.1f s", e, delay)
                self.stopping.wait(delay)
                delay = min(5.0, delay * 2)

    def _loop_once(self) -> bool:
        """One pass; True when a burst run is done."""
        self._progress = time.monotonic()
        self._drop_lost()
        if self._resync:
            self._resynchronise()
        if time.monotonic() >= self._next_cycle:
            self.rebalance()
            self._next_cycle = time.monotonic() + self.s.renew_every_s
        if self.step():
            return False
        if self.burst and len(self._idle) == len(self.parts):
            return not self._free_partitions()
        self.wait()
        return False

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        if self.stopping.is_set():
            log.warning("second stop signal: exiting now")
            os._exit(1)
        log.info("stop requested: finishing the batch, then snapshot and release")
        self.stopping.set()

    def shutdown(self) -> None:
        for p in sorted(self.parts):
            try:
                self.hand_over(p)
            except ERRORS as e:
                log.warning("could not release partition %d cleanly: %s", p, e)
        self.keeper.stop()
        with contextlib.suppress(*ERRORS):
            self.keeper.leave()
        log.info("worker %s stopped", self.s.worker_id)

    def check_meta(self) -> None:
        meta = self.keys.meta
        self.client.hsetnx(meta, "partitions", self.s.partitions)
        self.client.hsetnx(meta, "protocol", PROTOCOL)
        stored = {k.decode(): v.decode() for k, v in self.client.hgetall(meta).items()}
        if int(stored["partitions"]) != self.s.partitions:
            raise SettingsError(
                f"MEMNET_PARTITIONS is {self.s.partitions}, but this deployment ({meta}) has "
                f"{stored['partitions']} partitions; the count is fixed once set"
            )
        if int(stored["protocol"]) != PROTOCOL:
            raise SettingsError(
                f"{meta} speaks protocol {stored['protocol']}, this worker speaks {PROTOCOL}"
            )

    # ---- ownership -----------------------------------------------------------------------
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
        self._report_lag()

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

    # ---- the data path -------------------------------------------------------------------
    def step(self) -> bool:
        """Read and process one batch per owned partition; True if any had entries."""
        worked = False
        for p in sorted(self.parts):
            part = self.parts.get(p)
            if part is None or self.stopping.is_set():
                continue
            try:
                entries = self.read(part)
            except Fenced as e:
                self.drop(p, str(e))
                continue
            if entries:
                worked = True
                self._idle.discard(p)
                self.process(part, entries)
            else:
                self._idle.add(p)
            if p in self.parts and part.snapshot_due(
                self.s.snapshot_every_entries, self.s.snapshot_every_s
            ):
                self.snapshot(part)
        return worked

    def read(self, part: Partition) -> list[tuple[str, dict[bytes, Any]]]:
        key = self.keys.inp(part.number)
        if part.replay_until is not None:
            low = f"({part.position}" if part.position else "-"
            entries = self.client.xrange(
                key, min=low, max=part.replay_until, count=self.s.batch_size
            )
            if len(entries) < self.s.batch_size:
                part.replay_until = None
                if not entries:
                    self._tidy(part)
            return [(text(i), f) for i, f in entries]
        reply = fenced(
            self.scripts.read,
            keys=[self.keys.part(part.number, "epoch"), key],
            args=[part.epoch, self.s.worker_id, self.s.batch_size],
        )
        return _entries(reply)

    def process(self, part: Partition, entries: list[tuple[str, dict[bytes, Any]]]) -> None:
        started = time.perf_counter()
        try:
            batch = part.handle(entries)
        except Exception:
            log.exception(
                "partition %d: unexpected error applying a batch; reloading it", part.number
            )
            metrics.ERRORS.labels("process").inc()
            self._release(part)
            self.drop(part.number, "unexpected error while applying")
            return
        if self.commit(part, batch):
            for op, n in batch.counts.items():
                if op == "dead":
                    metrics.DEAD_LETTERS.inc(n)
                else:
                    metrics.ENTRIES.labels(op).inc(n)
            metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    def commit(self, part: Partition, batch: Batch) -> bool:
        p = part.number
        keys = [
            self.keys.part(p, "epoch"),
            self.keys.inp(p),
            self.keys.out(p),
            self.keys.dead(p),
            self.keys.part(p, "offset"),
        ]
        args: list[Any] = [
            part.epoch,
            batch.last_id,
            self.s.response_maxlen,
            len(batch.responses),
            len(batch.dead),
        ]
        for entry_id, msg in batch.responses + batch.dead:
            args += [entry_id, msg]
        args += batch.acks
        delay = 0.05
        while True:
            try:
                fenced(self.scripts.commit, keys=keys, args=args)
                part.uncommitted = False
                return True
            except Fenced as e:
                self.drop(p, str(e))
                return False
            except ERRORS as e:  # the commit is idempotent: retry until it lands or we stop
                if self.stopping.is_set():
                    log.warning("partition %d: giving up commit on stop: %s", p, e)
                    return False
                log.warning("partition %d: commit failed (%s); retrying", p, e)
                self._resync = True
                self.stopping.wait(delay)
                delay = min(2.0, delay * 2)

    def snapshot(self, part: Partition) -> None:
        started = time.perf_counter()
        try:
            part.snapshot()
        except StaleSnapshot as e:
            self.drop(part.number, str(e))
            return
        except (SnapshotError, OSError) as e:
            log.error("partition %d: snapshot failed (will retry): %s", part.number, e)
            metrics.ERRORS.labels("snapshot").inc()
            return
        metrics.SNAPSHOT_SECONDS.observe(time.perf_counter() - started)
        point = part.trim_point()
        if point is not None:
            p = part.number
            try:
                fenced(
                    self.scripts.trim,
                    keys=[
                        self.keys.part(p, "epoch"),
                        self.keys.inp(p),
                        self.keys.part(p, "trimmed"),
                    ],
                    args=[part.epoch, point],
                )
            except Fenced as e:
                self.drop(p, str(e))

    def _tidy(self, part: Partition) -> None:
        try:
            fenced(
                self.scripts.tidy,
                keys=[self.keys.part(part.number, "epoch"), self.keys.inp(part.number)],
                args=[part.epoch, self.s.worker_id],
            )
        except Fenced as e:
            self.drop(part.number, str(e))

    def wait(self) -> None:
        """Block until an owned input stream has new entries (or block_ms passes)."""
        parts = dict(self.parts)
        if not parts or self.cluster:
            self.stopping.wait(self.s.block_ms / 1000 if not parts else 0.002)
            return
        streams = {self.keys.inp(p): part.seen or "0-0" for p, part in parts.items()}
        self.client.xread(streams, count=1, block=self.s.block_ms)

    # ---- faults --------------------------------------------------------------------------
    def _on_redis_error(self, error: Exception) -> None:
        self._backoff = min(5.0, max(0.1, self._backoff * 2))
        log.warning("Redis unavailable (%s); retrying in %.1f s", error, self._backoff)
        metrics.ERRORS.labels("redis").inc()
        self._resync = True
        self.stopping.wait(self._backoff)

    def _resynchronise(self) -> None:
        """After a Redis error: entries delivered to us may never have reached us, and a
        restarted Redis may have lost acknowledged writes. Re-plan every partition's replay
        from Redis's own state, rebuilding from its snapshot if Redis restarted. Raises (and
        stays due) while Redis is unreachable."""
        run_id = self._redis_run_id()
        restarted = run_id != self._run_id
        for p in sorted(self.parts):
            part = self.parts[p]
            if restarted or part.uncommitted:
                # Redis may have lost acknowledged writes: rebuild from snapshot and replay.
                fresh = Partition(
                    p,
                    part.epoch,
                    self.engine,
                    part.store,
                    self.s.partitions,
                    self.s.max_message_bytes,
                )
                if not self._restore(fresh):
                    self.drop(p, "cannot rebuild after Redis restarted")
                    continue
                with self._lock:
                    self.parts[p] = fresh
                part = fresh
            self._plan_replay(part)
        self._run_id = run_id  # only now: a failure above leaves the rebuild due
        self._resync = False

    def _redis_run_id(self) -> str:
        """Identifies the Redis process(es): a change means Redis restarted."""
        if self.cluster:
            info = self.client.info("server", target_nodes=RedisCluster.ALL_NODES)
            return ",".join(sorted(str(v.get("run_id")) for v in info.values()))
        try:
            return str(self.client.info("server").get("run_id"))
        except redis.ResponseError:  # no INFO (fakeredis, or an ACL without it)
            self.client.connection_pool.disconnect()  # fakeredis garbles the next reply
            return "unknown"

    def _report_lag(self) -> None:
        for p in list(self.parts):
            try:
                groups = self.client.xinfo_groups(self.keys.inp(p))
            except redis.ResponseError:  # the stream is gone (deleted by hand)
                continue
            lag = next((g.get("lag") for g in groups if text(g["name"]) == GROUP), None)
            metrics.LAG.labels(str(p)).set(-1 if lag is None else lag)


@contextlib.contextmanager
def credentials_checked() -> Iterator[None]:
    """Turn Redis's refusal of our credentials or rights into a start-up error."""
    try:
        yield
    except redis.AuthenticationError as e:
        raise SettingsError(f"REDIS_URL: Redis refused the credentials ({e})") from None
    except redis.exceptions.NoPermissionError as e:
        raise SettingsError(
            f"REDIS_URL: the Redis user lacks a permission the worker needs ({e}); it needs "
            "stream, string, hash, sorted-set and scripting commands on the prefix's keys"
        ) from None


def open_store(settings: Settings, p: int, engine: Engine) -> Snapshots:
    """The snapshot store of partition p: a directory every worker can reach."""
    return SnapshotStore(Path(settings.snapshot_dir) / f"p{p}", engine, settings.snapshots_kept)


def _entries(reply: Any) -> list[tuple[str, dict[bytes, Any]]]:
    """Normalise an XREADGROUP reply from a script into [(id, {field: value})]."""
    if not reply:
        return []
    if isinstance(reply[0], bytes):  # fakeredis returns a single stream without nesting
        reply = [reply]
    out = []
    for _stream, entries in reply:
        for entry_id, fields in entries:
            flat = fields or []
            out.append((text(entry_id), dict(zip(flat[::2], flat[1::2], strict=True))))
    return out


def serve(settings: Settings, burst: bool = False) -> None:
    """Run a worker with signal handling (the ``memnet worker`` command)."""
    delay = 0.1
    while True:
        try:
            with credentials_checked():
                worker = Worker(settings)
            break
        except ERRORS as e:
            log.warning("Redis unavailable (%s); retrying in %.1f s", e, delay)
            time.sleep(delay)
            delay = min(5.0, delay * 2)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    worker.run(burst=burst)
