"""``memnet demo``: the main job on an embedded default.

Uses REDIS_URL if set, else a private ``redis-server`` if one is installed, else an embedded
fakeredis server; writes a model, runs two workers, streams a few thousand events over many
memories, prints responses and a summary, and shuts everything down.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from memnet import ModelConfig, random_model, save_model
from worker.client import MemnetClient
from worker.connection import text
from worker.local import collect, local_redis, local_workers, send
from worker.settings import redact

MODEL = ModelConfig(input_dim=16, memory_dim=16, output_dim=4, hidden=16, slots=512, top_k=5)


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
        local_redis(Path(tmp)) as (url, where),
    ):
        prefix = f"memnet-demo-{uuid.uuid4().hex[:8]}"
        print(f"Redis: {where} ({redact(url)}), key prefix {prefix}")
        model_path = Path(tmp) / "model.safetensors"
        save_model(random_model(MODEL, seed=0), model_path)
        print(
            f"model: {model_path.name} (input {MODEL.input_dim}, memory {MODEL.memory_dim}, "
            f"{MODEL.slots} slots, top-{MODEL.top_k})"
        )
        with local_workers(url, model_path, prefix, Path(tmp)) as client:
            return _drive(client, events)


def _drive(client: MemnetClient, n: int) -> int:
    batch = _events(n, np.random.default_rng(7))
    queries = {e["id"] for e in batch if e["op"] == "query"}
    started = time.time()
    send(client, batch)
    responses, latencies = collect(client, queries)
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
    errors = sum("error" in r for r in responses.values())
    timing = (
        f"latency from XADD to response p50 {np.percentile(lat, 50):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms"
        if len(lat)
        else "no latency (no queries)"
    )
    print(
        f"  answered {len(responses)}/{len(queries)} queries, {errors} errors; {timing}; "
        f"2 workers own the 8 partitions as {'/'.join(map(str, split))}"
    )
    return 0 if len(responses) == len(queries) and not errors else 1  # (errors: a failed demo)
