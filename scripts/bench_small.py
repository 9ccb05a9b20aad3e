#!/usr/bin/env python
"""Issue 17's benchmark: many small memories, beside the bare transport loop, in one run.

    python scripts/bench_small.py                  # A: 200k events, 100k memories; B: 100k, 10k
    python scripts/bench_small.py --quick          # smoke run, ~20k events per measurement
    python scripts/bench_small.py --out var/bench/small.json

A: a 64-slot, 8/8/8-dim model, 50/50 writes and memory-space queries ("mixed"). The bare
transport loop (one Python process, no model: XREADGROUP over the 8 partitions, msgpack decode,
XADD a reply per query at its input id, XACK, commit the offset; one pipeline per step), memnet
end to end with 1 and 2 workers, and Engine.process in-process today (dense_max_floats=0)
and by default (in this process, and each in a fresh one). B: the seed's own 5/10/5-dim,
10-slot model: the seed's per-event code (scripts/bench_reference.py) against memnet end to
end with 1 worker. The transport runs use
bench_e2e's producer, subscriber and clock (producer start until every partition's committed
offset reaches its last entry). Prints the ratios with the issue's targets; --out writes all
numbers as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import redis
from redis._parsers import _RESP2Parser

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts import bench_e2e  # noqa: E402
from scripts.bench_e2e import PARTITIONS, PREFIX  # noqa: E402
from worker.protocol import GROUP, Keys, answer_message, unpack  # noqa: E402
from worker.servers import RedisServer  # noqa: E402

SIZES_A = {"input_dim": 8, "memory_dim": 8, "output_dim": 8, "hidden": 16, "slots": 64}
SIZES_B = {"input_dim": 5, "memory_dim": 10, "output_dim": 5, "hidden": 16, "slots": 10}
TOP_K, READ_COUNT, MAX_BYTES = 5, 1000, 1 << 20
READY = f"{PREFIX}:bare:ready"
# (name, numerator, denominator, target): the targets, ratios of one run
RATIOS = [
    ("A e2e 1 worker / bare transport", "A.e2e_1w", "A.bare", 0.5),
    ("A e2e 2 workers / 1 worker", "A.e2e_2w", "A.e2e_1w", 1.6),
    ("A bare loop: hiredis / redis-py's parser", "A.bare", "A.bare_python_parser", None),
    ("A in-process default / today", "A.inproc_default", "A.inproc_today", 10.0),
    ("A the same, each in a fresh process", "A.inproc_default_fresh", "A.inproc_today_fresh", None),
    ("A the same, the worker's collector", "A.inproc_default_gc", "A.inproc_today_gc", None),
    ("B e2e 1 worker / seed per-event", "B.e2e_1w", "B.seed_per_event", 50.0),
]
STARTED = time.monotonic()


def section(title: str) -> None:
    print(f"\n== {title} (at {time.monotonic() - STARTED:.0f} s)", flush=True)


def model_file(sizes: dict, out: Path) -> Path:
    """The seed-0 random model of these sizes (as scripts/bench.py's model_for)."""
    from memnet import ModelConfig, random_model, save_model

    path = out / f"model-{sizes['slots']}x{sizes['memory_dim']}.safetensors"
    save_model(random_model(ModelConfig(**sizes, top_k=TOP_K), seed=0), path)
    return path


# ---- the bare transport loop (a subprocess: `bench_small.py bare URL OUTPUT_DIM K PARSER`) --
def bare(url: str, output_dim: int, k: int, parser: str) -> None:
    """Move entries through Redis as a worker does, with no model, until terminated;
    parser "python": redis-py's own reply parser, not hiredis (the lift memnet takes)."""
    extra = {"parser_class": _RESP2Parser} if parser == "python" else {}  # (same protocol)
    client, keys = redis.Redis.from_url(url, **extra), Keys(PREFIX)
    streams = {keys.inp(p): ">" for p in range(PARTITIONS)}
    for key in streams:  # a fresh server: the groups cannot exist yet
        client.xgroup_create(key, GROUP, id="0", mkstream=True)
    reply = (np.zeros(output_dim, np.float32), np.arange(k), np.full(k, 1 / k, np.float32))
    client.set(READY, 1)
    while True:
        batch = client.xreadgroup(GROUP, "bare", streams, count=READ_COUNT, block=100)
        if batch:
            _step(client, batch, reply)


def _step(client: redis.Redis, batch: list, reply: tuple) -> None:
    """Decode every entry, XADD a response (the worker's own encoding) per query at its
    input id, XACK and commit each partition's offset: one pipeline per step."""
    pipe = client.pipeline(transaction=False)
    for stream, entries in batch:
        key = stream.decode()
        out = key.replace(":in", ":out")
        for entry_id, fields in entries:
            msg = unpack(fields[b"msg"], MAX_BYTES)
            if msg["op"] == "query":
                body = answer_message(msg["id"], msg["memory"], *reply, {})
                pipe.xadd(out, {"msg": body}, id=entry_id)
        pipe.xack(key, GROUP, *[entry_id for entry_id, _ in entries])
        pipe.set(key.replace(":in", ":offset"), entries[-1][0])
    pipe.execute()


def run_bare(sizes: dict, n: int, memories: int, parser: str = "default", seed: int = 1) -> dict:
    """bench_e2e's measurement (same producer, subscriber and clock) around the bare loop."""
    dims = (sizes["input_dim"], sizes["memory_dim"])
    with tempfile.TemporaryDirectory(prefix="memnet-bench-bare-") as tmp:
        work = Path(tmp)
        server = RedisServer(work / "redis")
        proc = None
        try:
            args = [server.url, str(sizes["output_dim"]), str(TOP_K), parser]
            proc = subprocess.Popen([sys.executable, __file__, "bare", *args])
            _wait_ready(server.client(), proc)
            return bench_e2e._measure(server, [proc], work, "mixed", n, memories, 0.0, dims, seed)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
            server.stop()


def _wait_ready(client: redis.Redis, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the bare transport loop exited during start-up")
        if client.exists(READY):
            return
        time.sleep(0.05)
    raise RuntimeError("the bare transport loop did not start")


# ---- memnet end to end, in-process, and the seed's per-event code ------------------------
def run_e2e(path: Path, cache: Path, workers: int, sizes: dict, n: int, memories: int) -> dict:
    dims = (sizes["input_dim"], sizes["memory_dim"])
    return bench_e2e.run(path, cache, workers, "mixed", n, memories, 0.0, dims)


def in_process(path: Path, dense_max_floats: int | None, n: int, memories: int) -> dict:
    """Engine.process events/s (bench_library.throughput: the same events every call), and
    what Python's cyclic collector did meanwhile: its full collections (each walks every
    object of the process) and the seconds spent in all its collections."""
    from memnet import Engine, load_model
    from scripts import bench_library

    model = load_model(path)
    engine = Engine(model, dense_max_floats=dense_max_floats)
    engine.warm_up(bench_library.BATCH)
    dims = (model.config.input_dim, model.config.memory_dim)
    with collections_counted() as collector:
        rate = bench_library.throughput(engine, "mixed", n, memories, dims)
    return {"events_per_s": rate, **collector}


def in_process_fresh(path: Path, dense_max_floats: int | None, n: int, memories: int) -> dict:
    """in_process in a new Python process, as a library user's program runs it: there the
    collector has seen only the imports' objects, where this one has seen every run before."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]); "
        "from scripts.bench_small import in_process; "
        "print(json.dumps(in_process(Path(sys.argv[2]), json.loads(sys.argv[3]), "
        "int(sys.argv[4]), int(sys.argv[5]))))"
    )
    args = [str(ROOT), str(path), json.dumps(dense_max_floats), str(n), str(memories)]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the fresh in-process run failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


@contextlib.contextmanager
def collections_counted() -> Iterator[dict]:
    """{"full_collections": n, "collector_s": s} of the block, filled in when it ends."""
    counts = {"full_collections": 0, "collector_s": 0.0}
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        counts["collector_s"] += time.perf_counter() - started[0]
        counts["full_collections"] += info["generation"] == 2

    gc.callbacks.append(callback)
    try:
        yield counts
    finally:
        gc.callbacks.remove(callback)


def seed_per_event(path: Path, cache: Path, n: int, memories: int) -> float:
    """The seed's per-event code, one event at a time, over a sample of the workload: into
    one index, as the seed keeps one memory (an index built per memory on its first event
    would cost the seed more, so the ratio against it errs low)."""
    from memnet import load_model
    from scripts import bench_library, bench_reference

    model = load_model(path)
    init = np.asarray(model.params["memory_init"])
    index = bench_reference.reference_index(init, cache)
    dims = (model.config.input_dim, model.config.memory_dim)
    events = bench_library.raw_events("mixed", n, memories, dims)
    return bench_reference.run(dict(model.params), index, events)


def measure(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    started = time.monotonic()
    value = fn(*args)
    rate = value["events_per_s"] if isinstance(value, dict) else value
    print(f"{name}: {rate:,.0f} events/s ({time.monotonic() - started:.0f} s)", flush=True)
    return value


def workload_a(args: argparse.Namespace, tmp: Path) -> dict:
    section(f"A: 64 slots x 8 dims, {args.memories:,} memories, {args.events:,} events, mixed")
    path, n, m = model_file(SIZES_A, tmp), args.events, args.memories
    return {
        "bare": measure("bare transport loop", run_bare, SIZES_A, n, m),
        "bare_python_parser": measure(
            "bare loop, redis-py's parser (no hiredis)", run_bare, SIZES_A, n, m, "python"
        ),
        "e2e_1w": measure("memnet e2e, 1 worker", run_e2e, path, tmp, 1, SIZES_A, n, m),
        "e2e_2w": measure("memnet e2e, 2 workers", run_e2e, path, tmp, 2, SIZES_A, n, m),
        "inproc_today": measure("in-process today", in_process, path, 0, n, m),
        "inproc_default": measure("in-process default", in_process, path, None, n, m),
        "inproc_today_fresh": measure(
            "in-process today, a fresh process", in_process_fresh, path, 0, n, m
        ),
        "inproc_default_fresh": measure(
            "in-process default, a fresh process", in_process_fresh, path, None, n, m
        ),
        **worker_collector(
            today=lambda: measure("in-process today, worker's GC", in_process, path, 0, n, m),
            default=lambda: measure(
                "in-process default, worker's GC", in_process, path, None, n, m
            ),
        ),
    }


def worker_collector(**runs: Callable[[], dict]) -> dict[str, dict]:
    """Each run under the garbage collector settings a worker serves with (start-up objects
    frozen, young collections every MEMNET_GC_THRESHOLD allocations: worker.collect_less),
    then Python's defaults again. Not the target's measure (that is Engine.process under
    Python's defaults, as a library user runs it); what the engine costs inside a worker."""
    from worker.settings import Settings
    from worker.worker import collect_less

    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    collect_less(Settings.gc_threshold)  # (the default setting)
    try:
        return {f"inproc_{name}_gc": run() for name, run in runs.items()}
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def workload_b(args: argparse.Namespace, tmp: Path) -> dict:
    n, m = args.b_events, args.b_memories
    section(f"B: the seed's 5/10/5 dims, 10 slots, {m:,} memories, {n:,} events, mixed")
    path = model_file(SIZES_B, tmp)
    seed_n = args.seed_events
    return {
        "seed_per_event": measure(
            f"seed per-event code ({seed_n:,} events)", seed_per_event, path, tmp, seed_n, m
        ),
        "e2e_1w": measure("memnet e2e, 1 worker", run_e2e, path, tmp, 1, SIZES_B, n, m),
    }


# ---- report ------------------------------------------------------------------------------
def rate(results: dict, dotted: str) -> float:
    part, name = dotted.split(".")
    value = results[part][name]
    return float(value["events_per_s"] if isinstance(value, dict) else value)


def ratios(results: dict) -> list[dict]:
    out = []
    for name, num, den, target in RATIOS:
        value = rate(results, num) / rate(results, den)
        met = None if target is None else value >= target
        out.append({"name": name, "ratio": value, "target": target, "met": met})
    return out


CPU = ("workers", "redis", "producer", "subscriber", "all")  # (the bare loop: "workers")


def table(results: dict) -> str:
    lines = [f"{'measurement':<42}{'events/s':>12}"]
    for part in ("A", "B"):
        lines += [
            f"{part + ' ' + name:<42}{rate(results, f'{part}.{name}'):>12,.0f}"
            for name in results[part]
        ]
    lines.append(f"\n{'CPU µs per event, end to end':<30}" + "".join(f"{c:>11}" for c in CPU))
    for part in ("A", "B"):
        for name, r in results[part].items():
            if isinstance(r, dict) and "cpu_us_per_event" in r:
                cpu = r["cpu_us_per_event"]
                row = "".join(f"{cpu[c]:>11.1f}" for c in CPU[:-1]) + f"{sum(cpu.values()):>11.1f}"
                lines.append(f"{part + ' ' + name:<30}" + row)
    lines += steps_table(results)
    lines.append(f"\n{'collector while in-process':<42}{'full':>8}{'seconds':>9}")
    for name, r in results["A"].items():
        if isinstance(r, dict) and "full_collections" in r:
            lines.append(f"{'A ' + name:<42}{r['full_collections']:>8}{r['collector_s']:>9.2f}")
    lines.append(f"\n{'ratio':<42}{'value':>8}{'target':>9}  met")
    for r in results["ratios"]:
        met = {True: "yes", False: "no", None: ""}[r["met"]]
        target = "" if r["target"] is None else f">= {r['target']}"
        lines.append(f"{r['name']:<42}{r['ratio']:>8.2f}{target:>9}  {met}")
    return "\n".join(lines)


def steps_table(results: dict) -> list[str]:
    """The workers' steps of each end-to-end run (scripts/bench_e2e.py: their count, mean
    size and time, and the share of the stream's wall time the workers spent in them)."""
    title = "workers' steps, end to end"
    lines = [f"\n{title:<30}" + "".join(f"{c:>11}" for c in ("steps", "events", "ms", "busy"))]
    for part in ("A", "B"):
        for name, r in results[part].items():
            if isinstance(r, dict) and "steps" in r:
                st = r["steps"]
                lines.append(
                    f"{part + ' ' + name:<30}{st['count']:>11}{st['events_per_step']:>11.1f}"
                    f"{st['ms_per_step']:>11.2f}{st['busy']:>11.0%}"
                )
    return lines


def machine() -> dict:
    try:
        from scripts.bench import machine as bench_machine
    except ImportError:
        return {"cores": os.cpu_count()}
    return bench_machine()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: ~20k events per measurement")
    p.add_argument("--events", type=int, help="A's events (200000; quick 20000)")
    p.add_argument("--memories", type=int, help="A's memories (100000; quick 10000)")
    p.add_argument("--b-events", type=int, help="B's events end to end (100000; quick 20000)")
    p.add_argument("--b-memories", type=int, help="B's memories (10000; quick 2000)")
    p.add_argument("--seed-events", type=int, help="B's seed per-event sample (2000; quick 500)")
    p.add_argument("--out", help="write every number as JSON here (default: stdout only)")
    args = p.parse_args()
    defaults = {
        "events": (200_000, 20_000),
        "memories": (100_000, 10_000),
        "b_events": (100_000, 20_000),
        "b_memories": (10_000, 2_000),
        "seed_events": (2_000, 500),
    }
    for key, (full, quick) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, quick if args.quick else full)
    return args


def main() -> int:
    args = parse_args()
    results: dict = {"machine": machine(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="memnet-bench-small-") as tmp:
        results["A"] = workload_a(args, Path(tmp))
        results["B"] = workload_b(args, Path(tmp))
    results["ratios"] = ratios(results)
    results["seconds"] = round(time.monotonic() - STARTED, 1)
    section("results")
    print(table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["bare"]:
        bare(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(main())
