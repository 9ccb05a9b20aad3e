"""Helpers for tests that drive workers through Redis."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

from memnet import Answer, Engine
from worker.protocol import Keys, pack, partition_of
from worker.settings import Settings


def worker_settings(
    redis_url: str, tmp_path: Path, model_file: Path, prefix: str, partitions: int, **overrides: Any
) -> Settings:
    """Settings of an in-process test worker: small batches, short waits."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "model": model_file,
        "snapshot_dir": tmp_path / "snap",
        "cache_dir": tmp_path / "cache",  # (a rebuild keeps compilations there, not in var/)
        "partitions": partitions,
        "prefix": prefix,
        "batch_size": 7,
        "lease_ms": 2000,
        "block_ms": 20,
        **overrides,
    }
    return Settings(**values)


def events(
    n: int,
    memories: list[str],
    dims: tuple[int, int],
    rng: np.random.Generator,
    p_write: float = 0.6,
) -> list[dict[str, Any]]:
    input_dim, memory_dim = dims
    out = []
    for j in range(n):
        memory = memories[int(rng.integers(0, len(memories)))]
        u = rng.random()
        if u < p_write:
            out.append(
                {
                    "op": "write",
                    "memory": memory,
                    "x": rng.standard_normal(input_dim).astype("<f4").tobytes(),
                }
            )
        elif u < p_write + (1 - p_write) / 2:
            out.append(
                {
                    "op": "query",
                    "memory": memory,
                    "id": f"q{j}",
                    "x": rng.standard_normal(input_dim).astype(np.float32).tolist(),
                }
            )
        else:
            out.append(
                {
                    "op": "query",
                    "memory": memory,
                    "id": f"q{j}",
                    "q": rng.standard_normal(memory_dim).astype("<f4").tobytes(),
                }
            )
    return out


def send(client: redis.Redis, prefix: str, partitions: int, batch: list[Any]) -> list[str]:
    """XADD each message (a dict, or raw bytes with its memory name) and return entry ids."""
    keys = Keys(prefix)
    pipe = client.pipeline(transaction=False)
    for item in batch:
        memory, raw = (item["memory"], pack(item)) if isinstance(item, dict) else item
        pipe.xadd(keys.inp(partition_of(memory, partitions)), {"msg": raw})
    return [i.decode() for i in pipe.execute()]


def stream(client: redis.Redis, key: str) -> list[tuple[str, dict[str, Any]]]:
    return [(i.decode(), msgpack.unpackb(f[b"msg"], raw=False)) for i, f in client.xrange(key)]


def outputs(
    client: redis.Redis, prefix: str, partitions: int, kind: str = "out"
) -> list[tuple[str, dict[str, Any]]]:
    keys = Keys(prefix)
    found = []
    for p in range(partitions):
        found += stream(client, keys.part(p, kind))
    return found


def library_answers(engine: Engine, batch: list[dict[str, Any]]) -> dict[str, Answer]:
    """What the memnet library answers for the same events, one at a time, by query id."""
    memories: dict[str, Any] = {}
    answers = {}
    for e in batch:
        if e["op"] == "delete":  # the next event starts from memory_init
            memories.pop(e["memory"], None)
            continue
        memory = memories.setdefault(e["memory"], engine.new_memory())
        value = e.get("x", e.get("q"))
        if isinstance(value, bytes):
            value = np.frombuffer(value, "<f4")
        if e["op"] == "write":
            engine.apply(memory, engine.write(value))
        elif "x" in e:
            answers[e["id"]] = engine.apply(memory, engine.query(x=value))
        else:
            answers[e["id"]] = engine.apply(memory, engine.query(q=value))
    return answers


def assert_same_answer(response: dict[str, Any], answer: Answer) -> None:
    assert "error" not in response, response
    np.testing.assert_array_equal(np.array(response["y"], np.float32), answer.y)
    np.testing.assert_array_equal(response["slots"], answer.slots)
    np.testing.assert_array_equal(np.array(response["weights"], np.float32), answer.weights)


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def wait_for_count(count, want: int, stall_s: float, what: str) -> None:
    """Waits until ``count()`` reaches ``want``, for as long as it keeps rising: fails when it
    stood still for ``stall_s`` (stuck, or short of ``want`` for good), not after a fixed time
    that a busy machine may need to exceed (the test's own timeout bounds the whole)."""
    seen, moved = count(), time.monotonic()
    while seen < want:
        if time.monotonic() - moved > stall_s:
            raise AssertionError(f"{what}: {seen} of {want}, none more for {stall_s} s")
        time.sleep(0.2)
        if (now := count()) > seen:
            seen, moved = now, time.monotonic()


def with_deletes(batch: list[dict[str, Any]], rng: np.random.Generator, every: int) -> list:
    """batch with a delete of an earlier event's memory after every ``every``-th event,
    every other one with an id (then answered {"id", "memory", "deleted": true})."""
    out = []
    for j, e in enumerate(batch):
        out.append(e)
        if j % every == every - 1:
            delete = {"op": "delete", "memory": batch[int(rng.integers(0, j + 1))]["memory"]}
            if j % (2 * every) == every - 1:
                delete["id"] = f"d{j}"
            out.append(delete)
    return out


class Running:
    """A worker's loop in a thread, as ``memnet worker`` runs it, until ``stop`` (what its
    SIGTERM handler calls); an error that ends the loop fails the stop."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:
            self.error = e

    def stop(self, timeout_s: float = 20.0) -> None:
        self.worker.request_stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive() and self.error is None, repr(self.error)
