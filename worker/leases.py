"""Membership and leases: who is alive, how many partitions each should own, renewals.

Live workers heartbeat into a sorted set scored by expiry (Redis's clock, so worker clocks
do not matter). Each worker's fair share is floor(P/N) or ceil(P/N) by its rank among the
live ids, so shares always add up to P and ownership converges without coordination. Leases
are renewed by a background thread, so a long snapshot does not cost ownership -- but only
while the main loop keeps making progress: a stalled loop lets its leases expire. The same
thread re-asserts the deployment's record (worker/meta.py) each round.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import redis

from worker import metrics
from worker.connection import Client, text
from worker.faults import Kind, Throttled, classify
from worker.meta import Meta
from worker.protocol import GROUP, Keys
from worker.scripts import Scripts
from worker.settings import Settings

log = logging.getLogger(__name__)


def fair_share(partitions: int, live: list[str], me: str) -> int:
    """How many partitions ``me`` should own among the live workers."""
    members = sorted(set(live) | {me})
    base, extra = divmod(partitions, len(members))
    return base + (1 if members.index(me) < extra else 0)


class LeaseKeeper(threading.Thread):
    """Heartbeats and renews this worker's leases every third of the lease."""

    def __init__(
        self,
        settings: Settings,
        client: Client,
        owned: Callable[[], dict[int, int]],
        holding: Callable[[int, int], AbstractContextManager[bool]],
        on_lost: Callable[[int, int, bool], None],
        last_progress: Callable[[], float],
        stall_s: float,
        meta: Callable[[Client], Meta],
    ) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.settings = settings
        self.keys = Keys(settings.prefix)
        self.client = client
        self.scripts = Scripts(client)
        self.owned = owned
        self.holding = holding
        self.on_lost = on_lost
        self.last_progress = last_progress
        self.stall_s = stall_s
        self._lag_shown: set[int] = set()  # partitions whose lag this worker exports
        self.meta = meta(client)
        self.members: list[str] = []
        self.throttled = Throttled(log)
        self._stopping = threading.Event()  # (not _stop: threading.Thread has one)

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.tick()
                self.throttled.clear("keeper", "lease keeper works again")
            except Exception as e:  # never let the thread die: the leases would silently lapse
                if classify(e) is Kind.UNAVAILABLE:  # (or refusing writes: OOM, READONLY)
                    self.throttled.log(
                        "keeper", logging.WARNING, "lease keeper cannot reach Redis: %s", e
                    )
                else:
                    self.throttled.log(
                        "keeper", logging.ERROR, "lease keeper failed (%s); retrying", e,
                        exc_info=e,
                    )  # fmt: skip
            self.throttled.flush()  # (lines held back, told within their minute)
            spent = time.monotonic() - started
            self._stopping.wait(max(0.0, self.settings.renew_every_s - spent))

    def tick(self) -> None:
        stalled = time.monotonic() - self.last_progress() > self.stall_s
        if stalled:
            self.throttled.log(
                "stall",
                logging.ERROR,
                "main loop made no progress for %.0f s: letting leases expire",
                self.stall_s,
            )
            self._show_lag_of(set())  # (their next owners show it; a stale figure would stay)
            return
        self.throttled.clear("stall", "the main loop makes progress again: renewing leases")
        owned = self.owned()
        self._show_lag_of(set(owned))
        failed: Exception | None = None
        for p, epoch in owned.items():  # first, each on its own: neither one partition's
            try:  # failure (its cluster node down) nor that of the node holding the live set
                self.renew(p, epoch)  # (below) may let the other leases lapse
            except Exception as e:
                failed = failed or e
        for step in (self._heartbeat, self._reassert):
            try:
                step()
            except Exception as e:
                failed = failed or e
        if failed is not None:
            raise failed  # (logged by run, once)

    def _heartbeat(self) -> None:
        """Be counted among the live workers (or leave them), and read who they are."""
        s = self.settings
        now = self.redis_ms()
        if self.meta.active:
            args = [s.worker_id, s.lease_ms, now]
            live = self.scripts.heartbeat(keys=[self.keys.workers], args=args)
        else:  # (its model is not served: not a member, so shares go to those that are)
            self.leave()
            live = self.client.zrangebyscore(self.keys.workers, now, "+inf")
        self.members = sorted(text(live))

    def _reassert(self) -> None:
        mismatch = self.meta.reassert()
        if mismatch and "MEMNET_MODEL" in mismatch:
            self.throttled.log(
                "meta", logging.WARNING, "%s; this worker takes no partitions (stop it)", mismatch
            )
        elif mismatch:
            self.throttled.log(
                "meta", logging.ERROR, "%s: a worker of another configuration joined", mismatch
            )

    def _show_lag_of(self, partitions: set[int]) -> None:
        """Export the lag of these partitions only: the others' owners show theirs."""
        for p in self._lag_shown - partitions:
            with contextlib.suppress(KeyError):
                metrics.LAG.remove(str(p))
        self._lag_shown = partitions

    def renew(self, p: int, epoch: int) -> None:
        s = self.settings
        keys = [self.keys.part(p, n) for n in ("epoch", "lease", "taker")]
        with self.holding(p, epoch) as held:  # not released meanwhile
            if not held:
                return
            renewed = self.scripts.renew(keys=keys, args=[epoch, s.worker_id, s.lease_ms])
        if renewed != 1:
            self.on_lost(p, epoch, renewed == -1)
        self.report_lag(p)

    def others_alive(self) -> bool:
        """Whether workers other than this one are alive (without joining)."""
        live = self.client.zrangebyscore(self.keys.workers, self.redis_ms(), "+inf")
        return any(text(w) != self.settings.worker_id for w in live)

    def report_lag(self, p: int) -> None:
        """The group's lag, as Redis counts it, into the partition's metric (off the data
        path: this thread has its own connection)."""
        try:
            groups = self.client.xinfo_groups(self.keys.inp(p))
        except redis.ResponseError:  # the stream is gone (deleted by hand)
            return
        lag = next((g.get("lag") for g in groups if text(g["name"]) == GROUP), None)
        metrics.LAG.labels(str(p)).set(-1 if lag is None else lag)

    def leave(self) -> None:
        """Remove this worker from the live set (on shutdown)."""
        self.scripts.heartbeat(
            keys=[self.keys.workers], args=[self.settings.worker_id, 0, self.redis_ms()]
        )

    def redis_ms(self) -> int:
        """Redis's clock in ms: expiries use one clock whatever the workers' clocks say."""
        seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000
