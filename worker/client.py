"""A small client: write events, query and wait for the answer, tail responses.

Producers in any language do the same with plain Redis commands (docs/protocol.md).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np

from worker.connection import Client, connect, is_cluster, text
from worker.protocol import Keys, pack, parse_id, partition_of


class QueryTimeout(TimeoutError):
    pass


class NoDeployment(LookupError):
    """PREFIX:meta is missing: no worker ever ran under this prefix (live workers re-assert
    it within a second or two if it was deleted)."""


def _wire(vector: Any) -> Any:
    """Vectors travel as float32 little-endian bin (compact and exact)."""
    if isinstance(vector, np.ndarray):
        return np.ascontiguousarray(vector, "<f4").tobytes()
    return list(vector)


def _before(entry_id: str) -> str:
    """The stream id just before entry_id (XREAD returns entries after an id)."""
    ms, seq = parse_id(entry_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-18446744073709551615"


class MemnetClient:
    def __init__(
        self, client: Client | str = "redis://127.0.0.1:6379/0", prefix: str = "memnet"
    ) -> None:
        self.redis = connect(client, retries=0) if isinstance(client, str) else client
        self.keys = Keys(prefix)
        self._partitions: int | None = None

    @property
    def partitions(self) -> int:
        if self._partitions is None:
            value = self.redis.hget(self.keys.meta, "partitions")
            if value is None:
                raise NoDeployment(
                    f"{self.keys.meta} does not exist: start a worker first "
                    "(it records the partition count)"
                )
            self._partitions = int(value)
        return self._partitions

    def partition(self, memory: str) -> int:
        return partition_of(memory, self.partitions)

    def send(self, message: dict[str, Any]) -> str:
        """XADD one message to its memory's partition; returns the entry id."""
        key = self.keys.inp(self.partition(message["memory"]))
        return text(self.redis.xadd(key, {"msg": pack(message)}))

    def write(self, memory: str, x: Any = None, *, text_input: str | None = None) -> str:
        body: dict[str, Any] = {"op": "write", "memory": memory}
        if text_input is not None:
            body["text"] = text_input
        else:
            body["x"] = _wire(x)
        return self.send(body)

    def query(
        self,
        memory: str,
        x: Any = None,
        *,
        q: Any = None,
        text_input: str | None = None,
        timeout_s: float = 10.0,
    ) -> dict[str, Any]:
        """Send a query and wait for its response (raises QueryTimeout)."""
        body: dict[str, Any] = {"op": "query", "memory": memory, "id": uuid.uuid4().hex}
        if text_input is not None:
            body["text"] = text_input
        elif q is not None:
            body["q"] = _wire(q)
        else:
            body["x"] = _wire(x)
        entry_id = self.send(body)
        return self.wait(self.partition(memory), entry_id, timeout_s)

    def wait(self, partition: int, entry_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The response published at entry_id in a partition's out stream."""
        key = self.keys.out(partition)
        deadline = time.monotonic() + timeout_s
        after = _before(entry_id)
        while (left := deadline - time.monotonic()) > 0:
            reply = self.redis.xread({key: after}, count=100, block=max(1, int(left * 1000)))
            for _stream, entries in reply or []:
                for got_id, fields in entries:
                    if text(got_id) == entry_id:
                        return msgpack.unpackb(fields[b"msg"], raw=False)
                    after = text(got_id)
                    if parse_id(after) > parse_id(entry_id):
                        break
        raise QueryTimeout(f"no response to {entry_id} in {key} within {timeout_s} s")

    def tail(
        self, partitions: list[int] | None = None, start: str = "$", block_ms: int = 1000
    ) -> Iterator[tuple[int, str, dict[str, Any]]]:
        """Yield (partition, entry id, response) from the out streams, forever."""
        chosen = list(range(self.partitions)) if partitions is None else partitions
        positions = {self.keys.out(p): start for p in chosen}
        owner = {self.keys.out(p): p for p in chosen}
        if start == "$":  # pin "now" per stream, so no response slips between reads
            for key in positions:
                last = self.redis.xrevrange(key, count=1)
                positions[key] = text(last[0][0]) if last else "0-0"
        while True:
            for stream, entries in self._read(positions, block_ms):
                key = text(stream)
                for entry_id, fields in entries:
                    positions[key] = text(entry_id)
                    yield owner[key], text(entry_id), msgpack.unpackb(fields[b"msg"], raw=False)

    def _read(self, positions: dict[str, str], block_ms: int) -> list[Any]:
        if not is_cluster(self.redis):
            return self.redis.xread(positions, count=1000, block=block_ms) or []
        # A cluster serves one slot per command: read each partition's stream in turn.
        replies: list[Any] = []
        for key, after in positions.items():
            replies += self.redis.xread({key: after}, count=1000) or []
        if not replies:
            time.sleep(min(block_ms, 50) / 1000)
        return replies
