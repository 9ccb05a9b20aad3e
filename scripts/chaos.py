#!/usr/bin/env python
"""Chaos suite: 3 workers, 8 partitions, a long mixed stream, and faults all along.

While a producer streams events over many memories, it SIGKILLs a random worker every few
seconds (and restarts it), SIGSTOPs one past its lease (then SIGCONTs it), and kills and
restarts Redis (append-only file, fsync always) once. Then it replays the very same input
entries (same ids) through one uninterrupted worker on a fresh Redis and compares:
updates lost / applied twice (per-memory write counts in the final snapshots), responses
missing / duplicated / different (> 1e-5), and final memories that differ. All must be 0.

    python scripts/chaos.py              # >= 30k events (about 2 minutes here)
    python scripts/chaos.py --quick      # the CI version (tests/test_chaos.py)
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import ModelConfig, random_model, save_model  # noqa: E402
from scripts.chaos_compare import COUNTS, compare  # noqa: E402
from tests.servers import RedisServer  # noqa: E402
from tests.streams import WorkerProcess, owners  # noqa: E402
from worker.protocol import Keys, pack, partition_of  # noqa: E402

PREFIX, PARTITIONS, LEASE_MS = "chaos", 8, 2000
MODEL = ModelConfig(input_dim=16, memory_dim=16, output_dim=4, hidden=16, slots=256, top_k=5)


def make_input(n: int, memories: int, seed: int) -> list[tuple[int, str, bytes, str | None]]:
    """(partition, entry id, msg, query id) with explicit, increasing ids per partition."""
    rng = np.random.default_rng(seed)
    base = int(time.time() * 1000)
    out = []
    for j in range(n):
        name = f"user-{int(rng.integers(0, memories))}"
        p = partition_of(name, PARTITIONS)
        u = rng.random()
        qid = None
        if u < 0.6:
            msg = {
                "op": "write",
                "memory": name,
                "x": rng.standard_normal(MODEL.input_dim).astype("<f4").tobytes(),
            }
        else:
            qid = f"q{j}"
            key = "x" if u < 0.8 else "q"
            dim = MODEL.input_dim if key == "x" else MODEL.memory_dim
            msg = {
                "op": "query",
                "memory": name,
                "id": qid,
                key: rng.standard_normal(dim).astype("<f4").tobytes(),
            }
        out.append((p, f"{base}-{j}", pack(msg), qid))
    return out


def produce(url: str, entries: list, rate: float, done: threading.Event) -> None:
    """XADD at about ``rate`` entries/s; retries through outages (explicit ids: idempotent)."""
    keys = Keys(PREFIX)
    client = redis.Redis.from_url(url, socket_timeout=2)
    started = time.monotonic()
    for n in range(0, len(entries), 100):
        while time.monotonic() - started < n / rate:
            time.sleep(0.005)
        for p, entry_id, msg, _ in entries[n : n + 100]:
            while True:
                try:
                    client.xadd(keys.inp(p), {"msg": msg}, id=entry_id)
                    break
                except redis.ResponseError as e:
                    if "equal or smaller" in str(e):
                        break  # an earlier try landed before its reply was lost
                    raise
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.2)
    done.set()


class Cluster:
    def __init__(self, workdir: Path, url: str, model: Path, count: int) -> None:
        self.workdir, self.url, self.model = workdir, url, model
        workdir.mkdir(parents=True, exist_ok=True)
        self.workers: dict[str, WorkerProcess] = {}
        self.serial = 0
        for _ in range(count):
            self.start()

    def start(self) -> str:
        self.serial += 1
        name = f"w{self.serial}"
        env = {
            "REDIS_URL": self.url,
            "MEMNET_MODEL": str(self.model),
            "MEMNET_SNAPSHOT_DIR": str(self.workdir / "snapshots"),
            "MEMNET_PREFIX": PREFIX,
            "MEMNET_PARTITIONS": str(PARTITIONS),
            "MEMNET_LEASE_MS": str(LEASE_MS),
            "MEMNET_BATCH_SIZE": "200",
            "MEMNET_SNAPSHOT_EVERY_ENTRIES": "2000",
            "MEMNET_SNAPSHOT_EVERY_S": "5",
            "MEMNET_WORKER_ID": name,
        }
        self.workers[name] = WorkerProcess(env, self.workdir / f"{name}.log")
        return name

    def stop_all(self) -> None:
        for w in self.workers.values():
            if w.proc.poll() is None:
                w.stop(20)


def all_owned_by(client: redis.Redis, live: set[str]) -> bool:
    try:
        held = owners(client, PREFIX, PARTITIONS)
    except redis.RedisError:
        return False
    return all(h in live for h in held)


def wait_recovered(client: redis.Redis, cluster: Cluster, killed: str, began: float) -> float:
    live = {n for n, w in cluster.workers.items() if w.proc.poll() is None and n != killed}
    while not all_owned_by(client, live):
        time.sleep(0.05)
        live = {n for n, w in cluster.workers.items() if w.proc.poll() is None and n != killed}
    return time.monotonic() - began


def kill_one(
    server: RedisServer, cluster: Cluster, rng: random.Random, recoveries: list[float]
) -> threading.Thread:
    """SIGKILL a random worker, restart one a second later, time the takeover."""
    live = [n for n, w in cluster.workers.items() if w.proc.poll() is None]
    name = rng.choice(live)
    began = time.monotonic()
    cluster.workers[name].kill()
    time.sleep(1.0)
    cluster.start()

    def measure() -> None:
        recoveries.append(wait_recovered(server.client(), cluster, name, began))
        print(
            f"  killed {name}: its partitions were owned again after {recoveries[-1]:.2f} s",
            flush=True,
        )

    thread = threading.Thread(target=measure)
    thread.start()
    return thread


def pause_one(cluster: Cluster, rng: random.Random) -> None:
    """SIGSTOP a worker for 2.5 leases, then SIGCONT it (it comes back as a zombie)."""
    name = rng.choice([n for n, w in cluster.workers.items() if w.proc.poll() is None])
    cluster.workers[name].signal(signal.SIGSTOP)
    threading.Timer(
        2.5 * LEASE_MS / 1000, cluster.workers[name].signal, args=(signal.SIGCONT,)
    ).start()
    print(f"  paused {name} for {2.5 * LEASE_MS / 1000:.1f} s", flush=True)


def restart_redis(server: RedisServer) -> None:
    """SIGKILL Redis and start it again from its append-only file."""
    server.stop(kill=True)
    time.sleep(1.0)
    server.start()
    print("  killed and restarted Redis", flush=True)


def chaos(
    server: RedisServer, cluster: Cluster, done: threading.Event, every_s: float, rng: random.Random
) -> list[float]:
    """Faults every few seconds until the producer is done; recovery time of each kill."""
    plan = ["kill", "pause", "redis"]
    recoveries: list[float] = []
    timers = []
    while not done.wait(every_s):
        action = plan.pop(0) if plan else "kill"
        if action == "pause":
            pause_one(cluster, rng)
        elif action == "redis":
            restart_redis(server)
        else:
            timers.append(kill_one(server, cluster, rng, recoveries))
    for t in timers:
        t.join()
    return recoveries


def wait_answered(client: redis.Redis, queries: int, timeout_s: float) -> None:
    keys = Keys(PREFIX)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if sum(client.xlen(keys.out(p)) for p in range(PARTITIONS)) >= queries:
                return
        except redis.RedisError:
            pass
        time.sleep(0.2)


def reference(workdir: Path, model: Path, entries: list) -> RedisServer:
    """The same input through one uninterrupted worker on a fresh Redis (left running)."""
    server = RedisServer(workdir / "ref-redis")
    keys, client = Keys(PREFIX), server.client()
    pipe = client.pipeline(transaction=False)
    for p, entry_id, msg, _ in entries:
        pipe.xadd(keys.inp(p), {"msg": msg}, id=entry_id)
    pipe.execute()
    ref = Cluster(workdir / "ref", server.url, model, 1)
    wait_answered(client, sum(1 for e in entries if e[3]), 600)
    ref.stop_all()
    return server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--memories", type=int, default=300)
    parser.add_argument("--rate", type=float, default=300.0, help="events per second")
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds")
    parser.add_argument("--quick", action="store_true", help="6k events at 400/s (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.events, args.rate, args.kill_every = 6000, 250.0, 3.0
    workdir = Path(tempfile.mkdtemp(prefix="memnet-chaos-"))
    model = workdir / "model.safetensors"
    save_model(random_model(MODEL, seed=args.seed), model)
    entries = make_input(args.events, args.memories, args.seed)
    queries = sum(1 for e in entries if e[3])
    print(
        f"chaos: {args.events} events ({queries} queries) over {args.memories} memories, "
        f"3 workers, {PARTITIONS} partitions, in {workdir}",
        flush=True,
    )
    server = RedisServer(workdir / "redis", "--appendonly", "yes", "--appendfsync", "always")
    try:
        cluster = Cluster(workdir / "run", server.url, model, 3)
        done = threading.Event()
        producer = threading.Thread(target=produce, args=(server.url, entries, args.rate, done))
        began = time.monotonic()
        producer.start()
        recoveries = chaos(server, cluster, done, args.kill_every, random.Random(args.seed))
        producer.join()
        wait_answered(server.client(), queries, 300)
        elapsed = time.monotonic() - began
        cluster.stop_all()
        ref = reference(workdir, model, entries)
        try:
            figures = compare(
                server.client(),
                ref.client(),
                workdir / "run" / "snapshots",
                workdir / "ref" / "snapshots",
                model,
                entries,
                PREFIX,
                PARTITIONS,
            )
        finally:
            ref.stop()
    finally:
        server.stop()
    figures.update(
        events=args.events,
        queries=queries,
        seconds=round(elapsed, 1),
        kills=len(recoveries),
        recovery_s=[round(r, 2) for r in recoveries],
    )
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0 if all(figures[c] == 0 for c in COUNTS) else 1


if __name__ == "__main__":
    sys.exit(main())
