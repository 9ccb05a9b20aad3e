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
SIGTERM: finish the batch, snapshot (for at most MEMNET_STOP_SNAPSHOT_S), release the leases,
exit. A second one exits at once. Nothing else ends a serving worker: faults are contained
(worker/faults.py, worker/ownership.py).
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
from collections.abc import Callable, Iterator
from typing import Any

import redis

from memnet import Engine, ModelFileError, SnapshotError, load_model, quantized
from memnet.batching import keep_compilations
from memnet.errors import CorruptBlob, SnapshotAborted, StaleSnapshot
from worker import metrics
from worker.connection import Client, connect, is_cluster, text
from worker.dead import log_dead_letters
from worker.faults import (
    UNAVAILABLE,
    Backoff,
    Kind,
    Throttled,
    classify,
    read_only,
)
from worker.leases import LeaseKeeper
from worker.meta import Meta, record
from worker.ownership import Ownership, claim_store, deployed_model
from worker.partition import Batch, Partition, Pending
from worker.permissions import acl_rules
from worker.protocol import Keys
from worker.scripts import PROBE, Scripts
from worker.settings import Settings, SettingsError, redact
from worker.streams import Entries

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 3600.0  # archive retention on a partition without input (Ownership.prune)
ALONE_S = 60.0  # after an engine failure, each partition's batch goes alone this long


class Worker:
    """The loop: read every owned partition, apply with the engine, commit, snapshot.

    Ownership (``self.owner``) holds the partitions and makes every epoch-checked call;
    faults of one partition stay with it (``Ownership.contain``); a fault of the loop itself
    -- Redis unreachable, or anything unexpected -- backs the loop off (``_on_fault``).
    """

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.s = settings
        self.keys = Keys(settings.prefix)
        if settings.scan:
            quantized.set_path(settings.scan)
        if engine is None:
            if settings.model is None:
                raise SettingsError("MEMNET_MODEL is not set: give the model file to serve")
            try:
                model = load_model(settings.model)
            except ModelFileError as e:  # (the message names the file; say which setting)
                raise SettingsError(f"MEMNET_MODEL: {e}") from None
            engine = Engine(model, cache_dir=settings.cache_dir)
        self.engine = engine
        self.client = connect(settings.redis_url, timeout_s=settings.block_ms / 1000 + 5)
        self.scripts = Scripts(self.client)
        self.cluster = is_cluster(self.client)
        self.owner = Ownership(settings, self.client, self.scripts, engine, self.snapshot)
        values = record(settings, engine.model)
        model_name = str(settings.model or engine.model.fingerprint[:12])
        self.meta = Meta(
            self.client, self.keys, values, model_name, lambda: deployed_model(settings)
        )
        self.stopping = threading.Event()
        self._stop_at: float | None = None
        self._progress = time.monotonic()
        self._alone_until = 0.0  # (Worker.process: after an engine failure)
        self._started = time.monotonic()
        self._next_cycle = 0.0
        self.backoff = Backoff(base_s=0.1, cap_s=5.0)
        self._faulted_at = 0.0  # the loop's last fault (time.monotonic())
        self.throttled = Throttled(log)
        self._snapshot_failing: set[int] = set()  # partitions whose last snapshot failed
        self._resync = False  # a Redis call failed: re-plan from Redis's state before reading
        self.burst = False
        # In a cluster the keeper's calls time out well within a lease: one node that stops
        # answering must not hold the renewals of the other leases past their expiry. (A
        # standalone Redis that is slow is slow for every lease: no shorter timeout there.)
        quick = min(5.0, settings.lease_ms / 4000) if self.cluster else 5.0
        keeper_client = connect(settings.redis_url, timeout_s=quick)
        self.owner.quick = keeper_client
        self.keeper = LeaseKeeper(
            settings,
            keeper_client,
            self.owner.owned,
            self.owner.holding,
            self.owner.mark_lost,
            lambda: self._progress,
            stall_s=settings.stall_s,
            meta=lambda client: Meta(
                client, self.keys, values, model_name, lambda: deployed_model(settings)
            ),
        )

    @property
    def parts(self) -> dict[int, Partition]:
        return self.owner.parts

    def last_progress(self) -> float | None:
        """time.monotonic() of the loop's last pass; None while starting up or stopping
        (what /healthz reads, worker/health.py)."""
        serving = self.keeper.is_alive() and not self.stopping.is_set()
        return self._progress if serving else None

    # ---- lifecycle -----------------------------------------------------------------------
    def run(self, burst: bool = False) -> None:
        """Serve until stopped; with burst, stop once every partition it holds is drained."""
        self.burst = burst
        # Compile first, join after: a worker that joins takes its share at once, which
        # keeps takeovers after a crash short.
        # One step applies a batch of every owned partition with one engine call.
        self.engine.warm_up(self.s.batch_size * self.s.partitions)
        release_free_heap(self.s.gc_threshold)
        self._progress = time.monotonic()  # (compiling took time: not a stalled loop)
        self._until_reachable(self._start_up)
        self.keeper.start()
        self._started = time.monotonic()
        try:
            while not self.stopping.is_set():
                try:
                    if self._loop_once():
                        break
                    self._recovered()
                except Exception as e:  # only a stop signal ends a serving worker
                    self._faulted_at = time.monotonic()
                    self._on_fault(e)
        finally:
            self.shutdown()

    def follow_model(self) -> None:
        """Serve only while this worker's model is the deployment's (memnet deploy)."""
        active = self.keeper.meta.active
        if active == self.owner.active:
            return
        self.owner.active = active
        model = self.engine.model.fingerprint[:12]
        if active:
            log.info("model %s is the deployment's now: taking partitions", model)
        else:
            log.warning(
                "model %s is not the one the deployment serves: handing partitions over, "
                "taking none (memnet deploy switched models; stop this worker)",
                model,
            )

    def _start_up(self) -> None:
        self.scripts.load()
        self.keeper.scripts.load()
        probe_rights(self.client, self.keys)
        claim_store(self.s)
        self.meta.check_at_start(self.keeper.others_alive, wait_s=2 * self.s.lease_ms / 1000)
        self.keeper.meta.active = self.meta.active
        self.follow_model()
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
        while True:
            try:
                with credentials_checked(self.s.prefix):
                    action()
                self.throttled.clear("start-up", "Redis reachable: serving")
                return
            except UNAVAILABLE as e:
                if self.stopping.is_set():
                    raise
                delay = self.backoff.fail()
                self.throttled.log(  # (once a minute: a wrong host or a Redis not started yet)
                    "start-up", logging.WARNING, "Redis unavailable at start-up (%s); retrying "
                    "in %.1f s", e, delay,
                )  # fmt: skip
                self.stopping.wait(delay)
                self._progress = time.monotonic()
                self.throttled.flush()

    def _loop_once(self) -> bool:
        """One pass; True when a burst run is done."""
        self._progress = time.monotonic()
        self.throttled.flush()  # (lines held back, told within their minute)
        self.owner.throttled.flush()
        self.owner.drop_lost()
        if self._resync:
            self._resynchronise()
        self.follow_model()
        if self.burst and not self.owner.active and not self.parts:
            return True
        if time.monotonic() >= self._next_cycle or self.owner.rebuild_due:
            grace = self.burst or time.monotonic() - self._started >= self.s.renew_every_s
            self._next_cycle = time.monotonic() + self.s.renew_every_s  # even if it fails
            self.owner.rebalance(self.keeper.members, grace)
        if self.step():
            return False
        self.resident_gauges()  # (partitions taken, handed over or dropped in this pass)
        if self.burst and len(self.owner.idle) == len(self.parts):
            return not self.owner.free_partitions()
        self.wait()
        return False

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        if self.stopping.is_set():
            log.warning("second stop signal: exiting now")
            os._exit(1)
        log.info("stop requested: finishing the batch, then snapshot and release")
        self._stop_at = time.monotonic()
        self.stopping.set()

    def shutdown(self) -> None:
        """Hand every partition over: final snapshots for as long as MEMNET_STOP_SNAPSHOT_S
        allows (from the stop signal), so stopping takes seconds whatever the number of
        memories; a partition whose snapshot does not fit is released with its previous one
        (its next owner replays a little more)."""
        deadline = (self._stop_at or time.monotonic()) + self.s.stop_snapshot_s
        for p in sorted(self.parts):
            try:
                self.owner.hand_over(p, abort=lambda: time.monotonic() > deadline)
            except Exception as e:
                log.warning("could not release partition %d cleanly: %s", p, e)
        self.resident_gauges()  # (nothing resident is left)
        self.keeper.stop()
        if self.keeper.is_alive():  # (never started when driven by hand, as tests do)
            self.keeper.join(timeout=2 * self.s.lease_ms / 1000)  # (its tick would re-join)
        with contextlib.suppress(Exception):
            self.keeper.leave()
        log.info("worker %s stopped", self.s.worker_id)

    # ---- the data path -------------------------------------------------------------------
    def step(self) -> bool:
        """Read every owned partition in one round trip, apply all their entries with one
        engine call, commit every batch in one round trip; True if there was work."""
        parts = [self.parts[p] for p in sorted(self.parts)]
        if not parts or self.stopping.is_set():
            return False
        parts = self.ready_parts(parts)
        work = {}
        for part, got in self.owner.read(parts).items():
            if isinstance(got, Exception):
                self.owner.contain(part, got)
            elif got:
                work[part] = got
                self.owner.idle.discard(part.number)
            else:
                self.idle(part)
        if work:
            self.process(work)
        for part in parts:
            every = (self.s.snapshot_every_entries, self.s.snapshot_every_s)
            if self.parts.get(part.number) is part and part.snapshot_due(*every):
                self.snapshot(part, self.stopping.is_set)
        return bool(work)

    def ready_parts(self, parts: list[Partition]) -> list[Partition]:
        """The partitions to read in this pass: in a cluster, one whose node was out of
        reach is tried again alone once its backoff has passed (_tried_again); the others
        are not held up."""
        unreachable = self.owner.unreachable
        return [part for part in parts if part.number not in unreachable or self._tried_again(part)]

    def _tried_again(self, part: Partition) -> bool:
        """A partition out of reach, its backoff passed: its node pinged, the batch it holds
        committed, its replay planned again (entries a failed read delivered); whether it
        may read now (out of reach again, it waits longer)."""
        if not self.owner.unreachable[part.number].ready:
            return False
        with self.owner.contained(part):
            self.owner.probe(part)
            if part.held is not None and self.owner.commit({part: part.held})[part]:
                self.committed(part, part.held)
                part.held = None
            if part.held is None and self.parts.get(part.number) is part:
                self.owner.plan_replay(part)
                self.owner.reachable(part)
        return part.number not in self.owner.unreachable and self.parts.get(part.number) is part

    def idle(self, part: Partition) -> None:
        """A partition read nothing: tidy it after its replay, prune its archive hourly."""
        self.owner.idle.add(part.number)
        if part.replay_until is None and not part.tidy:
            self.owner.tidy(part)
        if self.s.archive_days and time.monotonic() - part.pruned_at >= PRUNE_EVERY_S:
            self.owner.prune_quietly(part)  # (retention without input to trim)
        if self.parts.get(part.number) is part:  # (read, tidied: nothing failed)
            self.owner.served(part)

    def process(self, work: dict[Partition, Entries]) -> None:
        started = time.perf_counter()
        pending = {}
        for part, entries in work.items():
            try:  # (fetching memories from the store can fail: that partition only)
                pending[part] = part.prepare(entries)
            except Exception as e:
                metrics.ERRORS.labels("prepare").inc()
                self.owner.contain(part, e)
        batches = self.apply(pending)
        if not batches:
            return
        committed = self.commit_all(batches)
        for part, batch in batches.items():
            if committed.get(part):
                self.committed(part, batch)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        self.resident_gauges()

    def committed(self, part: Partition, batch: Batch) -> None:
        """A batch landed: count it, tell its dead letters."""
        for op, n in batch.counts.items():
            metrics.DEAD_LETTERS.inc(n) if op == "dead" else metrics.ENTRIES.labels(op).inc(n)
        if batch.dead:
            log_dead_letters(self.throttled, part.number, batch.dead)

    def apply(self, pending: dict[Partition, Pending]) -> dict[Partition, Batch]:
        """The engine's results for every partition's pending batch, as the batches to
        commit. One engine call for all of them. A failure there is a bug, not bad input
        (that is dead-lettered): the partitions of the call are reloaded (contained), and for
        ALONE_S each partition's batch then goes in a call of its own, so a failure that
        comes back stays with its partition (the same results: batching never changes
        them)."""
        batches: dict[Partition, Batch] = {}
        alone = time.monotonic() < self._alone_until
        for group in [{p: q} for p, q in pending.items()] if alone else [pending]:
            try:
                results = self.engine.process([it for q in group.values() for it in q.items])
                at = 0
                for part, q in group.items():
                    batches[part] = part.finish(q, results[at : at + len(q.items)])
                    at += len(q.items)
            except Exception as e:
                metrics.ERRORS.labels("process").inc()
                self._alone_until = time.monotonic() + ALONE_S
                for part in group:  # (none of the group commits: each is reloaded)
                    batches.pop(part, None)
                    self.owner.contain(part, e)
        return batches

    def resident_gauges(self) -> None:
        parts = list(self.parts.values())
        metrics.RESIDENT_MEMORIES.set(sum(len(p.memories) for p in parts))
        metrics.RESIDENT_BYTES.set(sum(p.resident_bytes for p in parts))

    def commit_all(self, batches: dict[Partition, Batch]) -> dict[Partition, bool]:
        """Commit in one round trip; sent again until it lands, the partition is lost, or we
        stop (committing is idempotent)."""
        while True:
            try:
                return self.owner.commit(batches)
            except Exception as e:  # (a script's OOM is a ResponseError: read, not caught by class)
                if classify(e) is not Kind.UNAVAILABLE:
                    raise
                self._reconnect_after_failover(e)
                self._resync = True
                self._faulted_at = time.monotonic()
                if self.stopping.is_set():
                    log.warning("giving up a commit on stop: %s", e)
                    return dict.fromkeys(batches, False)
                delay = self.backoff.fail()
                self.throttled.log(
                    Kind.UNAVAILABLE.name,
                    logging.WARNING,
                    "Redis unavailable: commit failed (%s); retrying in %.1f s",
                    e,
                    delay,
                )
                self.stopping.wait(delay)
                self._progress = time.monotonic()  # alive, backing off: not a stalled loop

    def snapshot(self, part: Partition, abort: Callable[[], bool] | None = None) -> None:
        """Snapshot a partition, then trim its input below the oldest kept snapshot. A
        snapshot that cannot be written (full or read-only store) leaves the partition
        serving: retried with backoff, the input untrimmed meanwhile, logged once a minute."""
        started = time.perf_counter()
        p = part.number
        try:
            part.snapshot(abort)
            point = part.trim_point()
        except StaleSnapshot as e:
            self.owner.drop(p, str(e))
            return
        except SnapshotAborted as e:
            log.info("partition %d: %s (the next owner replays from the previous one)", p, e)
            return
        except CorruptBlob as e:  # (moved aside: taken again from a snapshot without it)
            self.owner.contain(part, e)
            return
        except Exception as e:  # SnapshotError expected; anything else contained the same way
            delay = part.snapshot_retry.fail()
            metrics.ERRORS.labels("snapshot").inc()
            self._snapshot_failing.add(p)
            self.throttled.log(
                "snapshot",
                logging.ERROR,
                "partition %d: snapshot failed (%s); serving on, next try in %.0f s, "
                "input not trimmed until a snapshot succeeds",
                p,
                e,
                delay,
                exc_info=None if isinstance(e, SnapshotError) else e,
            )
            return
        self._snapshot_failing &= set(self.parts) - {p}  # (one line for a fault of the store:
        if not self._snapshot_failing:  # told again only once none fails, not when one works)
            self.throttled.clear("snapshot", "snapshots succeed again (partition %d)", p)
        self.resident_gauges()  # (the snapshot let memories be evicted)
        metrics.SNAPSHOT_SECONDS.observe(time.perf_counter() - started)
        if point is not None:
            self.owner.trim(part, point)

    def wait(self) -> None:
        """Block until an owned input stream has new entries (or block_ms passes)."""
        parts = dict(self.parts)
        if not parts or self.cluster:
            self.stopping.wait(self.s.block_ms / 1000 if not parts else 0.002)
            return
        streams = {self.keys.inp(p): part.seen or "0-0" for p, part in parts.items()}
        self.client.xread(streams, count=1, block=self.s.block_ms)

    # ---- faults of the loop --------------------------------------------------------------
    def _reconnect_after_failover(self, error: Exception) -> None:
        """On a replica's READONLY, drop every connection: the next ones resolve REDIS_URL's
        host again (a failover moved the primary; redis-py keeps its connections)."""
        if read_only(error):
            for client in (self.client, self.keeper.client):
                with contextlib.suppress(Exception):
                    client.connection_pool.disconnect()

    def _on_fault(self, error: Exception) -> None:
        kind = classify(error)
        self._reconnect_after_failover(error)
        delay = self.backoff.fail()
        metrics.ERRORS.labels("redis" if kind is Kind.UNAVAILABLE else "loop").inc()
        self.throttled.log(
            kind.name,
            logging.WARNING if kind is Kind.UNAVAILABLE else logging.ERROR,
            "%s (%s); retrying in %.1f s",
            kind.value,
            error,
            delay,
            exc_info=error if kind is Kind.OTHER else None,
        )
        self._resync = True
        self.stopping.wait(delay)

    def _recovered(self) -> None:
        """After a pass without a fault: the loop's backoff starts over, its fault lines end.
        Only once a pass began a full rebalance period after the last fault (so it ran the
        rebalance too): passes that touch Redis less often than others (the rebalance, or
        no Redis at all without partitions) would otherwise reset a fault that persists."""
        if self.backoff.failures and self._progress - self._faulted_at >= self.s.renew_every_s:
            self.backoff.reset()
            for kind in Kind:
                self.throttled.clear(kind.name, "the worker loop works again")

    def _resynchronise(self) -> None:
        """After a fault: entries delivered to us may never have reached us. Re-plan every
        partition's replay from Redis's own state; a partition whose last batch was never
        committed is taken again (rebuilt from its snapshot). That Redis lost data is found
        by the fenced scripts (worker/scripts.py). Raises (and stays due) while Redis is
        unreachable."""
        for p in sorted(self.parts):
            part = self.parts[p]
            with self.owner.contained(part):
                if part.uncommitted:
                    self.owner.rebuild(part, "its last batch may not have been committed")
                else:
                    self.owner.plan_replay(part)
        self._resync = False


# glibc's defaults; set explicitly, they no longer move (see release_free_heap).
MMAP_THRESHOLD_BYTES = TRIM_THRESHOLD_BYTES = 128 << 10
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def release_free_heap(gc_threshold: int) -> None:
    """After start-up: hand the heap that loading and compiling freed back to the OS
    (glibc keeps it), and move start-up objects out of the collector's sight (fewer and
    shorter GC pauses on the data path).

    Then collect less often (``collect_less``) and pin glibc's mmap threshold. Left
    dynamic, it rises to the size of the largest block freed (up to 32 MiB), so a batch's
    arrays of a few MB come from the heap from then on, and the heap only grows (seen in
    the state drill's smaps). Pinned, those arrays are mapped and returned to the OS when
    freed."""
    gc.collect()
    gc.freeze()
    collect_less(gc_threshold)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def collect_less(gc_threshold: int) -> None:
    """Let gc_threshold container objects be allocated between young collections of the
    cyclic garbage collector (MEMNET_GC_THRESHOLD). A step allocates tens of thousands
    (entries, messages, events, results, a memory and its row for each new name), so at
    Python's 700 the collector ran dozens of times a step, and every young collection that
    promotes survivors brings the next full one (each resident memory examined) closer.
    With 100,000 small memories one worker served 12% and 20% more events/s at 10,000 than
    at 700 (two pairs of `scripts/bench_small.py` runs, one with MEMNET_GC_THRESHOLD=700),
    and 4% more at 100,000 than at 10,000 (three alternating pairs of that workload end to
    end: a step's objects then mostly die before a young collection looks at them).
    Garbage without cycles is freed at once either way; cycles wait a little longer."""
    gc.set_threshold(gc_threshold, *gc.get_threshold()[1:])


@contextlib.contextmanager
def credentials_checked(prefix: str) -> Iterator[None]:
    """Turn Redis's refusal of our credentials or rights into a start-up error."""
    try:
        yield
    except redis.AuthenticationError as e:
        raise SettingsError(f"REDIS_URL: Redis refused the credentials ({e})") from None
    except redis.exceptions.NoPermissionError as e:
        raise SettingsError(
            f"REDIS_URL: the Redis user lacks a permission the worker needs ({e}); give it "
            f"these ACL rules (docs/reliability.md): {' '.join(acl_rules(prefix))}"
        ) from None


def probe_rights(client: Client, keys: Keys) -> None:
    """Use, once, each command the worker needs outside its scripts (and DEL, which a script
    uses), so a missing ACL right stops start-up naming the command instead of surfacing at
    the first rebalance or handover."""
    probe = keys.part(0, "probe")
    client.ping()
    client.time()
    client.exists(keys.meta)
    client.delete(probe)
    client.get(probe)
    client.xread({probe: "0-0"}, count=1)
    client.xlen(probe)
    try:
        client.xinfo_groups(probe)
    except redis.exceptions.NoPermissionError:
        raise
    except redis.ResponseError:
        pass  # "no such key": the expected answer
    probes = [probe, keys.part(0, "probe-string"), keys.part(0, "probe-zset")]
    refused = text(client.eval(PROBE, len(probes), *probes))  # (the scripts' commands)
    if refused:
        raise redis.exceptions.NoPermissionError(
            f"this user has no permissions to run the '{refused[0].lower()}' command, which "
            f"the worker's scripts use ({refused[1]})"
        )


def serve(
    settings: Settings,
    burst: bool = False,
    on_worker: Callable[[Worker], None] | None = None,
    stopped: threading.Event | None = None,
) -> None:
    """Run a worker with signal handling (the ``memnet worker`` command); ``on_worker`` is
    given the worker once it exists (the health server reads its progress)."""
    keep_compilations(settings.cache_dir)  # (a restart or takeover then warms up faster)
    backoff, throttled = Backoff(base_s=0.1, cap_s=5.0), Throttled(log)
    while True:
        try:
            with credentials_checked(settings.prefix):
                worker = Worker(settings)
            break
        except UNAVAILABLE as e:  # (once a minute: a wrong host, or Redis not started yet)
            delay = backoff.fail()
            throttled.log(
                "start-up", logging.WARNING, "Redis unavailable (%s, REDIS_URL %s); retrying "
                "in %.1f s", e, redact(settings.redis_url), delay,
            )  # fmt: skip
            time.sleep(delay)
            throttled.flush()
    if on_worker is not None:
        on_worker(worker)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    if stopped is not None and stopped.is_set():  # a SIGTERM during start-up was not lost
        worker.request_stop()
    worker.run(burst=burst)
