"""``memnet demo``: the main job on an embedded default.

Uses REDIS_URL if set, else a private ``redis-server`` if one is installed, else an embedded
fakeredis server; writes a model, runs two workers, streams a few thousand events over many
memories, prints responses and a summary, and shuts everything down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np

from memnet import ModelConfig, random_model, save_model
from worker.client import MemnetClient
from worker.connection import connect, text
from worker.protocol import pack, parse_id
from worker.settings import redact

MODEL = ModelConfig(input_dim=16, memory_dim=16, output_dim=4, hidden=16, slots=512, top_k=5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def demo_redis(workdir: Path) -> Iterator[tuple[str, str]]:
    """(url, description) of the Redis the demo uses."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"], "REDIS_URL"
        return
    if shutil.which("redis-server"):
        port = _free_port()
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            _wait_ping(url)
            yield url, "a private redis-server"
        finally:
            proc.terminate()
            proc.wait(10)
        return
    import fakeredis

    server = fakeredis.TcpFakeServer(("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0", "an embedded fakeredis server"
    finally:
        server.shutdown()
        server.server_close()


def _wait_ping(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connect(url).ping()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _events(n: int, rng: np.random.Generator) -> list[dict]:
    memories = [f"user-{i}" for i in range(24)]
    events = []
    for j in range(n):
        memory = memories[int(rng.integers(0, len(memories)))]
        kind = rng.random()
        if kind < 0.6:
            events.append(
                {
                    "op": "write",
                    "memory": memory,
                    "x": rng.standard_normal(MODEL.input_dim).astype("<f4").tobytes(),
                }
            )
        elif kind < 0.8:
            events.append(
                {
                    "op": "query",
                    "memory": memory,
                    "id": f"q{j}",
                    "x": rng.standard_normal(MODEL.input_dim).tolist(),
                }
            )
        else:
            events.append(
                {
                    "op": "query",
                    "memory": memory,
                    "id": f"q{j}",
                    "q": rng.standard_normal(MODEL.memory_dim).astype("<f4").tobytes(),
                }
            )
    return events


def run_demo(events: int = 4000) -> int:
    with (
        tempfile.TemporaryDirectory(prefix="memnet-demo-") as tmp,
        demo_redis(Path(tmp)) as (url, where),
    ):
        prefix = f"memnet-demo-{uuid.uuid4().hex[:8]}"
        print(f"Redis: {where} ({redact(url)}), key prefix {prefix}")
        model_path = Path(tmp) / "model.safetensors"
        save_model(random_model(MODEL, seed=0), model_path)
        print(
            f"model: {model_path.name} (input {MODEL.input_dim}, memory {MODEL.memory_dim}, "
            f"{MODEL.slots} slots, top-{MODEL.top_k})"
        )
        env = {
            **os.environ,
            "REDIS_URL": url,
            "MEMNET_MODEL": str(model_path),
            "MEMNET_SNAPSHOT_DIR": str(Path(tmp) / "snapshots"),
            "MEMNET_PREFIX": prefix,
            "MEMNET_PARTITIONS": "8",
            "MEMNET_LEASE_MS": "2000",
            "MEMNET_LOG_LEVEL": "WARNING",
        }
        env.pop("MEMNET_METRICS_PORT", None)
        env.pop("PORT", None)
        workers = [
            subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env)
            for _ in range(2)
        ]
        try:
            return _drive(url, prefix, events, workers)
        finally:
            for w in workers:
                w.send_signal(signal.SIGTERM)
            for w in workers:
                try:
                    w.wait(10)
                except subprocess.TimeoutExpired:
                    w.kill()
            _cleanup(url, prefix)


def _drive(url: str, prefix: str, n: int, workers: list[subprocess.Popen]) -> int:
    client = MemnetClient(url, prefix)
    _wait_owned(client, workers)
    batch = _events(n, np.random.default_rng(7))
    queries = {e["id"] for e in batch if e["op"] == "query"}
    started = time.time()
    pipe = client.redis.pipeline(transaction=False)
    for event in batch:
        pipe.xadd(client.keys.inp(client.partition(event["memory"])), {"msg": pack(event)})
        if len(pipe) >= 200:
            pipe.execute()
    pipe.execute()
    responses, latencies = _collect(client, queries, deadline=time.monotonic() + 60)
    elapsed = time.time() - started
    print("\nfirst responses:")
    for r in list(responses.values())[:5]:
        print(
            f"  {r['memory']:>8} {r['id']:>6}  y={np.round(r['y'], 3).tolist()}  "
            f"slots={r['slots']}  weights={np.round(r['weights'], 3).tolist()}"
        )
    owners = [text(client.redis.get(client.keys.part(p, "lease"))) for p in range(8)]
    split = sorted(owners.count(o) for o in set(owners))
    lat = np.array(latencies) * 1000
    print(
        f"\nsummary: {n} events ({n - len(queries)} writes, {len(queries)} queries) over 24 "
        f"memories in {elapsed:.2f} s ({n / elapsed:,.0f} events/s end to end)"
    )
    print(
        f"  answered {len(responses)}/{len(queries)} queries, "
        f"{sum('error' in r for r in responses.values())} errors; latency from "
        f"XADD to response p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f}"
        f" ms; 2 workers own the 8 partitions as {'/'.join(map(str, split))}"
    )
    return 0 if len(responses) == len(queries) else 1


def _wait_owned(client: MemnetClient, workers: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(w.poll() is not None for w in workers):
            raise SystemExit("memnet demo: a worker exited during start-up")
        try:
            owners = [client.redis.get(client.keys.part(p, "lease")) for p in range(8)]
        except Exception:
            owners = [None]
        if None not in owners and sorted(owners.count(o) for o in set(owners)) == [4, 4]:
            return
        time.sleep(0.1)
    raise SystemExit("memnet demo: workers did not take the partitions within 120 s")


def _collect(
    client: MemnetClient, queries: set[str], deadline: float
) -> tuple[dict[str, dict], list[float]]:
    responses: dict[str, dict] = {}
    latencies = []
    positions = {client.keys.out(p): "0-0" for p in range(8)}
    while len(responses) < len(queries) and time.monotonic() < deadline:
        for stream, entries in client.redis.xread(positions, count=1000, block=500) or []:
            now = time.time()
            for entry_id, fields in entries:
                positions[text(stream)] = text(entry_id)
                message = msgpack.unpackb(fields[b"msg"], raw=False)
                responses[message["id"]] = message
                latencies.append(now - parse_id(text(entry_id))[0] / 1000)
    return responses, latencies


def _cleanup(url: str, prefix: str) -> None:
    with contextlib.suppress(Exception):
        client = connect(url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
