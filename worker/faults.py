"""Faults: what a Redis error means, one backoff policy, and logs that do not flood.

The rule the worker keeps: only SIGTERM/SIGINT or a start-up configuration error ends it.
Every other error is classified here (``classify``) and contained by its caller: a fault of
one partition drops or releases that partition and backs off before it is taken again
(``worker.ownership``); a fault of the connection backs the whole loop off
(``worker.worker``). Each persisting fault is logged once, then at most once a minute with a
count of what was suppressed (``Throttled``).
"""

from __future__ import annotations

import enum
import logging
import re
import time
from typing import Any

import redis
from redis.backoff import EqualJitterBackoff

# Markers the Lua scripts put at the start of their error replies (worker/scripts.py).
FENCED = "MEMNET_FENCED"
LOST = "MEMNET_LOST"

UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.exceptions.BusyLoadingError,
    # A cluster that cannot be reached or is reconfiguring. redis-py follows MOVED/ASK and
    # retries TRYAGAIN (a multi-key script on a slot being migrated whose declared keys are
    # not all there) itself, then raises ClusterError("TTL exhausted."); it raises
    # RedisClusterUnreachableError when a refresh of the topology reaches no node, and
    # SlotNotCoveredError for a slot no node serves. (RedisClusterException, their base,
    # also means deterministic errors: cross-slot keys, unsupported commands.)
    redis.exceptions.ClusterError,  # (ClusterDownError, MasterDownError included)
    redis.exceptions.TryAgainError,
    redis.exceptions.RedisClusterUnreachableError,
    redis.exceptions.SlotNotCoveredError,
)


# Redis refusing writes for a while: at maxmemory under noeviction (OOM: Redis's full disk),
# or a replica after a failover the client has not followed yet (READONLY; the loop drops
# its connections, worker.worker). Waited out like an outage: not a partition's fault.
WRITES_REFUSED = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)
_REFUSED = re.compile(r"(?:^|: )(?:OOM|READONLY) ")  # (the same, from inside a script)


def read_only(error: BaseException) -> bool:
    """Whether error is a replica's READONLY (connections to drop: DNS may point elsewhere)."""
    return isinstance(error, redis.exceptions.ReadOnlyError) or (
        isinstance(error, redis.ResponseError) and "READONLY " in str(error)
    )


class Fenced(Exception):
    """The partition's epoch moved on: this worker no longer owns it."""


class Lost(Exception):
    """Redis no longer holds what this worker committed for the partition (FLUSHALL, a
    restart from an older snapshot, a failover to a lagging replica): rebuild it."""


class Kind(enum.Enum):
    UNAVAILABLE = "Redis unavailable"  # (or refusing writes) back off, reconnect, resynchronise
    FENCED = "fenced"  # another worker owns the partition now: drop it
    LOST = "Redis lost data"  # rebuild the partition from its snapshot
    NOGROUP = "consumer group missing"  # recreate it at the applied position
    PERMISSION = "permission denied"  # an ACL change: back off, log
    OTHER = "unexpected error"  # back off, log with the traceback


def classify(error: BaseException) -> Kind:
    """The one place that reads Redis errors (scripts' replies included)."""
    if isinstance(error, UNAVAILABLE + WRITES_REFUSED):
        return Kind.UNAVAILABLE
    if isinstance(error, Fenced):
        return Kind.FENCED
    if isinstance(error, Lost):
        return Kind.LOST
    if isinstance(error, redis.exceptions.NoPermissionError):
        return Kind.PERMISSION
    if isinstance(error, redis.ResponseError):
        return _reply_kind(str(error))
    return Kind.OTHER


def _reply_kind(message: str) -> Kind:
    """What an error reply's text says (a script's replies carry no exception class)."""
    if message.startswith(FENCED):
        return Kind.FENCED
    if message.startswith(LOST):
        return Kind.LOST
    if message.startswith("NOGROUP"):
        return Kind.NOGROUP
    if message.startswith("NOPERM") or "can't run this command" in message:
        return Kind.PERMISSION  # (the second: a command a script called, Redis 7)
    if _REFUSED.search(message):
        return Kind.UNAVAILABLE
    return Kind.OTHER


def as_fault(reply: Any) -> Any:
    """A script's error reply as Fenced or Lost where it is one; anything else unchanged."""
    if isinstance(reply, redis.ResponseError):
        kind = classify(reply)
        if kind is Kind.FENCED:
            return Fenced(str(reply))
        if kind is Kind.LOST:
            return Lost(str(reply))
    return reply


class Backoff:
    """Exponential backoff with jitter: about base, 2·base, 4·base ... up to cap seconds
    (each delay drawn from [d/2, d], redis-py's equal-jitter policy, so peers spread out)."""

    def __init__(self, base_s: float = 0.1, cap_s: float = 5.0) -> None:
        self._policy = EqualJitterBackoff(cap=cap_s, base=base_s)
        self.failures = 0
        self.until = 0.0

    def fail(self) -> float:
        """Count a failure; the delay before the next try (also kept in ``until``)."""
        # (capped: 2**failures overflows a float after ~1,000 failures in redis-py < 8.2,
        # about an hour of an outage; the delay is at its cap long before 32)
        delay = float(self._policy.compute(min(self.failures, 32)))
        self.failures += 1
        self.until = time.monotonic() + delay
        return delay

    def reset(self) -> None:
        self.failures = 0
        self.until = 0.0

    @property
    def ready(self) -> bool:
        return time.monotonic() >= self.until


class Throttled:
    """Logs a persisting fault once, then at most every ``every_s`` seconds (with the count of
    lines held back); ``clear`` logs its end once."""

    def __init__(self, logger: logging.Logger, every_s: float = 60.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self._active: dict[str, tuple[float, int]] = {}  # key -> (last logged, held back)
        self._latest: dict[str, tuple[int, str, tuple[Any, ...]]] = {}  # key -> a held line

    def log(self, key: str, level: int, msg: str, *args: Any, exc_info: Any = None) -> None:
        held = self.admit(key)
        if held is None:
            # (an exception kept as its text: its traceback would keep the frames it went
            # through alive, with what they hold, e.g. a dropped partition's memories)
            text = tuple(str(a) if isinstance(a, BaseException) else a for a in args)
            self._latest[key] = (level, msg, text)
            return
        if held:
            msg += f" ({held} similar lines held back)"
        self.logger.log(level, msg, *args, exc_info=exc_info)
        self._latest.pop(key, None)

    def bound(self, most: int) -> None:
        """Forget every period once more than ``most`` keys are kept (for keys no caller
        bounds, such as other libraries' lines)."""
        if len(self._active) > most:
            self._active.clear()

    def admit(self, key: str) -> int | None:
        """None while key's line is held back (within every_s of the last one told), else
        how many were held back since it (and its period starts now)."""
        now = time.monotonic()
        last, held = self._active.get(key, (None, 0))
        if last is not None and now - last < self.every_s:
            self._active[key] = (last, held + 1)
            return None
        self._active[key] = (now, 0)
        return held

    def flush(self) -> None:
        """Log the latest held-back line of each key whose period has passed, with the
        count: what is held back is told within a period even if nothing more comes."""
        if not self._latest:
            return
        now = time.monotonic()
        for key, (level, msg, args) in list(self._latest.items()):
            last, held = self._active.get(key, (now, 0))
            if now - last >= self.every_s:
                tail = f" ({held} lines like this held back in the last minute; the latest)"
                self.logger.log(level, msg + tail, *args)
                self._active[key] = (now, 0)
                del self._latest[key]

    def clear(self, key: str, msg: str, *args: Any) -> None:
        self._latest.pop(key, None)
        if self._active.pop(key, None) is not None:
            self.logger.info(msg, *args)
