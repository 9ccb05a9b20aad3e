#!/usr/bin/env python
"""What bounds the exact scan: single-threaded float32 matrix-product speed and the cost of
``memnet.exact.scan`` per vector, for batches of 1, 16 and 256 vectors.

    python scripts/bench_scan.py                 # 10k and 100k slots (~20 s)
    python scripts/bench_scan.py --slots 1000000

Random 64-dim slots and queries, one BLAS thread (as workers run).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet.exact import ScanBase, scan  # noqa: E402

DIM, WANT = 64, 13  # top-5 plus the engine's margin of 8


def per_vector(fn, vectors: int, seconds: float = 1.0) -> float:
    """Seconds per vector of fn(), repeated for about `seconds`."""
    fn()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        runs += 1
    return (time.perf_counter() - started) / (runs * vectors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", default="10000,100000")
    args = parser.parse_args()
    threadpool_limits(1, user_api="blas")
    rng = np.random.default_rng(0)
    print("| slots | vectors per call | matrix product µs/vector (GFLOP/s) | scan µs/vector |")
    print("|---|---|---|---|")
    for slots in (int(s) for s in args.slots.split(",")):
        base = ScanBase.over(rng.standard_normal((slots, DIM), dtype=np.float32))
        for q in (1, 16, 256):
            V = rng.standard_normal((q, DIM), dtype=np.float32)
            product = per_vector(lambda V=V, b=base: V @ b.vectors.T, q)
            searched = per_vector(lambda V=V, b=base: scan(b, V, WANT), q)
            gflops = 2 * slots * DIM / product / 1e9
            print(
                f"| {slots:,} | {q} | {product * 1e6:,.0f} ({gflops:.1f}) | "
                f"{searched * 1e6:,.0f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
