"""Clients of a memnet deployment: write events, query and wait for the answer, tail responses.

    with MemnetClient.from_env() as client:          # REDIS_URL and MEMNET_PREFIX
        client.write("alice", x=vector)
        response = client.query("alice", x=vector)   # {"id", "memory", "y", "slots", ...}
        client.delete("alice", wait=True)            # forget it; wait until it is applied

``MemnetClient`` blocks (standalone Redis or Redis Cluster); ``AsyncMemnetClient`` is the
same on ``redis.asyncio`` (standalone Redis). Every event is checked against the
deployment's record, ``PREFIX:meta``, before it is sent: a vector of the wrong length raises
``InvalidEvent`` here instead of becoming a dead letter. Every error raised on purpose
derives from ``ClientError``. Producers in any language do the same with plain Redis
commands (docs/protocol.md). Importing this module imports neither JAX nor memnet.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Self

import msgpack
import redis
from redis.backoff import NoBackoff

if TYPE_CHECKING:
    import redis.asyncio

from worker.connection import Client, connect, is_cluster, text
from worker.events import (
    ClientError,
    Deployment,
    InvalidEvent,
    MemnetError,
    NoDeployment,
    QueryTimeout,
    Response,
    ResponseTrimmed,
    delete_event,
    query_event,
    write_event,
)
from worker.protocol import Keys, pack, parse_id
from worker.settings import Settings

__all__ = [
    "AsyncMemnetClient",
    "ClientError",
    "Deployment",
    "InvalidEvent",
    "MemnetClient",
    "MemnetError",
    "NoDeployment",
    "QueryTimeout",
    "ResponseTrimmed",
    "delete_event",
    "query_event",
    "write_event",
]

READ_BLOCK_MS = 1000  # longest single XREAD BLOCK: well under the 5 s socket timeout


def _before(entry_id: str) -> str:
    """The stream id just before entry_id (XREAD returns entries after an id)."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-18446744073709551615"


def _unpack(fields: Mapping[bytes, bytes]) -> Response:
    return msgpack.unpackb(fields[b"msg"], raw=False)


def _find(reply: Any, entry_id: str, after: str) -> tuple[Response | None, str]:
    """Look for entry_id in an XREAD reply (read after the id just before it): (its
    response or None, the id to read after). A later response there and not this one:
    responses are published in input order, so this one was, and was trimmed since
    (ResponseTrimmed)."""
    for stream, entries in reply or []:
        for got_id, fields in entries:
            after = text(got_id)
            if after == entry_id:
                return _unpack(fields), after
            raise ResponseTrimmed(
                f"no response to {entry_id} is left in {text(stream)}, which goes on from "
                f"{after}: it was trimmed before it was read (more than "
                f"MEMNET_RESPONSE_MAXLEN responses came after it), or {entry_id} was no "
                "query of this partition"
            )
    return None, after


def _answered(response: Response) -> Response:
    """The response, or MemnetError if it is an error response."""
    if "error" in response:
        raise MemnetError(response)
    return response


def _responses(
    reply: Any, positions: dict[str, str], owner: dict[str, int]
) -> Iterator[tuple[int, str, Response]]:
    """(partition, entry id, response) of an XREAD reply, advancing positions."""
    for stream, entries in reply or []:
        key = text(stream)
        for entry_id, fields in entries:
            positions[key] = text(entry_id)
            yield owner[key], positions[key], _unpack(fields)


def _delete_id(id: str | None, wait: bool) -> str | None:
    """A delete's id: the one given, else a fresh one if its response will be waited for."""
    return uuid.uuid4().hex if id is None and wait else id


def _client_settings(env: Mapping[str, str] | None) -> Settings:
    """REDIS_URL and MEMNET_PREFIX from the environment, checked as a worker checks them;
    the workers' other settings (a batch size, a lease) are not the client's to refuse."""
    env = os.environ if env is None else env
    return Settings.from_env({k: env[k] for k in ("REDIS_URL", "MEMNET_PREFIX") if k in env})


def _settings(client: Any, prefix: str | None) -> tuple[Any, str]:
    """Fill a missing URL or prefix from the environment (REDIS_URL, MEMNET_PREFIX)."""
    if client is not None and prefix is not None:
        return client, prefix
    settings = _client_settings(None)
    return (
        settings.redis_url if client is None else client,
        settings.prefix if prefix is None else prefix,
    )


def _partitions(chosen: Iterable[int] | None, total: int) -> list[int]:
    """The partitions asked for (all if None); InvalidEvent for one the deployment lacks
    (its stream would never get a response: a tail of it would wait forever)."""
    if chosen is None:
        return list(range(total))
    chosen = list(chosen)
    for p in chosen:
        if not 0 <= p < total:
            raise InvalidEvent(f"no partition {p} (there are {total}: 0..{total - 1})")
    return chosen


def _retries(client: Any) -> int:
    """How many times a redis-py client (standalone or cluster, blocking or asyncio) sends a
    failed command again: its retry policy's count, and at least once where it was made with
    retry_on_timeout or retry_on_error (redis-py then gives each connection one retry)."""
    get = getattr(client, "get_retry", None)
    retry = get() if get is not None else getattr(client, "retry", None)
    count = 0 if retry is None else int(retry.get_retries())
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    if kwargs.get("retry_on_timeout") or kwargs.get("retry_on_error"):
        count = max(count, 1)
    return count


class _ClientBase:
    """What both clients share: the connection (opened from a URL, or passed in) and keys."""

    redis: Any

    def __init__(self, client: Any = None, prefix: str | None = None) -> None:
        client, prefix = _settings(client, prefix)
        retries = 0 if isinstance(client, str) else _retries(client)
        if retries:
            raise ValueError(
                f"the redis client passed in retries failed commands ({retries} "
                "times): an XADD whose reply was lost would be added twice (a write applied "
                "twice). Make it with retry=Retry(NoBackoff(), 0) (redis.retry, "
                "redis.backoff), or pass a URL"
            )
        self._owned = isinstance(client, str)  # opened here: closed by close()
        self.redis = self._connect(client) if isinstance(client, str) else client
        self.keys = Keys(prefix)
        self._deployment: Deployment | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """A client for REDIS_URL and MEMNET_PREFIX (defaults as the workers': Settings)."""
        settings = _client_settings(env)
        return cls(settings.redis_url, settings.prefix)

    @staticmethod
    def _connect(url: str) -> Any:
        raise NotImplementedError


# ---- the blocking client ------------------------------------------------------------------
class MemnetClient(_ClientBase):
    """A blocking client for standalone Redis or Redis Cluster (detected).

    ``MemnetClient.from_env()`` is the usual way to make one. ``client`` is a URL or a
    redis-py client (without ``decode_responses``, and without retries: a retried XADD
    whose reply was lost adds the event twice); a URL or prefix left out comes from
    REDIS_URL / MEMNET_PREFIX. A client made from a URL owns its connection: ``close()``
    (or leaving a ``with`` block) closes it; a passed-in client is left to its owner.
    """

    redis: Client

    @staticmethod
    def _connect(url: str) -> Client:
        return connect(url, retries=0)

    def close(self) -> None:
        """Close the connection this client opened (a passed-in client is left open)."""
        if self._owned:
            self.redis.close()

    def __enter__(self) -> MemnetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def deployment(self) -> Deployment:
        """The deployment's record, read once (raises NoDeployment while it is missing)."""
        if self._deployment is None:
            values = self.redis.hgetall(self.keys.meta)
            self._deployment = Deployment.from_meta(values, self.keys.meta)
        return self._deployment

    @property
    def partitions(self) -> int:
        """The deployment's partition count."""
        return self.deployment.partitions

    def partition(self, memory: str) -> int:
        """The partition a memory lives in."""
        return self.deployment.partition(memory)

    def send(self, event: Mapping[str, Any]) -> str:
        """Check one event (raises InvalidEvent, sending nothing) and XADD it to its
        memory's partition; returns the entry id."""
        prepared = self.deployment.prepare(event)
        key = self.keys.inp(self.partition(prepared["memory"]))
        return text(self.redis.xadd(key, {"msg": pack(prepared)}))

    def write(self, memory: str, x: Any = None, *, text_input: str | None = None) -> str:
        """Write x (a vector of input_dim numbers) or text to a memory; returns the entry id."""
        return self.send(write_event(memory, x, text_input))

    def query(
        self,
        memory: str,
        x: Any = None,
        *,
        q: Any = None,
        text_input: str | None = None,
        timeout_s: float = 10.0,
    ) -> Response:
        """Query a memory with one of x (input space), q (memory space) or text, and wait
        for the response; raises MemnetError for an error response, QueryTimeout."""
        event = query_event(memory, x, q, text_input)
        entry_id = self.send(event)
        return self.wait(self.partition(memory), entry_id, timeout_s)

    def delete(
        self, memory: str, *, id: str | None = None, wait: bool = False, timeout_s: float = 10.0
    ) -> str:
        """Delete a memory: its next event starts from memory_init, as if it never existed.
        Returns the entry id. With an id (one is made up when ``wait`` is set without one)
        the worker publishes ``{"id", "memory", "deleted": True}`` at that entry id; with
        ``wait`` this returns only once that response arrived (raises MemnetError for an
        error response, QueryTimeout)."""
        entry_id = self.send(delete_event(memory, _delete_id(id, wait)))
        if wait:
            self.wait(self.partition(memory), entry_id, timeout_s)
        return entry_id

    def wait(self, partition: int, entry_id: str, timeout_s: float = 10.0) -> Response:
        """The response published at entry_id (a query sent with ``send``) in a partition's
        out stream; raises MemnetError for an error response, QueryTimeout."""
        key = self.keys.out(partition)
        deadline = time.monotonic() + timeout_s
        after = _before(entry_id)
        while True:  # (read at least once: timeout_s=0 polls)
            left = deadline - time.monotonic()
            block = max(1, min(READ_BLOCK_MS, int(left * 1000)))
            reply = self.redis.xread({key: after}, count=100, block=block)
            response, after = _find(reply, entry_id, after)
            if response is not None:
                return _answered(response)
            if time.monotonic() >= deadline:
                break
        raise QueryTimeout(f"no response to {entry_id} in {key} within {timeout_s} s")

    def tail(
        self, partitions: Iterable[int] | None = None, start: str = "$", block_ms: int = 1000
    ) -> Iterator[tuple[int, str, Response]]:
        """Yield (partition, entry id, response) from the out streams, forever; error
        responses are yielded too. ``start="$"`` means responses added after this call
        (not after the first ``next``), "0-0" every response kept."""
        chosen = _partitions(partitions, self.partitions)
        owner = {self.keys.out(p): p for p in chosen}
        positions = {key: start for key in owner}
        if start == "$":  # pin "now" per stream, so no response slips between reads
            for key in positions:
                positions[key] = _last_id(self.redis.xrevrange(key, count=1))
        return self._follow(positions, owner, block_ms)

    def _follow(
        self, positions: dict[str, str], owner: dict[str, int], block_ms: int
    ) -> Iterator[tuple[int, str, Response]]:
        while True:
            yield from _responses(self._read(positions, block_ms), positions, owner)

    def _read(self, positions: dict[str, str], block_ms: int) -> list[Any]:
        block_ms = max(1, min(block_ms, READ_BLOCK_MS))
        if not is_cluster(self.redis):
            return self.redis.xread(positions, count=1000, block=block_ms) or []
        # A cluster serves one slot per command: read each partition's stream in turn.
        replies: list[Any] = []
        for key, after in positions.items():
            replies += self.redis.xread({key: after}, count=1000) or []
        if not replies:
            time.sleep(min(block_ms, 50) / 1000)
        return replies


def _last_id(reply: Any) -> str:
    """The id of an XREVRANGE COUNT 1 reply's entry, or 0-0 for an empty stream."""
    return text(reply[0][0]) if reply else "0-0"


# ---- the asyncio client -------------------------------------------------------------------
class AsyncMemnetClient(_ClientBase):
    """The client on ``redis.asyncio``, for standalone Redis (Redis Cluster is not
    supported here: use ``MemnetClient`` in a thread for a cluster).

    ``AsyncMemnetClient.from_env()`` is the usual way to make one, used as
    ``async with AsyncMemnetClient.from_env() as client:``. ``client`` is a URL or a
    ``redis.asyncio.Redis`` (without ``decode_responses`` or retries); ownership and the
    environment fallback are as for ``MemnetClient``.
    """

    redis: redis.asyncio.Redis

    @staticmethod
    def _connect(url: str) -> redis.asyncio.Redis:
        """An asyncio client that never retries on its own (a retried XADD could add twice)."""
        import redis.asyncio  # here: blocking clients (the CLI) need not load it
        from redis.asyncio.retry import Retry as AsyncRetry

        return redis.asyncio.Redis.from_url(
            url, socket_timeout=5.0, socket_connect_timeout=5.0, retry=AsyncRetry(NoBackoff(), 0)
        )

    async def close(self) -> None:
        """Close the connections this client opened (a passed-in client is left open)."""
        if self._owned:
            await self.redis.aclose()

    async def __aenter__(self) -> AsyncMemnetClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def deployment(self) -> Deployment:
        """The deployment's record, read once (raises NoDeployment while it is missing;
        ClientError on a Redis Cluster, which this client does not support: its commands
        for slots of other nodes would fail with MOVED)."""
        if self._deployment is None:
            with contextlib.suppress(redis.ResponseError):  # (a user without INFO)
                if (await self.redis.info("cluster")).get("cluster_enabled"):
                    raise ClientError(
                        "AsyncMemnetClient does not support Redis Cluster: use MemnetClient "
                        "(in a thread, e.g. asyncio.to_thread)"
                    )
            values = await self.redis.hgetall(self.keys.meta)
            self._deployment = Deployment.from_meta(values, self.keys.meta)
        return self._deployment

    async def partition(self, memory: str) -> int:
        """The partition a memory lives in."""
        return (await self.deployment()).partition(memory)

    async def send(self, event: Mapping[str, Any]) -> str:
        """Check one event (raises InvalidEvent, sending nothing) and XADD it to its
        memory's partition; returns the entry id."""
        deployment = await self.deployment()
        prepared = deployment.prepare(event)
        key = self.keys.inp(deployment.partition(prepared["memory"]))
        return text(await self.redis.xadd(key, {"msg": pack(prepared)}))

    async def write(self, memory: str, x: Any = None, *, text_input: str | None = None) -> str:
        """Write x (a vector of input_dim numbers) or text to a memory; returns the entry id."""
        return await self.send(write_event(memory, x, text_input))

    async def query(
        self,
        memory: str,
        x: Any = None,
        *,
        q: Any = None,
        text_input: str | None = None,
        timeout_s: float = 10.0,
    ) -> Response:
        """Query a memory with one of x (input space), q (memory space) or text, and wait
        for the response; raises MemnetError for an error response, QueryTimeout."""
        entry_id = await self.send(query_event(memory, x, q, text_input))
        return await self.wait(await self.partition(memory), entry_id, timeout_s)

    async def delete(
        self, memory: str, *, id: str | None = None, wait: bool = False, timeout_s: float = 10.0
    ) -> str:
        """Delete a memory, as ``MemnetClient.delete``: returns the entry id; with ``wait``,
        once the worker's ``{"id", "memory", "deleted": True}`` response arrived."""
        entry_id = await self.send(delete_event(memory, _delete_id(id, wait)))
        if wait:
            await self.wait(await self.partition(memory), entry_id, timeout_s)
        return entry_id

    async def wait(self, partition: int, entry_id: str, timeout_s: float = 10.0) -> Response:
        """The response published at entry_id in a partition's out stream; raises
        MemnetError for an error response, QueryTimeout."""
        key = self.keys.out(partition)
        deadline = time.monotonic() + timeout_s
        after = _before(entry_id)
        while True:  # (read at least once: timeout_s=0 polls)
            left = deadline - time.monotonic()
            block = max(1, min(READ_BLOCK_MS, int(left * 1000)))
            reply = await self.redis.xread({key: after}, count=100, block=block)
            response, after = _find(reply, entry_id, after)
            if response is not None:
                return _answered(response)
            if time.monotonic() >= deadline:
                break
        raise QueryTimeout(f"no response to {entry_id} in {key} within {timeout_s} s")

    async def tail(
        self, partitions: Iterable[int] | None = None, start: str = "$", block_ms: int = 1000
    ) -> AsyncIterator[tuple[int, str, Response]]:
        """Yield (partition, entry id, response) from the out streams, forever; error
        responses are yielded too. ``start="$"`` means responses added after iteration
        begins (the first ``__anext__``), "0-0" every response kept."""
        chosen = _partitions(partitions, (await self.deployment()).partitions)
        owner = {self.keys.out(p): p for p in chosen}
        positions = {key: start for key in owner}
        if start == "$":
            for key in positions:
                positions[key] = _last_id(await self.redis.xrevrange(key, count=1))
        block_ms = max(1, min(block_ms, READ_BLOCK_MS))
        while True:
            reply = await self.redis.xread(positions, count=1000, block=block_ms)
            for item in _responses(reply, positions, owner):
                yield item
