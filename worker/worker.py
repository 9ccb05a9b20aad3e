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
import ctypes
import gc
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
from worker import metrics
from worker.connection import ERRORS, connect, is_cluster
from worker.leases import LeaseKeeper
from worker.ownership import Ownership
from worker.partition import Batch, Partition
from worker.protocol import PROTOCOL, Keys
from worker.scripts import Fenced, Scripts, fenced
from worker.settings import Settings, SettingsError, redact
from worker.streams import Entries, StreamIO

log = logging.getLogger(__name__)


class Worker(Ownership):
    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.s = settings
        self.keys = Keys(settings.prefix)
        if engine is None:
            if settings.model is None:
                raise SettingsError("MEMNET_MODEL is not set: give the model file to serve")
            engine = Engine(
                load_model(settings.model), cache_dir=Path(settings.snapshot_dir) / "index-cache"
            )
        self.engine = engine
        self.client = connect(settings.redis_url, timeout_s=settings.block_ms / 1000 + 5)
        self.scripts = Scripts(self.client)
        self.io = StreamIO(
            self.client,
            self.scripts,
            self.keys,
            settings.worker_id,
            settings.batch_size,
            settings.response_maxlen,
        )
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
        # One step applies a batch of every owned partition with one engine call.
        self.engine.warm_up(self.s.batch_size * self.s.partitions)
        release_free_heap()
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

    # ---- the data path -------------------------------------------------------------------
    def step(self) -> bool:
        """Read every owned partition in one round trip, apply all their entries with one
        engine call, commit every batch in one round trip; True if there was work."""
        parts = [self.parts[p] for p in sorted(self.parts)]
        if not parts or self.stopping.is_set():
            return False
        work = {}
        for part, got in self._read_all(parts).items():
            if isinstance(got, Fenced):
                self.drop(part.number, str(got))
            elif isinstance(got, Exception):
                raise got
            elif got:
                work[part] = got
                self._idle.discard(part.number)
            else:
                self._idle.add(part.number)
                if part.replay_until is None and not part.tidy:
                    self._tidy(part)
        if work:
            self.process(work)
        for part in parts:
            every = (self.s.snapshot_every_entries, self.s.snapshot_every_s)
            if part.number in self.parts and part.snapshot_due(*every):
                self.snapshot(part)
        return bool(work)

    def _read_all(self, parts: list[Partition]) -> dict[Partition, Any]:
        out: dict[Partition, Any] = {p: self.io.replay(p) for p in parts if p.replay_until}
        live = [p for p in parts if p not in out]
        if live:
            out.update(self.io.read(live))
        return out

    def read(self, part: Partition) -> Entries:
        """One partition's next entries (raises Fenced if it was lost)."""
        got = self._read_all([part])[part]
        if isinstance(got, Exception):
            raise got
        return got

    def process(self, work: dict[Partition, Entries]) -> None:
        started = time.perf_counter()
        try:
            pending = {part: part.prepare(entries) for part, entries in work.items()}
            results = self.engine.process([it for p in pending.values() for it in p.items])
            batches, at = {}, 0
            for part, p in pending.items():
                batches[part] = part.finish(p, results[at : at + len(p.items)])
                at += len(p.items)
        except Exception:
            log.exception("unexpected error applying a batch; reloading its partitions")
            metrics.ERRORS.labels("process").inc()
            for part in work:
                self._release(part)
                self.drop(part.number, "unexpected error while applying")
            return
        committed = self.commit_all(batches)
        for batch in (b for part, b in batches.items() if committed.get(part)):
            for op, n in batch.counts.items():
                metrics.DEAD_LETTERS.inc(n) if op == "dead" else metrics.ENTRIES.labels(op).inc(n)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    def commit(self, part: Partition, batch: Batch) -> bool:
        return self.commit_all({part: batch})[part]

    def commit_all(self, batches: dict[Partition, Batch]) -> dict[Partition, bool]:
        """Commit in one round trip; retried until it lands, the partition is lost, or we
        stop (committing is idempotent)."""
        done: dict[Partition, bool] = {}
        delay = 0.05
        while batches:
            try:
                outcome = self.io.commit(batches)
            except ERRORS as e:
                if self.stopping.is_set():
                    log.warning("giving up a commit on stop: %s", e)
                    return {**done, **dict.fromkeys(batches, False)}
                log.warning("commit failed (%s); retrying", e)
                self._resync = True
                self.stopping.wait(delay)
                delay = min(2.0, delay * 2)
                continue
            for part, error in outcome.items():
                if isinstance(error, Fenced):
                    self.drop(part.number, str(error))
                elif error is not None:
                    raise error
                else:
                    part.uncommitted = False
                done[part] = error is None
            batches = {}
        return done

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
        """Once replay is over, drop the group's other consumers (nothing pending there)."""
        part.tidy = True
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


def release_free_heap() -> None:
    """After start-up: hand the heap that loading and compiling freed back to the OS
    (glibc keeps it), and move start-up objects out of the collector's sight (fewer and
    shorter GC pauses on the data path)."""
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
