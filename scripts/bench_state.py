#!/usr/bin/env python
"""State beyond RAM: a million memories of a small model on one worker, within its budget.

    python scripts/bench_state.py           # 1,000,000 on disk, 100,000 on S3: ~23 min here
    python scripts/bench_state.py --quick   # 100,000 on disk, 10,000 on S3: ~2 min
    python scripts/bench_state.py --json    # the results as JSON on stdout (progress: stderr)

Measured in-process, without Redis, through the worker's own data path (worker/partition.py):
one worker owning ``--partitions`` partitions, its ``--resident-mb`` split evenly over them
as worker/ownership.py does. Each step hands every partition about MEMNET_BATCH_SIZE
protocol-encoded entries (``prepare``: fetches cold memories), runs one engine call over all
of them, ``finish``es each (evicts) and counts it committed; then a partition whose snapshot
is due by the worker's rule (entries, seconds, or over budget) is snapshotted, which evicts
what the budget does not hold. The model: 64 slots of 8 dims (searched exactly).

Phases: write N distinct memories once each (RSS, snapshots, evictions); write 1%, then
0.1%, of them (chosen at random, so mostly cold) and time the snapshot that follows; then
queries on evicted memories, alone and 100 to a batch, beside queries on resident ones.

Each store is measured in a process of its own (RSS starts fresh); the S3 server (moto,
worker/servers.py) runs in another still. moto takes about 2 ms a PUT here, so the S3 store
gets fewer memories (``--s3-memories``) and the directory store is measured at that size too;
a run with fewer memories than ``--memories`` gets the same fraction of the budget. moto
also scans its whole bucket for every LIST (a snapshot lists its manifests a few times), so
its fixed cost per snapshot grows with the bucket, which real S3 does not.

Of the default run's time here, about 9 minutes write the million memories and 5 delete
their million files afterwards (ext4); the load average goes in the results, as a shared
2-core machine changes these figures by 2x from one run to the next.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import Engine, ModelConfig, random_model  # noqa: E402
from memnet.snapshot import SnapshotStore  # noqa: E402
from memnet.store import Store, open_store  # noqa: E402
from worker.ownership import model_prefix  # noqa: E402
from worker.partition import Partition  # noqa: E402
from worker.protocol import pack, partition_of  # noqa: E402
from worker.settings import Settings  # noqa: E402

MODEL = ModelConfig(input_dim=8, memory_dim=8, output_dim=3, hidden=16, slots=64, top_k=5)
BATCH = 100  # cold memories in one batch
REPEATS = 3  # snapshots after a fraction of the memories changed
S3_SERVER = """import json, sys
from worker.servers import S3Server
with S3Server() as s:
    print(json.dumps([s.env(), s.url()]), flush=True)
    sys.stdin.read()
"""


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def rss_mb() -> dict[str, float]:
    lines = Path("/proc/self/status").read_text().splitlines()
    vm = {line.split(":")[0]: int(line.split()[1]) for line in lines if line.startswith("Vm")}
    return {"rss": round(vm["VmRSS"] / 1024, 1), "peak": round(vm["VmHWM"] / 1024, 1)}


def metric(name: str) -> int:
    from prometheus_client import REGISTRY

    return int(REGISTRY.get_sample_value(name) or 0)


class Counting:
    """A store that counts the requests and bytes going through it."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.url = inner, inner.url
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # (put_many and get_many call from threads)

    def _add(self, **n: int) -> None:
        with self._lock:
            self.counts.update(n)

    def get(self, key: str) -> bytes:
        data = self.inner.get(key)
        self._add(gets=1, get_bytes=len(data))
        return data

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        self._add(puts=1, put_bytes=len(data))

    def create(self, key: str, data: bytes) -> None:
        self.inner.create(key, data)
        self._add(puts=1, put_bytes=len(data))

    def list(self, prefix: str) -> list[Any]:
        self._add(lists=1)
        return self.inner.list(prefix)

    def delete(self, keys: Any) -> None:
        keys = list(keys)
        self.inner.delete(keys)
        self._add(deletes=len(keys))

    def __getattr__(self, name: str) -> Any:  # remove_temporary
        return getattr(self.inner, name)


class Harness:
    """The worker's data path without Redis: its partitions, one engine call a step."""

    def __init__(self, engine: Engine, store: Counting, partitions: int, budget: int) -> None:
        s = Settings()
        self.engine, self.store, self.settings = engine, store, s
        self.parts = [
            Partition(
                p,
                1,
                engine,
                SnapshotStore(
                    store, engine, s.snapshots_kept, model_prefix(p, engine.model.fingerprint)
                ),
                partitions,
                s.max_message_bytes,
                budget // partitions,
            )
            for p in range(partitions)
        ]
        for part in self.parts:
            part.restore()
        self.seq = 0
        self.snapshots: list[tuple[float, int]] = []  # (seconds, memories written)

    def step(self, messages: list[dict[str, Any]]) -> float:
        """Apply messages as one worker step (each partition's share a batch); seconds."""
        work: dict[int, list[tuple[str, dict[bytes, Any]]]] = {}
        for m in messages:
            self.seq += 1
            p = partition_of(m["memory"], len(self.parts))
            work.setdefault(p, []).append((f"1-{self.seq}", {b"msg": pack(m)}))
        started = time.perf_counter()
        pending = {p: self.parts[p].prepare(entries) for p, entries in work.items()}
        results = self.engine.process([it for pend in pending.values() for it in pend.items])
        at = 0
        for p, pend in pending.items():
            part = self.parts[p]
            batch = part.finish(pend, results[at : at + len(pend.items)])
            at += len(pend.items)
            assert not batch.dead, batch.dead[:1]
            part.uncommitted, part.committed = False, batch.last_id  # what a commit records
        return time.perf_counter() - started

    def snapshot(self, part: Partition) -> float:
        n = len(part.dirty)
        started = time.perf_counter()
        part.snapshot()
        took = time.perf_counter() - started
        self.snapshots.append((took, n))
        return took

    def snapshot_due(self) -> None:
        every = (self.settings.snapshot_every_entries, self.settings.snapshot_every_s)
        for part in self.parts:
            if part.snapshot_due(*every):
                self.snapshot(part)

    def snapshot_all(self) -> float:
        return sum(self.snapshot(part) for part in self.parts if part.dirty or part.deleted)

    def resident(self, name: str) -> bool:
        return name in self.parts[partition_of(name, len(self.parts))].memories


def writes(names: list[str], rng: np.random.Generator) -> list[dict[str, Any]]:
    xs = rng.standard_normal((len(names), MODEL.input_dim)).astype("<f4")
    return [{"op": "write", "memory": n, "x": x.tobytes()} for n, x in zip(names, xs, strict=True)]


def query(name: str, rng: np.random.Generator) -> dict[str, Any]:
    q = rng.standard_normal(MODEL.memory_dim).astype("<f4")
    return {"op": "query", "memory": name, "id": name, "q": q.tobytes()}


def write_all(h: Harness, names: list[str], rng: np.random.Generator, snapshots: bool) -> float:
    chunk = h.settings.batch_size * len(h.parts)  # about a batch for each partition
    took = 0.0
    for start in range(0, len(names), chunk):
        took += h.step(writes(names[start : start + chunk], rng))
        if snapshots:
            h.snapshot_due()
    return took


def populate(h: Harness, n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Write memories user-0 .. user-(n-1) once each, snapshotting as the worker would."""
    started = time.perf_counter()
    step_s = 0.0
    for start in range(0, n, 100_000):  # (names made a slice at a time: RSS is the point)
        names = [f"user-{i}" for i in range(start, min(n, start + 100_000))]
        step_s += write_all(h, names, rng, snapshots=True)
        say(f"  {start + len(names):,} written, {len(h.snapshots)} snapshots, {rss_mb()}")
    during = list(h.snapshots)
    last_s = h.snapshot_all()  # (what a stop would write)
    took = [s for s, _ in h.snapshots]
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "writes_per_s": round(n / step_s),
        "snapshots": len(h.snapshots),
        "snapshot_s": round(sum(took), 1),
        "snapshot_max_s": round(max(took), 2),
        "first_snapshot": {"seconds": round(took[0], 2), "memories": h.snapshots[0][1]},
        "snapshots_during": len(during),
        "last_snapshot_s": round(last_s, 2),
    }


def change(h: Harness, n: int, fraction: float, rng: np.random.Generator) -> dict[str, Any]:
    """Write to ``fraction`` of the memories (at random), then snapshot every partition;
    REPEATS times, each with other memories. Requests and bytes: the last time's."""
    k = max(1, round(n * fraction))
    times, cold, loads = [], 0, metric("memnet_memory_loads_total")
    full = False
    for _ in range(REPEATS):
        names = [f"user-{i}" for i in rng.choice(n, k, replace=False)]
        cold += sum(not h.resident(name) for name in names)
        write_all(h, names, rng, snapshots=False)
        before = Counter(h.store.counts)
        times.append(h.snapshot_all())
        written = Counter(h.store.counts)
        written.subtract(before)
        full |= any(p.store.head and p.store.head[1]["parent"] is None for p in h.parts)
    return {
        "memories": k,
        "cold": cold // REPEATS,
        "loads": (metric("memnet_memory_loads_total") - loads) // REPEATS,
        "snapshot_s": round(float(np.median(times)), 3),
        "snapshot_max_s": round(max(times), 3),
        "objects_written": written["puts"],
        "bytes_written": written["put_bytes"],
        "blobs_deleted": written["deletes"],
        "full_index": full,
    }


def cold_name(h: Harness, n: int, rng: np.random.Generator, p: int | None = None) -> str:
    while True:
        name = f"user-{int(rng.integers(n))}"
        right = p is None or partition_of(name, len(h.parts)) == p
        if right and not h.resident(name):
            return name


def percentiles(seconds: list[float], per: int = 1) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000 / per
    p50, p99 = np.percentile(ms, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3), "n": len(ms)}


def cold_loads(h: Harness, n: int, samples: int, batches: int, rng: np.random.Generator) -> dict:
    """A query alone in its step on an evicted memory, then on the same one again
    (resident now); then queries on BATCH evicted memories of one partition in one step."""
    cold, warm = [], []
    for _ in range(samples):
        name = cold_name(h, n, rng)
        cold.append(h.step([query(name, rng)]))
        warm.append(h.step([query(name, rng)]))
    batched = []
    for b in range(batches):
        p = b % len(h.parts)
        names: set[str] = set()
        while len(names) < BATCH:
            names.add(cold_name(h, n, rng, p))
        batched.append(h.step([query(name, rng) for name in sorted(names)]))
    return {
        "one_cold": percentiles(cold),
        "one_resident": percentiles(warm),
        "batch_per_memory": percentiles(batched, BATCH),
        "batch": percentiles(batched),
    }


def measure(engine: Engine, url: str, args: argparse.Namespace) -> dict[str, Any]:
    n, rng = args.memories, np.random.default_rng(1)
    store = Counting(open_store(url))
    h = Harness(engine, store, args.partitions, args.budget_bytes)
    out: dict[str, Any] = {"rss_mb": {"warm": rss_mb()}}
    say(f"{args.run}: writing {n:,} memories")
    out["populate"] = populate(h, n, rng)
    out["rss_mb"]["written"] = rss_mb()
    out["evictions_populate"] = metric("memnet_memory_evictions_total")
    out["changed"] = {}
    for label, fraction in (("1%", 0.01), ("0.1%", 0.001)):
        say(f"{args.run}: {label} changed")
        out["changed"][label] = change(h, n, fraction, rng)
    say(f"{args.run}: cold loads")
    out["cold"] = cold_loads(h, n, args.samples, args.batches, rng)
    out["rss_mb"]["end"] = rss_mb()
    out["resident"] = {
        "memories": sum(len(p.memories) for p in h.parts),
        "bytes": sum(p.resident_bytes for p in h.parts),
        "budget_bytes": args.budget_bytes,
    }
    out["loads"] = metric("memnet_memory_loads_total")
    out["evictions"] = metric("memnet_memory_evictions_total")
    out["store_requests"] = dict(store.counts)
    return out


@contextlib.contextmanager
def s3_server() -> Iterator[tuple[dict[str, str], str]]:
    """moto's S3 server in a process of its own: its objects and threads count neither in
    the measured process's RSS nor against its interpreter lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", S3_SERVER],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        env, url = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        yield env, url
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=60)


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One store, one size, in this process (started by ``main``)."""
    from worker.worker import release_free_heap

    engine = Engine(random_model(MODEL, seed=0))
    engine.warm_up(args.batch_size)
    release_free_heap(Settings().gc_threshold)  # as the worker does after start-up
    with contextlib.ExitStack() as stack:
        if args.run == "s3":
            env, url = stack.enter_context(s3_server())
            os.environ.update(env)
        else:
            work = stack.enter_context(tempfile.TemporaryDirectory(prefix="memnet-state-"))
            url = work
        result = measure(engine, url, args)
        say(f"{args.run}: done; removing the store")
    return {"store": args.run, "memories": args.memories, **result}


def child(kind: str, memories: int, budget_bytes: int, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--run", kind, "--memories", str(memories)]
        cmd += ["--budget-bytes", str(budget_bytes), "--result", f.name]
        cmd += ["--partitions", str(args.partitions), "--samples", str(args.samples)]
        cmd += ["--batches", str(args.batches)]
        subprocess.run(cmd, check=True)
        return json.loads(Path(f.name).read_text())


def summary(r: dict[str, Any]) -> list[tuple[str, str]]:
    """One run's results as the table's lines (label, cell)."""
    rss, pop, res = r["rss_mb"], r["populate"], r["resident"]
    out = [
        ("memories", f"{r['memories']:,}"),
        ("budget MB (all partitions)", f"{res['budget_bytes'] / 2**20:.1f}"),
        ("RSS MB after warm-up", f"{rss['warm']['rss']:.0f}"),
        ("RSS MB after all written", f"{rss['written']['rss']:.0f}"),
        ("RSS MB at the end (peak)", "{rss:.0f} ({peak:.0f})".format(**rss["end"])),
        ("resident memories (MB estimated)", f"{res['memories']:,} ({res['bytes'] / 2**20:.1f})"),
        ("evictions / loads (all phases)", f"{r['evictions']:,} / {r['loads']:,}"),
        ("populate: writes/s", f"{pop['writes_per_s']:,}"),
        (
            "  snapshots (total s, max s)",
            "{snapshots} ({snapshot_s}, {snapshot_max_s})".format(**pop),
        ),
        (
            "  first snapshot s (memories)",
            "{seconds} ({memories:,})".format(**pop["first_snapshot"]),
        ),
    ]
    for label, c in r["changed"].items():
        out += [
            (f"{label} changed: memories (cold)", f"{c['memories']:,} ({c['cold']:,})"),
            ("  snapshot s: median (max)", f"{c['snapshot_s']} ({c['snapshot_max_s']})"),
            (
                "  objects / KB written",
                f"{c['objects_written']} / {c['bytes_written'] / 1024:,.0f}",
            ),
            ("  full index written", "yes" if c["full_index"] else "no"),
        ]
    for key, label in (
        ("one_resident", "query, resident"),
        ("one_cold", "query, evicted"),
        ("batch_per_memory", f"{BATCH} evicted in a batch, each"),
    ):
        out.append((f"{label}: p50 / p99 ms", "{p50_ms} / {p99_ms}".format(**r["cold"][key])))
    return out


def table(results: list[dict[str, Any]]) -> str:
    columns = [summary(r) for r in results]
    width = max(len(label) for label, _ in columns[0])
    lines = [f"{'':{width}}" + "".join(f"{r['store']:>20}" for r in results)]
    for i, (label, _) in enumerate(columns[0]):
        lines.append(f"{label:{width}}" + "".join(f"{col[i][1]:>20}" for col in columns))
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    load = round(os.getloadavg()[1], 1)  # (5 minutes)
    return {"cpu": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "load": load}


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 memories, 10,000 on S3")
    parser.add_argument("--memories", type=int, help="default 1,000,000 (--quick 100,000)")
    parser.add_argument("--s3-memories", type=int, help="default 100,000 (--quick 10,000)")
    parser.add_argument("--resident-mb", type=int, help="for --memories; default 256 (quick 32)")
    parser.add_argument("--partitions", type=int, default=8, help="owned by the one worker")
    parser.add_argument("--stores", default="dir,s3", help="dir, s3 or both")
    parser.add_argument("--samples", type=int, help="single cold queries (default 400)")
    parser.add_argument("--batches", type=int, help=f"batches of {BATCH} cold queries (40)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    for hidden in ("--run", "--result", "--budget-bytes"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    q = args.quick
    args.memories = args.memories or (100_000 if q else 1_000_000)
    args.s3_memories = args.s3_memories or (10_000 if q else 100_000)
    args.resident_mb = args.resident_mb or (32 if q else 256)
    args.samples = args.samples or (200 if q else 400)
    args.batches = args.batches or (20 if q else 40)
    args.batch_size = Settings().batch_size
    return args


def main() -> int:
    args = parse()
    if args.run:
        args.budget_bytes = int(args.budget_bytes)
        Path(args.result).write_text(json.dumps(run_one(args)))
        return 0
    stores = args.stores.split(",")
    budget = args.resident_mb << 20
    runs = [("dir", args.memories)] if "dir" in stores else []
    if "s3" in stores:
        if "dir" in stores and args.s3_memories != args.memories:
            runs.append(("dir", args.s3_memories))
        runs.append(("s3", args.s3_memories))
    before, started = machine(), time.monotonic()
    results = [child(kind, n, budget * n // args.memories, args) for kind, n in runs]
    out = {
        "machine": before,
        "partitions": args.partitions,
        "seconds": round(time.monotonic() - started),
        "runs": results,
        "load_after": machine()["load"],
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        m = out["machine"]
        print(table(results))
        print(f"\none worker, {args.partitions} partitions; {m['cpu']} x {m['cores']}; {m['date']}")
        print(
            f"{out['seconds']} s in all; load average {m['load']} before, {out['load_after']} after"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
