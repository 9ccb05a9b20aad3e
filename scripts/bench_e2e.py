"""End-to-end benchmark pieces: a producer and a subscriber process, and the harness that
runs them around real `memnet worker` processes on a private redis-server.

    python scripts/bench_e2e.py produce URL WORKLOAD N MEMORIES SEED RATE INPUT_DIM MEMORY_DIM
    python scripts/bench_e2e.py subscribe URL EXPECTED OUT.json
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.protocol import Keys, pack, partition_of  # noqa: E402
from worker.servers import RedisServer  # noqa: E402

PREFIX, PARTITIONS = "bench", 8


def workload(kind: str, n: int, memories: int, seed: int, dims: tuple[int, int]) -> list[dict]:
    """writes / queries / mixed (alternating) events; queries in memory space as the
    reference does. Mixed: a write, then a query of the memory just written, memory by
    memory in turn (``j % memories`` sent every write of an even count of memories to even
    ones and every query to odd ones, never written, before 2026-12-07)."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        turn = j // 2 if kind == "mixed" else j
        memory = f"m{turn % memories}" if memories > 1 else "m"
        write = kind == "writes" or (kind == "mixed" and j % 2 == 0)
        if write:
            out.append(
                {
                    "op": "write",
                    "memory": memory,
                    "x": rng.standard_normal(dims[0]).astype("<f4").tobytes(),
                }
            )
        else:
            out.append(
                {
                    "op": "query",
                    "memory": memory,
                    "id": str(j),
                    "q": rng.standard_normal(dims[1]).astype("<f4").tobytes(),
                }
            )
    return out


def produce(
    url: str, kind: str, n: int, memories: int, seed: int, rate: float, dims: tuple[int, int]
) -> None:
    client, keys = redis.Redis.from_url(url), Keys(PREFIX)
    events = [
        (keys.inp(partition_of(e["memory"], PARTITIONS)), pack(e))
        for e in workload(kind, n, memories, seed, dims)
    ]
    last: dict[str, str] = {}
    started, cpu = time.time(), time.process_time()
    chunk = 4 if rate else 500  # at a set rate, a near-steady stream rather than bursts
    for i in range(0, n, chunk):
        if rate:
            wait = started + i / rate - time.time()
            if wait > 0:
                time.sleep(wait)
        pipe = client.pipeline(transaction=False)
        for key, msg in events[i : i + chunk]:
            pipe.xadd(key, {"msg": msg})
        for (key, _), entry_id in zip(events[i : i + chunk], pipe.execute(), strict=True):
            last[key] = entry_id.decode()
    print(json.dumps({"started": started, "last": last, "cpu_s": time.process_time() - cpu}))


def subscribe(url: str, expected: int, out: str) -> None:
    client, keys = redis.Redis.from_url(url), Keys(PREFIX)
    positions = {keys.out(p): "0-0" for p in range(PARTITIONS)}
    latencies, cpu = [], time.process_time()  # (blocked until the first response: no CPU)
    while len(latencies) < expected:
        for stream, entries in client.xread(positions, count=1000, block=1000) or []:
            now = time.time() * 1000
            for entry_id, fields in entries:
                positions[stream.decode()] = entry_id.decode()
                assert "error" not in msgpack.unpackb(fields[b"msg"], raw=False)
                latencies.append(now - int(entry_id.split(b"-")[0]))
    done = {"latencies_ms": latencies, "done": time.time(), "cpu_s": time.process_time() - cpu}
    Path(out).write_text(json.dumps(done))


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split()[1] for line in status if line.startswith("Vm")}
    return {"rss_mb": int(fields["VmRSS"]) / 1024, "peak_rss_mb": int(fields["VmHWM"]) / 1024}


def run(
    model: Path,
    cache: Path,
    workers: int,
    kind: str,
    n: int,
    memories: int,
    rate: float,
    dims: tuple[int, int],
    seed: int = 1,
    env: dict[str, str] | None = None,
) -> dict:
    """One end-to-end measurement: events/s, query latency percentiles, worker RSS. env:
    settings of the workers beyond the harness's (e.g. MEMNET_SCAN)."""
    with tempfile.TemporaryDirectory(prefix="memnet-bench-") as tmp:
        work = Path(tmp)
        (work / "snap").mkdir()
        (work / "snap" / "index-cache").symlink_to(cache.resolve())
        server = RedisServer(work / "redis")
        procs = []
        try:
            procs = [_worker(server.url, model, work, i, env or {}) for i in range(workers)]
            _wait_owned(server.client(), procs)
            return _measure(server, procs, work, kind, n, memories, rate, dims, seed)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)
            server.stop()


def _worker(url: str, model: Path, work: Path, i: int, extra: dict[str, str]) -> subprocess.Popen:
    port = _free_port()
    env = {
        **os.environ,
        **extra,
        "REDIS_URL": url,
        "MEMNET_MODEL": str(model),
        "MEMNET_PREFIX": PREFIX,
        "MEMNET_SNAPSHOT_DIR": str(work / "snap"),
        "MEMNET_PARTITIONS": str(PARTITIONS),
        "MEMNET_LOG_LEVEL": "WARNING",
        "MEMNET_WORKER_ID": f"bench{i}",
    }
    env.pop("PORT", None)
    env["MEMNET_METRICS_PORT"] = str(port)  # (its steps: _steps)
    with open(work / f"worker{i}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "worker"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    proc.metrics_port = port  # type: ignore[attr-defined]
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _steps(procs: list[subprocess.Popen]) -> tuple[float, float] | None:
    """(steps, seconds) every worker has spent so far in steps that had entries (read to
    commit: its memnet_batch_seconds histogram, from its metrics endpoint); None for
    processes that serve no metrics (bench_small's bare transport loop)."""
    ports = [getattr(p, "metrics_port", None) for p in procs]
    if None in ports:
        return None
    count = total = 0.0
    for port in ports:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            for line in reply.read().decode().splitlines():
                name, _, value = line.partition(" ")
                if name == "memnet_batch_seconds_count":
                    count += float(value)
                elif name == "memnet_batch_seconds_sum":
                    total += float(value)
    return count, total


def _wait_owned(client: redis.Redis, procs: list[subprocess.Popen]) -> None:
    keys = Keys(PREFIX)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a benchmark worker exited during start-up")
        holders = [client.get(keys.part(p, "lease")) for p in range(PARTITIONS)]
        if None not in holders and len(set(holders)) == len(procs):
            return
        time.sleep(0.1)
    raise RuntimeError("benchmark workers did not take the partitions")


def _measure(
    server: RedisServer,
    procs: list[subprocess.Popen],
    work: Path,
    kind: str,
    n: int,
    memories: int,
    rate: float,
    dims: tuple[int, int],
    seed: int,
) -> dict:
    queries = sum(e["op"] == "query" for e in workload(kind, n, memories, seed, dims))
    me = [sys.executable, str(Path(__file__).resolve())]
    pids = {"workers": [p.pid for p in procs], "redis": [server.proc.pid]}  # type: ignore[union-attr]
    cpu_before = {name: sum(map(cpu_s, ps)) for name, ps in pids.items()}
    steps_before = _steps(procs)
    sub = subprocess.Popen([*me, "subscribe", server.url, str(queries), str(work / "sub.json")])
    out = subprocess.run(
        [
            *me,
            "produce",
            server.url,
            kind,
            str(n),
            str(memories),
            str(seed),
            str(rate),
            str(dims[0]),
            str(dims[1]),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    produced = json.loads(out.stdout)
    done = _wait_committed(server.client(), produced["last"])
    cpu = {name: sum(map(cpu_s, ps)) - cpu_before[name] for name, ps in pids.items()}
    steps_after = _steps(procs)
    sub.wait(120)
    subscribed = json.loads((work / "sub.json").read_text())
    latencies = np.array(subscribed["latencies_ms"] or [0.0])
    cpu.update(producer=produced["cpu_s"], subscriber=subscribed["cpu_s"])
    result = {
        "events": n,
        "events_per_s": n / (done - produced["started"]),
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        # CPU per event of each process while the stream went through: what the machine's
        # cores had to hold (the workers' includes their waits' polling; Redis's its scripts)
        "cpu_us_per_event": {name: 1e6 * s / n for name, s in cpu.items()},
    }
    if steps_before is not None and steps_after is not None:
        # the workers' steps with entries: how many, their mean size and time (process and
        # commit), and the share of the stream's wall time the workers spent in them
        steps, busy = (b - a for a, b in zip(steps_before, steps_after, strict=True))
        result["steps"] = {
            "count": int(steps),
            "events_per_step": n / max(steps, 1),
            "ms_per_step": 1e3 * busy / max(steps, 1),
            "busy": busy / ((done - produced["started"]) * len(procs)),
        }
    rss = [rss_mb(p.pid) for p in procs]
    result["worker_rss_mb"] = max(r["rss_mb"] for r in rss)
    result["worker_peak_rss_mb"] = max(r["peak_rss_mb"] for r in rss)
    return result


def _wait_committed(client: redis.Redis, last: dict[str, str]) -> float:
    """Wall time when every partition's committed offset reached its last input entry."""
    keys = Keys(PREFIX)
    offsets = {key: key.replace(":in", ":offset") for key in last}
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        values = client.mget(list(offsets.values()))
        if all(
            v is not None and _ge(v.decode(), last[k]) for k, v in zip(offsets, values, strict=True)
        ):
            return time.time()
        time.sleep(0.01)
    del keys
    raise RuntimeError("the workers did not finish the benchmark stream")


def _ge(a: str, b: str) -> bool:
    return tuple(map(int, a.split("-"))) >= tuple(map(int, b.split("-")))


if __name__ == "__main__":
    cmd, args = (sys.argv[1:2] or ["--help"])[0], sys.argv[2:]
    if cmd not in ("produce", "subscribe"):
        print(__doc__.strip())
        sys.exit(0 if cmd in ("-h", "--help") else 2)
    if cmd == "produce":
        produce(
            args[0],
            args[1],
            int(args[2]),
            int(args[3]),
            int(args[4]),
            float(args[5]),
            (int(args[6]), int(args[7])),
        )
    elif cmd == "subscribe":
        subscribe(args[0], int(args[1]), args[2])
