#!/usr/bin/env python
"""How fast `memnet rebuild` runs a new model over a deployment's history, beside how fast a
worker served that history, measured in one run.

A private redis-server; one worker (in-process, burst mode, the `memnet worker` code) serves
N events of the "many small memories" workload (a 64-slot, 8-dim model, M memories, half
writes, half queries in memory space) with snapshots every 2,000 entries, so most of the input
is trimmed into the archive; then `rebuild` computes a second model's snapshots over the whole
history (archive + Redis), with --jobs 1 and 2. Prints events/s of each and the ratios. As on
one machine running `memnet worker` then `memnet rebuild`, both keep compiled functions in
the cache directory (a fresh one per run): the worker compiles them (its warm-up is in its
time), the rebuild finds those of the same shapes there.

    .venv/bin/python scripts/bench_rebuild.py                    # 100,000 events
    .venv/bin/python scripts/bench_rebuild.py --events 20000 --memories 2000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from memnet import ModelConfig, random_model, save_model
from memnet.batching import keep_compilations
from worker.protocol import Keys, pack, partition_of
from worker.servers import RedisServer
from worker.settings import Settings
from worker.upgrade import rebuild
from worker.worker import Worker

MODEL = ModelConfig(input_dim=8, memory_dim=8, output_dim=3, hidden=16, slots=64, top_k=5)
PARTITIONS = 8


def workload(n: int, memories: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        name = f"user-{int(rng.integers(memories))}"
        v = rng.standard_normal(8).astype("<f4").tobytes()
        out.append(
            {"op": "write", "memory": name, "x": v}
            if j % 2 == 0
            else {"op": "query", "memory": name, "id": f"q{j}", "q": v}
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--memories", type=int, default=10_000)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="memnet-rebuild-") as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis")
        try:
            figures = run(server, work, args.events, args.memories)
        finally:
            server.stop()
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


def run(server: RedisServer, work: Path, n: int, memories: int) -> dict:
    a, b = work / "a.safetensors", work / "b.safetensors"
    save_model(random_model(MODEL, seed=1), a)
    save_model(random_model(MODEL, seed=2), b)
    settings = Settings(
        redis_url=server.url, model=a, snapshot_dir=work / "snap", cache_dir=work / "cache",
        partitions=PARTITIONS, prefix="bench", snapshot_every_entries=2000,
    )  # fmt: skip
    r, keys = server.client(), Keys("bench")
    pipe = r.pipeline(transaction=False)
    for e in workload(n, memories):
        pipe.xadd(keys.inp(partition_of(e["memory"], PARTITIONS)), {"msg": pack(e)})
    pipe.execute()
    keep_compilations(settings.cache_dir)  # as `memnet worker` does (serve); the rebuild too
    worker = Worker(settings)
    worker.engine.warm_up(settings.batch_size * settings.partitions)  # (compiled before the
    began = time.perf_counter()  # clock, as a serving worker is: events arrive after that)
    worker.run(burst=True)
    served = time.perf_counter() - began
    left = sum(r.xlen(keys.inp(p)) for p in range(PARTITIONS))
    figures: dict = {
        "events": n,
        "memories": memories,
        "worker_events_per_s": round(n / served),
        "input_left_in_redis": left,
    }
    for jobs in (1, 2):
        began = time.perf_counter()
        done = rebuild(settings, b, jobs)
        took = time.perf_counter() - began
        assert sum(d["entries"] for d in done) == n, done
        figures[f"rebuild_jobs{jobs}_events_per_s"] = round(n / took)
        for path in (work / "snap").glob(f"p*/{_fp(b)}"):  # start again from nothing
            shutil.rmtree(path)
    for jobs in (1, 2):
        figures[f"ratio_jobs{jobs}"] = round(
            figures[f"rebuild_jobs{jobs}_events_per_s"] / figures["worker_events_per_s"], 2
        )
    return figures


def _fp(path: Path) -> str:
    from memnet import load_model

    return load_model(path).fingerprint[:16]


if __name__ == "__main__":
    sys.exit(main())
