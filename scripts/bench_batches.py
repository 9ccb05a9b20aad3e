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
from pathlib import Path

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
    print("| events per call | µs per event | ms per call |\n|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        throughput(engine, "mixed", WARM_UP, MANY, DIMS, size)  # compiles this size's shapes
        us = 1e6 / throughput(engine, "mixed", args.events, MANY, DIMS, size)
        print(f"| {size:,} | {us:.0f} | {us * size / 1000:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
