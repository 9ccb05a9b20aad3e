#!/usr/bin/env python
"""Exact search against the hardware, side by side in one run: memnet's exact top-5 per
vector (the candidate pass, the float32 re-rank of its survivors, the top-5: what the engine
does for a batch of queries) on every candidate pass this CPU runs, beside numpy's float32
product of the same vectors with the slot matrix (the arithmetic alone, before any
selection: into a preallocated result, so not its allocation; before 2026-12-07 it was
`V @ X.T`, a fresh result every call, 20-45% slower at 256 vectors), for batches of 1, 16
and 256 vectors.

    python scripts/bench_scan.py                   # 10k and 100k slots (~1 minute)
    python scripts/bench_scan.py --slots 1000000   # (~3 minutes)

Random 64-dim slots and queries, one BLAS thread (as workers run). Each figure is the best
of --rounds rounds, the methods interleaved within each round. Answers are checked against
brute force (float32 sqdist, ties to the lower slot) on a call of the timed batch: "exact"
counts the queries whose top-5 equals it, of its first 32; "survivors" the rows per vector
the fastest path keeps for the re-rank (of want = 5 + 8). Paths: "vnni", "avx2", "c"
(memnet/_scan.c, the int8 pass) and "blas" (the float32 matrix-product pass that came before
it).
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

from memnet import quantized  # noqa: E402
from memnet.distance import rank, sqdist  # noqa: E402
from memnet.exact import ExactSlots, ScanBase, scan  # noqa: E402

DIM, K, MARGIN = 64, 5, 8  # top-5, and the engine's scan margin (memnet/engine.py)
CHECKED = 32  # queries per batch checked against brute force


def seconds_per_vector(fn, vectors: int, seconds: float) -> float:
    fn()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        runs += 1
    return (time.perf_counter() - started) / (runs * vectors)


def topk(slots: ExactSlots, V: np.ndarray, path: str) -> np.ndarray:
    with quantized.use_path(path):
        return slots.topk(V, K, scan(slots.base, V, K + MARGIN))


def measure(slots: ExactSlots, V: np.ndarray, paths: list[str], rounds: int, seconds: float):
    """{method: best µs per vector}, "product" included."""
    X = slots.base.vectors
    out = np.empty((len(V), len(X)), np.float32)  # written in place: the arithmetic alone,
    methods = {"product": lambda: np.matmul(V, X.T, out=out)}  # no fresh pages each call
    methods |= {p: (lambda p=p: topk(slots, V, p)) for p in paths}
    best = dict.fromkeys(methods, np.inf)
    for _ in range(rounds):
        for name, fn in methods.items():
            best[name] = min(best[name], seconds_per_vector(fn, len(V), seconds) * 1e6)
    return best


def exact_count(slots: ExactSlots, V: np.ndarray, path: str) -> int:
    X = slots.base.vectors
    found = topk(slots, V, path)  # the timed call's batch, whole (its tiles as timed)
    every = np.arange(len(X))
    return sum(
        np.array_equal(found[q], rank(every, sqdist(X, v), K)) for q, v in enumerate(V[:CHECKED])
    )


def survivors(slots: ExactSlots, V: np.ndarray, path: str) -> float:
    """Rows per vector that the candidate pass keeps for the re-rank."""
    with quantized.use_path(path):
        return float(np.mean([len(h.slots) for h in scan(slots.base, V, K + MARGIN)]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", default="10000,100000")
    parser.add_argument("--batches", default="1,16,256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.4, help="per figure per round")
    args = parser.parse_args()
    threadpool_limits(1, user_api="blas")
    rng = np.random.default_rng(0)
    paths = quantized.available()
    print(f"paths: {', '.join(paths)} (this CPU's best first; blas = before the int8 pass)")
    head = " | ".join(f"{p} µs (× product)" for p in paths)
    print(f"| slots | vectors per call | numpy product µs | {head} | exact | survivors |")
    print("|---" * (5 + len(paths)) + "|")
    summary = {}
    for n in (int(s) for s in args.slots.split(",")):
        slots = ExactSlots(ScanBase.over(rng.standard_normal((n, DIM), dtype=np.float32)), 1 << 30)
        slots.base.quantized()  # made once per base, ahead of the first scan
        for q in (int(b) for b in args.batches.split(",")):
            V = rng.standard_normal((q, DIM), dtype=np.float32)
            best = measure(slots, V, paths, args.rounds, args.seconds)
            cells = " | ".join(f"{best[p]:,.0f} ({best[p] / best['product']:.2f})" for p in paths)
            exact = min(exact_count(slots, V, p) for p in paths)
            kept = survivors(slots, V, paths[0])
            print(
                f"| {n:,} | {q} | {best['product']:,.0f} | {cells} | "
                f"{exact}/{min(q, CHECKED)} | {kept:.1f} |",
                flush=True,
            )
            summary[n, q] = best
    report(summary, paths[0])
    return 0


def report(summary: dict, fast: str) -> None:
    """The issue's targets, where this run measured them."""
    print()
    for (n, q), best in summary.items():
        if n == 100_000 and q in (1, 256):
            ratio = best[fast] / best["product"]
            print(
                f"100k × 64, {q} per call: {fast} {best[fast]:,.0f} µs = {ratio:.2f}× numpy's "
                f"product ({best['product']:,.0f} µs); target ≤ 0.5×: "
                f"{'met' if ratio <= 0.5 else 'not met'}"
            )
        if n == 1_000_000 and q == 256:
            gain = best["blas"] / best[fast]
            print(
                f"1M × 64, 256 per call: {fast} {best[fast]:,.0f} µs vs blas (before) "
                f"{best['blas']:,.0f} µs = {gain:.2f}× the rate; target ≥ 3×: "
                f"{'met' if gain >= 3 else 'not met'}"
            )


if __name__ == "__main__":
    sys.exit(main())
