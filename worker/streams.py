"""The data path's Redis traffic, batched across partitions: one round trip reads every
live partition (fenced XREADGROUP), one round trip commits every batch (fenced COMMIT)."""

from __future__ import annotations

from typing import Any

import redis

from worker.connection import Client, is_cluster, text
from worker.faults import as_fault
from worker.partition import Batch, Partition
from worker.protocol import Keys
from worker.scripts import Scripts

Entries = list[tuple[str, dict[bytes, Any]]]
Call = tuple[Any, list[str], list[Any]]  # (a registered script, its keys, its arguments)


class StreamIO:
    def __init__(
        self,
        client: Client,
        scripts: Scripts,
        keys: Keys,
        worker_id: str,
        batch_size: int,
        response_maxlen: int,
    ) -> None:
        self.client, self.scripts, self.keys = client, scripts, keys
        self.worker_id, self.batch_size, self.maxlen = worker_id, batch_size, response_maxlen

    def replay(self, part: Partition) -> Entries:
        """The next entries of (position, replay_until]; replay ends with a short read."""
        low = f"({part.position}" if part.position else "-"
        count = part.read_count(self.batch_size)
        entries = self.client.xrange(
            self.keys.inp(part.number), min=low, max=part.replay_until, count=count
        )
        if len(entries) < count:
            part.replay_until = None
        return [(text(i), f) for i, f in entries]

    def read(self, parts: list[Partition]) -> dict[Partition, Entries | Exception]:
        """New entries of each partition (">"), or the partition's fault (Fenced, Lost, ...)."""

        calls = []
        for part in parts:
            p = part.number
            keys = [self.keys.part(p, n) for n in ("epoch", "in", "offset", "taker")]
            args = [part.epoch, self.worker_id, part.read_count(self.batch_size)]
            calls.append((self.scripts.read, keys, [*args, part.committed or "", self.worker_id]))
        replies = self._run(calls)
        return {
            part: reply if isinstance(reply, Exception) else entries(reply)
            for part, reply in zip(parts, replies, strict=True)
        }

    def commit(self, batches: dict[Partition, Batch]) -> dict[Partition, Exception | None]:
        """Publish, dead-letter, ack and record the offset of each batch (idempotent); None
        where it landed, else the partition's fault."""
        calls = [
            (self.scripts.commit, *self._commit_call(part, batch))
            for part, batch in batches.items()
        ]
        replies = self._run(calls)
        return {
            part: reply if isinstance(reply, Exception) else None
            for part, reply in zip(batches, replies, strict=True)
        }

    def _commit_call(self, part: Partition, batch: Batch) -> tuple[list[str], list[Any]]:
        p = part.number
        keys = [
            self.keys.part(p, "epoch"),
            self.keys.inp(p),
            self.keys.out(p),
            self.keys.dead(p),
            self.keys.part(p, "offset"),
            self.keys.part(p, "taker"),
        ]
        outputs = batch.responses + batch.dead
        args: list[Any] = [
            part.epoch,
            batch.last_id,
            self.maxlen,
            len(batch.responses),
            len(batch.dead),
            part.committed or "",
            " ".join([f"{entry_id} {len(msg)}" for entry_id, msg in outputs]),
            b"".join([msg for _, msg in outputs]),
            " ".join(batch.acks),
            self.worker_id,
        ]
        return keys, args

    def _run(self, calls: list[Call]) -> list[Any]:
        """Run the script calls in one pipeline; per-call errors come back as Fenced, Lost or
        the error itself. Scripts Redis lost (a restart, SCRIPT FLUSH, one node of a
        cluster) are loaded again and only the calls that did not find theirs are sent
        again: a script that was not found did not run, and one that ran must not run twice
        (a read already took its entries from the group: read again, they would be skipped)."""
        replies = self._once(calls)
        missed = [i for i, r in enumerate(replies) if isinstance(r, redis.exceptions.NoScriptError)]
        if missed:
            self.scripts.load()
            for i, reply in zip(missed, self._once([calls[i] for i in missed]), strict=True):
                replies[i] = reply
        return [as_fault(r) for r in replies]

    def _once(self, calls: list[Call]) -> list[Any]:
        pipe = (
            _Sequential(self.client)
            if is_cluster(self.client)
            else self.client.pipeline(transaction=False)
        )
        for script, keys, args in calls:
            _evalsha(pipe, script, keys, args)
        return list(pipe.execute(raise_on_error=False))


def _evalsha(pipe: Any, script: Any, keys: list[str], args: list[Any]) -> None:
    """Queue a script by its sha alone. (Calling the Script object on a pipeline would make
    redis-py send SCRIPT EXISTS for it, a round trip of its own, before every pipeline: two
    more per step. A script Redis lost comes back as NoScriptError; _run loads it again.)"""
    pipe.evalsha(script.sha, len(keys), *keys, *args)


class _Sequential:
    """Stands in for a pipeline where Redis Cluster refuses to pipeline scripts: the calls
    run one by one (each partition's keys live on one node anyway)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.calls: list[tuple[Any, ...]] = []

    def evalsha(self, *args: Any) -> None:
        self.calls.append(args)

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Each call's reply, or (raise_on_error False) its fault: a node out of reach or a
        slot being migrated fails only the calls of the partitions it holds."""
        replies: list[Any] = []
        for args in self.calls:
            try:
                replies.append(self.client.evalsha(*args))
            except (redis.RedisError, redis.exceptions.RedisClusterException) as e:
                if raise_on_error:
                    raise
                replies.append(e)
        return replies


def entries(reply: Any) -> Entries:
    """Normalise an XREADGROUP reply from a script into [(id, {field: value})]."""
    if not reply:
        return []
    if isinstance(reply[0], bytes):  # fakeredis returns a single stream without nesting
        reply = [reply]
    out = []
    for _stream, stream_entries in reply:
        for entry_id, fields in stream_entries:
            flat = fields or []
            if len(flat) == 2:  # one field, "msg": the usual entry
                out.append((text(entry_id), {flat[0]: flat[1]}))
            else:
                out.append((text(entry_id), dict(zip(flat[::2], flat[1::2], strict=True))))
    return out
