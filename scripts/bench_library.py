"""In-process measurements of the memnet engine: throughput, the write path against
hnswlib's in-place update, recall against exact search, snapshot and restore times."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from memnet import Engine, load_model
from memnet.distance import rank, sqdist
from memnet.engine import SCAN_MARGIN
from memnet.exact import ExactSlots, scan
from memnet.memory import Memory
from memnet.search import GraphSlots
from memnet.snapshot import SnapshotStore

BATCH = 1000


def raw_events(
    kind: str, n: int, memories: int, dims: tuple[int, int], seed: int = 1
) -> list[tuple[str, str, np.ndarray]]:
    """(memory, "write" | "query", vector): writes carry x, queries q (memory space); mixed
    as bench_e2e.workload: a write, then a query of the memory just written."""
    rng = np.random.default_rng(seed)
    out = []
    for j in range(n):
        memory = f"m{(j // 2 if kind == 'mixed' else j) % memories}"
        if kind == "writes" or (kind == "mixed" and j % 2 == 0):
            out.append((memory, "write", rng.standard_normal(dims[0]).astype(np.float32)))
        else:
            out.append((memory, "query", rng.standard_normal(dims[1]).astype(np.float32)))
    return out


def throughput(
    engine: Engine, kind: str, n: int, memories: int, dims: tuple[int, int], batch: int = BATCH
) -> float:
    """Events per second through Engine.process in batches of batch (fresh memories)."""
    events = raw_events(kind, n, memories, dims)
    mems: dict[str, Memory] = {}
    started = time.perf_counter()
    for i in range(0, n, batch):
        items = []
        for name, op, v in events[i : i + batch]:
            memory = mems.get(name) or mems.setdefault(name, engine.new_memory())
            items.append((memory, engine.write(v) if op == "write" else engine.query(q=v)))
        engine.process(items)
    return n / (time.perf_counter() - started)


class InPlaceSlots(GraphSlots):
    """The baseline write path: every write updates the hnswlib graph in place."""

    def set(self, slot: int, vector: np.ndarray) -> None:
        self._own_base()
        self.base.update(np.array([slot]), vector[None])


def encoded_writes(engine: Engine, n: int, dims: tuple[int, int], seed: int) -> np.ndarray:
    xs = np.stack([v for _, _, v in raw_events("writes", n, 1, dims, seed)])
    return engine._encode(engine._jax, xs)  # [n, M]: I(x) of each write


def write_path(engine: Engine, n: int, dims: tuple[int, int]) -> dict:
    """G writes per second through Engine.process in batches of 1,000 (as a worker runs
    them): memnet's search structure vs every write updating the hnswlib graph in place."""
    xs = [v for _, _, v in raw_events("writes", n, 1, dims, seed=2)]
    rates = {}
    for name, make in (
        ("in_place", lambda: Memory(InPlaceSlots(engine.init_base(), engine.config.index))),
        ("memnet", engine.new_memory),
    ):
        memory = make()
        events = [(memory, engine.write(x)) for x in xs]
        started = time.perf_counter()
        for i in range(0, n, BATCH):
            engine.process(events[i : i + BATCH])
        rates[f"{name}_writes_per_s"] = n / (time.perf_counter() - started)
    rates["speedup"] = rates["memnet_writes_per_s"] / rates["in_place_writes_per_s"]
    return rates


def exact_topk(search: ExactSlots | GraphSlots, v: np.ndarray, k: int) -> np.ndarray:
    """Brute force over the current slot vectors (the truth the index must find)."""
    if isinstance(search, ExactSlots):
        vectors = search.vectors(np.arange(search.slots))
        return rank(np.arange(search.slots), sqdist(vectors, v), k)
    dist = sqdist(search.base.vectors, v)
    dist[~search.base.filled] = np.inf
    slots, rows = search.overlay()
    if len(slots):
        dist[slots] = sqdist(rows, v)
    return rank(np.arange(len(dist)), dist, k)


def recall(engine: Engine, samples: int, dims: tuple[int, int]) -> dict:
    """recall@1 of G's nearest-slot choice and recall@k of O, against exact search, on the
    benchmark's own workload (the seed model's writes, memory-space queries)."""
    memory, g, k = engine.new_memory(), engine.generalizer, engine.config.k
    encoded = encoded_writes(engine, samples, dims, seed=3)
    queries = np.stack([v for _, _, v in raw_events("queries", samples, 1, dims, seed=4)])
    hits_g = hits_o = 0
    for i, q in zip(encoded, queries, strict=True):
        hits_g += int(memory.nearest(i) == exact_topk(memory.search, i, 1)[0])
        g.write(engine._np, memory, i)
        hits_o += len(set(memory.topk(q[None], k)[0]) & set(exact_topk(memory.search, q, k)))
    return {"g_recall_at_1": hits_g / samples, "o_recall_at_k": hits_o / (samples * k)}


def batched_same(engine: Engine, n: int, dims: tuple[int, int], batch: int = BATCH) -> float:
    """Share of n mixed events (one memory) whose result from Engine.process in calls of
    ``batch`` (the benchmark's path: batch scans, hints, overwritten hints) is bitwise the
    result of the same event applied one at a time (Engine.apply)."""
    events = [
        engine.write(v) if op == "write" else engine.query(q=v)
        for _, op, v in raw_events("mixed", n, 1, dims, seed=7)
    ]
    one, batched = engine.new_memory(), engine.new_memory()
    alone = [engine.apply(one, e) for e in events]
    together = [r for i in range(0, n, batch) for r in engine.process(
        [(batched, e) for e in events[i : i + batch]])]  # fmt: skip

    def same(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return a is b
        return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("y", "slots", "weights"))

    return sum(map(same, alone, together)) / n


def snapshot_restore(engine: Engine, model_path: Path, cache: Path, dims: tuple[int, int]) -> dict:
    """Snapshot a memory and restore it in a fresh engine: after 500 writes, and in the
    worst case, where every slot differs from memory_init (for a graph memory: a private
    re-indexed graph); times and sizes."""
    memory = engine.new_memory()
    for i in encoded_writes(engine, 500, dims, seed=5):
        engine.generalizer.write(engine._np, memory, i)
    out = _snapshot_round_trip(engine, model_path, cache, memory, "")
    if isinstance(memory.search, GraphSlots):
        memory.search.reindex()
    else:
        every = np.arange(memory.slots)
        memory.search.set_many(every, engine.model.params["memory_init"] + np.float32(0.5))
    return {**out, **_snapshot_round_trip(engine, model_path, cache, memory, "full_")}


def _snapshot_round_trip(
    engine: Engine, model_path: Path, cache: Path, memory: Memory, key: str
) -> dict:
    with tempfile.TemporaryDirectory(prefix="memnet-bench-snap-") as tmp:
        started = time.perf_counter()
        SnapshotStore(tmp, engine).save({"m": memory}, "1-0")
        saved = time.perf_counter() - started
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
        fresh = Engine(load_model(model_path), cache_dir=cache)
        started = time.perf_counter()
        restored_memory = SnapshotStore(tmp, fresh).load().memories["m"]  # (fetched lazily)
        restored = time.perf_counter() - started
    same = bool(np.array_equal(restored_memory.matrix(), memory.matrix()))
    return {
        f"{key}snapshot_s": saved,
        f"{key}restore_s": restored,
        f"{key}snapshot_mb": size / 2**20,
        f"{key}restored_equal": same,
    }


def ef_sweep(engine: Engine, efs: list[int], n: int, dims: tuple[int, int]) -> dict:
    """Queries per second and O recall@k against exact search for the hnswlib graph at
    several ef_search values (its speed/recall knob, index.ef_search), beside memnet's exact
    batched scan of the same memory ("exact"), all on the same queries in one batch."""
    queries = np.stack([v for _, _, v in raw_events("queries", n, 1, dims, seed=6)])
    k = engine.config.k
    memory = engine.new_memory()
    truth = [set(exact_topk(memory.search, q, k)) for q in queries]  # memory_init for all
    started = time.perf_counter()
    hints = None
    if isinstance(memory.search, ExactSlots):
        hints = scan(memory.search.base, queries, k + SCAN_MARGIN)
    found = memory.topk(queries, k, hints)
    out = {"exact": {"queries_per_s": n / (time.perf_counter() - started)}}
    out["exact"]["o_recall_at_k"] = _recall(found, truth, k)
    base = engine.init_base()
    default = base.index.ef
    try:
        for ef in efs:
            base.index.set_ef(ef)
            memory = Memory(GraphSlots(base, engine.config.index))
            started = time.perf_counter()
            found = memory.topk(queries, k)
            rate = n / (time.perf_counter() - started)
            out[str(ef)] = {"queries_per_s": rate, "o_recall_at_k": _recall(found, truth, k)}
    finally:
        base.index.set_ef(default)
    return out


def _recall(found: np.ndarray, truth: list[set], k: int) -> float:
    hits = sum(len(set(row) & t) for row, t in zip(found, truth, strict=True))
    return hits / (len(truth) * k)
