#!/usr/bin/env python
"""What a batch's size does to the cost of an event: ``Engine.process`` in-process on
bench.py's 100,000-slot model (64 memories, half writes, half queries in memory space), in
batches of each size, after a warm-up. Small batches pay the fixed costs of a call (two
jitted calls, the scan's pass over the base) over fewer events; docs/performance.md uses
this to explain the query latency at half rate.

    .venv/bin/python scripts/bench_batches.py                  # batches of 1 to 1,000
    .venv/bin/python scripts/bench_batches.py --sizes 1,26,1000 --events 2000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import Engine, Memory, load_model  # noqa: E402
from memnet.engine import one_blas_thread  # noqa: E402
from scripts.bench import DIMS, MANY, model_for  # noqa: E402
from scripts.bench_library import raw_events  # noqa: E402

WARM_UP = 2000


def per_event_us(engine: Engine, size: int, events: list) -> float:
    """µs per event of Engine.process over events in batches of size (fresh memories)."""
    memories: dict[str, Memory] = {}

    def run(chunk: list) -> None:
        for i in range(0, len(chunk), size):
            items = []
            for name, op, v in chunk[i : i + size]:
                memory = memories.get(name) or memories.setdefault(name, engine.new_memory())
                items.append((memory, engine.write(v) if op == "write" else engine.query(q=v)))
            engine.process(items)

    run(events[:WARM_UP])
    started = time.perf_counter()
    run(events[WARM_UP:])
    return (time.perf_counter() - started) / (len(events) - WARM_UP) * 1e6


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
    events = raw_events("mixed", args.events + WARM_UP, MANY, DIMS)
    print("| events per call | µs per event | ms per call |\n|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        us = per_event_us(engine, size, events)
        print(f"| {size:,} | {us:.0f} | {us * size / 1000:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
