#!/usr/bin/env python
"""Side-by-side benchmark: the reference design's per-event code, the memnet library
in-process, and memnet end to end through Redis with 1 and 2 workers.

    python scripts/bench.py            # 10k, 100k and 1M slots (about 16 minutes here)
    python scripts/bench.py --quick    # 100k slots only (the targets), fewer events: < 2 min

Writes var/bench/bench.json and var/bench/bench.png. Ratios measured in one run are what
count on a shared machine; every target is printed as met or not, with its numbers.
Graphs over memory_init are built once per model and cached in var/bench/cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import Engine, ModelConfig, random_model, save_model  # noqa: E402
from scripts import bench_e2e, bench_library, bench_reference  # noqa: E402
from scripts.bench_report import plot, report  # noqa: E402

DIMS = (64, 64)
MANY = 64  # "many memories"


def model_for(slots: int, out: Path) -> Path:
    """The seed-0 random model of this size with today's default settings (rewritten when
    a file from another version of memnet has other settings)."""
    from memnet import MemnetError, load_model

    path = out / f"model-{slots}.safetensors"
    config = ModelConfig(
        input_dim=DIMS[0], memory_dim=DIMS[1], output_dim=8, hidden=16, slots=slots, top_k=5
    )
    try:
        if load_model(path).config == config:
            return path
    except (MemnetError, OSError):
        pass
    save_model(random_model(config, seed=0), path)
    return path


STARTED = time.monotonic()


def section(title: str) -> None:
    print(f"\n== {title} (at {time.monotonic() - STARTED:.0f} s)", flush=True)


def measure_size(slots: int, args: argparse.Namespace, out: Path, cache: Path) -> dict:
    from memnet import load_model

    path = model_for(slots, out)
    model = load_model(path)
    started = time.monotonic()
    engine = Engine(model, cache_dir=cache)
    if slots > model.config.index.exact_max_slots:
        engine.init_base()
    engine.warm_up(1000)  # compile first (the library runs batches of 1,000)
    result: dict = {"slots": slots, "init_graph_s": round(time.monotonic() - started, 1)}
    n_lib = args.lib_events
    section(f"{slots:,} slots: library in-process")
    result["library"] = {
        f"{kind}/{'one' if m == 1 else 'many'}": bench_library.throughput(
            engine, kind, n_lib, m, DIMS
        )
        for kind in ("writes", "queries", "mixed")
        for m in (1, MANY)
        if not (slots >= 1_000_000 and m == MANY)
    }
    print(json.dumps(result["library"]), flush=True)
    section(f"{slots:,} slots: recall against brute force; batched results as one at a time")
    samples = args.recall_samples if slots < 1_000_000 else args.recall_samples // 3
    result["recall"] = bench_library.recall(engine, samples, DIMS)
    result["recall"]["batched_same"] = bench_library.batched_same(engine, 4 * samples, DIMS)
    print(json.dumps(result["recall"]), flush=True)
    if 100_000 <= slots <= args.graph_max_slots:  # these need the hnswlib graph built
        section(f"{slots:,} slots: write path vs in-place hnswlib updates; graph vs exact scan")
        result["write_path"] = bench_library.write_path(engine, args.write_events, DIMS)
        print(json.dumps(result["write_path"]), flush=True)
        result["ef_sweep"] = bench_library.ef_sweep(
            engine, [64, 160, 400, 800, 1600], args.recall_samples, DIMS
        )
        print(json.dumps(result["ef_sweep"]), flush=True)
    section(f"{slots:,} slots: snapshot and restore")
    result["snapshot"] = bench_library.snapshot_restore(engine, path, cache, DIMS)
    print(json.dumps(result["snapshot"]), flush=True)
    if slots <= args.reference_max_slots:
        section(f"{slots:,} slots: reference per-event code")
        index = bench_reference.reference_index(np.asarray(model.params["memory_init"]), cache)
        queries = np.stack([v for _, _, v in bench_library.raw_events("queries", 100, 1, DIMS)])
        init = np.asarray(model.params["memory_init"])
        events = bench_library.raw_events("mixed", args.reference_events, 1, DIMS)
        result["reference"] = {
            "recall_at_k": bench_reference.recall(index, init, queries),
            "mixed/one": bench_reference.run(dict(model.params), index, events),
        }
        print(json.dumps(result["reference"]), flush=True)
    section(f"{slots:,} slots: end to end through Redis")
    result["e2e"] = e2e(path, cache, slots, args)
    return result


def e2e(path: Path, cache: Path, slots: int, args: argparse.Namespace) -> dict:
    runs = {"mixed/many/1w": (1, "mixed", MANY), "mixed/many/2w": (2, "mixed", MANY)}
    if args.quick and slots < 100_000:  # the targets are at 100k: keep --quick short
        runs = {"mixed/many/1w": (1, "mixed", MANY)}
    if not args.quick:
        runs.update(
            {
                "mixed/one/1w": (1, "mixed", 1),
                "writes/many/1w": (1, "writes", MANY),
                "queries/many/1w": (1, "queries", MANY),
            }
        )
    if slots >= 1_000_000:  # one memory of a million slots per worker is the point here
        runs = {"mixed/one/1w": (1, "mixed", 1)}
    if slots == 100_000:  # the exact search before its int8 pass (issue 15), side by side
        runs["mixed/many/1w@blas"] = (1, "mixed", MANY)
    out = {}
    for name, (workers, kind, memories) in runs.items():
        scan = {"MEMNET_SCAN": "blas"} if name.endswith("@blas") else {}
        out[name] = bench_e2e.run(
            path, cache, workers, kind, args.e2e_events, memories, 0.0, DIMS, env=scan
        )
        print(name, json.dumps(out[name]), flush=True)
    if args.quick and slots < 100_000:
        return out
    base = "mixed/one/1w" if slots >= 1_000_000 else "mixed/many/1w"
    half = out[base]["events_per_s"] / 2
    memories = 1 if slots >= 1_000_000 else MANY
    out[f"{base}@half"] = bench_e2e.run(
        path, cache, 1, "mixed", args.e2e_events, memories, half, DIMS
    )
    print(f"{base}@half", json.dumps(out[f"{base}@half"]), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default="", help="slot counts, e.g. 10000,100000")
    parser.add_argument(
        "--graph-max-slots",
        type=int,
        default=100_000,
        help="also build the hnswlib graph (for the in-place baseline and the ef sweep) up to "
        "this size; at 1,000,000 slots the build takes about 12 minutes here (cached after)",
    )
    parser.add_argument("--out", default=str(ROOT / "var" / "bench"))
    args = parser.parse_args()
    quick = args.quick
    sizes = [int(s) for s in args.sizes.split(",") if s] or (
        [100_000] if quick else [10_000, 100_000, 1_000_000]
    )
    args.lib_events = 3000 if quick else 20_000
    args.write_events = 1000 if quick else 10_000
    args.recall_samples = 60 if quick else 300
    args.reference_events = 200 if quick else 1000
    args.reference_max_slots = max(100_000, args.graph_max_slots)  # its index is a graph too
    args.e2e_events = 4000 if quick else 30_000
    out = Path(args.out)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = {"machine": machine(), "quick": quick, "sizes": []}
    for slots in sizes:
        results["sizes"].append(measure_size(slots, args, out, cache))
    results["seconds"] = round(time.monotonic() - started, 1)
    (out / "bench.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "bench.png")
    print(report(results))
    print(f"\nwrote {out / 'bench.json'} and {out / 'bench.png'} in {results['seconds']} s")
    return 0


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "?",
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    sys.exit(main())
