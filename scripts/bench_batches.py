#!/usr/bin/env python
"""What a batch's size does to the cost of an event: ``Engine.process`` in-process on
bench.py's 100,000-slot model (64 memories, half writes, half queries in memory space), in
batches of each size, after a warm-up, and what the call's two jitted functions alone cost.
Small batches pay the fixed costs of a call (two jitted calls, the scan's pass over the
base) over fewer events; docs/performance.md uses this to explain the query latency at half
rate.

    .venv/bin/python scripts/bench_batches.py                  # batches of 1 to 1,000
    .venv/bin/python scripts/bench_batches.py --sizes 1,26,1000 --events 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import Engine, load_model  # noqa: E402
from memnet.engine import one_blas_thread  # noqa: E402
from scripts.bench import DIMS, MANY, model_for  # noqa: E402
from scripts.bench_library import throughput  # noqa: E402

WARM_UP = 2000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,8,26,64,256,1000")
    parser.add_argument("--events", type=int, default=4000, help="timed, per size")
    parser.add_argument("--out", default=str(ROOT / "var" / "bench"))
    args = parser.parse_args()
    one_blas_thread()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine = Engine(load_model(model_for(100_000, out)))
    print(
        "| events per call | µs per event | ms per call | of which I and O+R's jitted calls, µs |"
    )
    print("|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        throughput(engine, "mixed", WARM_UP, MANY, DIMS, size)  # compiles this size's shapes
        us = 1e6 / throughput(engine, "mixed", args.events, MANY, DIMS, size)
        jitted = jitted_calls_us(engine, size)
        print(f"| {size:,} | {us:.0f} | {us * size / 1000:.2f} | {jitted:.0f} |", flush=True)
    return 0


def jitted_calls_us(engine: Engine, size: int, repeat: int = 200) -> float:
    """µs for the two jitted calls of a call of ``size`` events, half of them writes and half
    queries in memory space: I for the writes, O and R for the queries (what Engine.process
    calls them with), after one untimed call (a shape's first call compiles)."""
    c = engine.config
    n = max(1, size // 2)
    rows = np.stack([engine.encoder.example()] * n)
    answer = (
        np.zeros((n, c.memory_dim), np.float32),
        np.zeros((n, c.k, c.memory_dim), np.float32),
        np.zeros((n, c.k), bool),
        np.zeros((n, c.k), np.int32),
    )
    engine._encode(engine._jax, rows)
    engine._answer(engine._jax, *answer)
    began = time.perf_counter()
    for _ in range(repeat):
        engine._encode(engine._jax, rows)
        engine._answer(engine._jax, *answer)
    return (time.perf_counter() - began) / repeat * 1e6


if __name__ == "__main__":
    sys.exit(main())
