#!/usr/bin/env python
"""State beyond RAM and beyond one machine, as a user would check it (issue 13's acceptance).

One `memnet worker` runs in simulated host A (a network namespace with its own directory)
with MEMNET_RESIDENT_MB=32 and MEMNET_SNAPSHOT_URL=s3://... (moto's S3 server, started here,
as is a redis-server). It takes writes to 80,000 distinct memories plus 100 deletes, with
queries along the way; its RSS (VmRSS) is read after a warm-up and at the end, and the growth
is set against the budget. Every answer must equal the memnet library applied one event at a
time in stream order (a deleted memory answers as a fresh one). Then every process of host A
is SIGKILLed, and a worker in host B (another directory: nothing shared but Redis and S3)
takes the partitions over and answers queries on memories A had evicted, memories A held
resident, and deleted ones: exactly, again.

    sudo .venv/bin/python scripts/state_drill.py                  # about 6 minutes here
    sudo .venv/bin/python scripts/state_drill.py --memories 20000 --resident-mb 8

Needs root (network namespaces), redis-server and moto[server] (a dev dependency). Prints a
short report; exits 1 on any missing, duplicated or different answer, or an RSS growth over
the budget plus --slack-mb; 2 if it cannot run here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import Answer, Engine, ModelConfig, load_model, random_model, save_model  # noqa: E402
from memnet.snapshot import SnapshotStore  # noqa: E402
from worker.local import owners  # noqa: E402
from worker.ownership import model_prefix  # noqa: E402
from worker.protocol import Keys, pack, partition_of  # noqa: E402
from worker.servers import Host, Hosts, RedisServer, S3Server, netns_available  # noqa: E402

PREFIX, PARTITIONS, LEASE_MS = "drill", 8, 2000
# The benchmark's "many small memories" model: 64 slots of 8 dims, about 2.3 KB a memory.
MODEL = ModelConfig(input_dim=8, memory_dim=8, output_dim=3, hidden=16, slots=64, top_k=5)
METRICS_PORT = 9464  # on each host's own network namespace
TOOK = re.compile(r"took partition (\d+) \(epoch (\d+)\) at (\S+),")
STARTED = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {text}", flush=True)


# ---- the stream ------------------------------------------------------------------------------
@dataclass
class Stream:
    """Events in stream order; queries alternate between memory space (q) and input (x)."""

    rng: np.random.Generator
    events: list[dict[str, Any]] = field(default_factory=list)
    outputs: set[str] = field(default_factory=set)  # ids that get a response

    def write(self, memory: str) -> None:
        x = self.rng.standard_normal(MODEL.input_dim).astype("<f4").tobytes()
        self.events.append({"op": "write", "memory": memory, "x": x})

    def query(self, memory: str, kind: str) -> str:
        qid = f"{kind}{len(self.events)}"
        space = ("q", MODEL.memory_dim) if len(self.events) % 2 else ("x", MODEL.input_dim)
        value = self.rng.standard_normal(space[1]).astype("<f4").tobytes()
        self.events.append({"op": "query", "memory": memory, "id": qid, space[0]: value})
        self.outputs.add(qid)
        return qid

    def delete(self, memory: str, answered: bool) -> None:
        event = {"op": "delete", "memory": memory}
        if answered:
            event["id"] = f"del{len(self.events)}"
            self.outputs.add(event["id"])
        self.events.append(event)


def warm_up(stream: Stream, memories: int = 300, n: int = 3000) -> None:
    """Writes and queries on a few memories, in batches as large as the main phase's."""
    for j in range(n):
        memory = f"warm-{j % memories}"
        stream.query(memory, "warm") if j % 3 == 2 else stream.write(memory)


def main_phase(stream: Stream, n: int, deletes: int, queries: int) -> list[str]:
    """Write m0..m{n-1} once each, in order, with rewrites of earlier (mostly evicted)
    memories, queries on random earlier ones, and ``deletes`` deletes; the deleted names."""
    rng = stream.rng
    query_at = set(np.linspace(n // 50, n - 1, queries, dtype=int).tolist())
    delete_at = np.linspace(n // 10, n - 1, deletes, dtype=int).tolist()
    deleted: list[str] = []
    for i in range(n):
        stream.write(f"m{i}")
        if i % 20 == 19:
            stream.write(f"m{int(rng.integers(0, i))}")
        while delete_at and delete_at[0] == i:
            delete_at.pop(0)
            victim = f"m{int(rng.integers(0, i))}"
            if victim in deleted:
                continue
            deleted.append(victim)
            stream.delete(victim, answered=len(deleted) % 2 == 0)
            if len(deleted) % 3 == 0:  # asked at once: it answers as a fresh memory
                stream.query(victim, "fresh")
            elif len(deleted) % 3 == 1:  # written again: it starts from memory_init
                stream.write(victim)
        if i in query_at:
            stream.query(f"m{int(rng.integers(0, i + 1))}", "main")
    stream.query(f"m{n - 1}", "main")  # last: its answer means the stream is drained
    return deleted


def probes(stream: Stream, n: int, deleted: list[str], each: int = 100) -> Counter[str]:
    """Queries for host B: memories A had evicted (the oldest), A's resident ones (the
    newest), every deleted one; then writes to some evicted ones, queried again."""
    kinds: Counter[str] = Counter()
    for i in range(min(each, n)):
        stream.query(f"m{i}", "evicted")
        kinds["evicted"] += 1
    for i in range(max(0, n - each), n):
        stream.query(f"m{i}", "resident")
        kinds["resident"] += 1
    for name in deleted:
        stream.query(name, "deleted")
        kinds["deleted"] += 1
    for i in range(min(each, n) // 2):
        stream.write(f"m{i}")
        stream.query(f"m{i}", "rewritten")
        kinds["rewritten"] += 1
    return kinds


def send(client: redis.Redis, events: list[dict[str, Any]]) -> None:
    keys = Keys(PREFIX)
    pipe = client.pipeline(transaction=False)
    for event in events:
        pipe.xadd(keys.inp(partition_of(event["memory"], PARTITIONS)), {"msg": pack(event)})
        if len(pipe) >= 1000:
            pipe.execute()
    pipe.execute()


# ---- the reference and the comparison ---------------------------------------------------
def reference(engine: Engine, events: list[dict[str, Any]]) -> dict[str, Answer]:
    """The library's answers, one event at a time in stream order, for every query; only
    the memories some query reads are computed (each memory's history is its own)."""
    asked = {e["memory"] for e in events if e["op"] == "query"}
    memories: dict[str, Any] = {}
    answers = {}
    for e in events:
        if e["memory"] not in asked:
            continue
        if e["op"] == "delete":
            memories.pop(e["memory"], None)
            continue
        memory = memories.setdefault(e["memory"], engine.new_memory())
        if e["op"] == "write":
            engine.apply(memory, engine.write(np.frombuffer(e["x"], "<f4")))
        elif "q" in e:
            answers[e["id"]] = engine.apply(memory, engine.query(q=np.frombuffer(e["q"], "<f4")))
        else:
            answers[e["id"]] = engine.apply(memory, engine.query(x=np.frombuffer(e["x"], "<f4")))
    return answers


def responses(client: redis.Redis, kind: str = "out") -> list[dict[str, Any]]:
    keys = Keys(PREFIX)
    out = []
    for p in range(PARTITIONS):
        for _, fields in client.xrange(keys.part(p, kind)):
            out.append(msgpack.unpackb(fields[b"msg"], raw=False))
    return out


def same(response: dict[str, Any], answer: Answer) -> bool:
    """Bitwise: y, slots and weights exactly as the library's."""
    return (
        "error" not in response
        and np.array_equal(np.array(response["y"], np.float32), answer.y)
        and np.array_equal(np.array(response["slots"]), answer.slots)
        and np.array_equal(np.array(response["weights"], np.float32), answer.weights)
    )


def compare(got: list[dict[str, Any]], stream: Stream, expected: dict[str, Answer]) -> Counter:
    counts = Counter(m["id"] for m in got)
    figures = Counter(
        missing=len(stream.outputs - set(counts)),
        unexpected=len(set(counts) - stream.outputs),
        duplicated=sum(n - 1 for n in counts.values()),
    )
    for m in got:
        if m["id"] in expected:
            figures["differ"] += not same(m, expected[m["id"]])
            figures["answers"] += 1
        elif m["id"] in stream.outputs:
            figures["differ"] += m.get("deleted") is not True
            figures["deletes_answered"] += 1
    return figures


# ---- the workers -------------------------------------------------------------------------
def worker_command() -> list[str]:
    """The virtual environment's `memnet worker`, else this checkout's (on PYTHONPATH)."""
    memnet = Path(sys.executable).parent / "memnet"
    program = [str(memnet)] if memnet.exists() else [sys.executable, "-m", "worker.cli"]
    return [*program, "worker"]


class Worker:
    """`memnet worker` in a simulated host, its JSON log in the host's directory."""

    def __init__(self, host: Host, name: str, model: Path, s3: S3Server, redis_port: int,
                 resident_mb: int) -> None:  # fmt: skip
        self.host = host
        shutil.copy(model, host.workdir / "model.safetensors")
        ours = ("MEMNET_", "AWS_", "PORT", "REDIS_URL")
        env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
        env.update(s3.env(host.server_ip))
        env.update(
            PYTHONPATH=str(ROOT),
            REDIS_URL=f"redis://{host.server_ip}:{redis_port}/0",
            MEMNET_SNAPSHOT_URL=s3.url("snapshots"),
            MEMNET_MODEL=str(host.workdir / "model.safetensors"),
            MEMNET_CACHE_DIR=str(host.workdir / "cache"),
            MEMNET_RESIDENT_MB=str(resident_mb),
            MEMNET_PREFIX=PREFIX,
            MEMNET_PARTITIONS=str(PARTITIONS),
            MEMNET_LEASE_MS=str(LEASE_MS),
            MEMNET_SNAPSHOT_EVERY_S="10",  # (default 60) the tail of the stream sooner
            MEMNET_WORKER_ID=name,
            MEMNET_METRICS_PORT=str(METRICS_PORT),
            MEMNET_METRICS_HOST="0.0.0.0",
        )
        self.log = host.workdir / "worker.log"
        with open(self.log, "ab") as log:
            self.proc = host.popen(worker_command(), env=env, stdout=subprocess.DEVNULL, stderr=log)

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status)[1]) / 1024  # type: ignore[index]

    def metrics(self) -> dict[str, float]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        url = f"http://{self.host.ip}:{METRICS_PORT}/metrics"
        with opener.open(url, timeout=5) as response:
            lines = response.read().decode().splitlines()
        return {
            line.split()[0]: float(line.split()[1])
            for line in lines
            if line.startswith("memnet_") and len(line.split()) == 2
        }

    def took(self) -> dict[int, tuple[int, str]]:
        """Partitions this worker took, by its log: (epoch, snapshot position it resumed at)."""
        found = {}
        for line in self.log.read_text().splitlines():
            if line.startswith("{") and (m := TOOK.match(json.loads(line)["msg"])):
                found[int(m[1])] = (int(m[2]), m[3])
        return found

    def exited(self) -> int | None:
        return self.proc.poll()


def wait(
    condition, timeout_s: float, what: str, worker: Worker | None = None, every_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if worker is not None and worker.exited() is not None:
            raise SystemExit(f"the worker exited ({worker.exited()}) waiting for {what}; "
                             f"see {worker.log}")  # fmt: skip
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def answered(client: redis.Redis) -> int:
    return sum(client.xlen(Keys(PREFIX).out(p)) for p in range(PARTITIONS))


def snapshotted(client: redis.Redis, stores: dict[int, SnapshotStore]) -> bool:
    """Whether each partition's newest snapshot covers its whole input stream."""
    for p, store in stores.items():
        last = client.xrevrange(Keys(PREFIX).inp(p), count=1)
        found = store.manifests() if last else None
        if last and (not found or found[0][1]["position"] != last[0][0].decode()):
            return False
    return True


def owned_by(client: redis.Redis, name: str) -> bool:
    return owners(client, PREFIX, PARTITIONS) == [name] * PARTITIONS


class Peak:
    """Samples a worker's RSS in the background; the highest seen."""

    def __init__(self, worker: Worker) -> None:
        self.worker, self.mb, self._stop = worker, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                self.mb = max(self.mb, self.worker.rss_mb())
            except (OSError, TypeError):
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.mb


# ---- the drill ---------------------------------------------------------------------------
@dataclass
class Servers:
    redis: RedisServer
    s3: S3Server
    hosts: Hosts
    model: Path
    args: argparse.Namespace
    report: dict[str, Any] = field(default_factory=dict)

    def worker(self, host: Host, name: str) -> Worker:
        return Worker(host, name, self.model, self.s3, self.redis.port, self.args.resident_mb)


def on_host_a(servers: Servers, stream: Stream, engine: Engine) -> tuple[Worker, list[str]]:
    args, r, report = servers.args, servers.redis.client(), servers.report
    a = servers.worker(servers.hosts[0], "host-a")
    warm_up(stream)
    deleted = main_phase(stream, args.memories, args.deletes, args.queries)
    say(f"stream: {len(stream.events):,} events; computing the reference while A starts")
    expected = reference(engine, stream.events)
    wait(lambda: owned_by(r, "host-a"), 180, "host A owning every partition", a)
    warm = next(j for j, e in enumerate(stream.events) if e["memory"] == "m0")
    send(r, stream.events[:warm])
    warm_ids = {e["id"] for e in stream.events[:warm] if "id" in e}
    wait(lambda: answered(r) >= len(warm_ids), 120, "the warm-up's answers", a)
    time.sleep(1.0)
    report["rss_start_mb"] = a.rss_mb()
    say(f"warmed up: RSS {report['rss_start_mb']:.1f} MB; sending the main phase")
    began, peak = time.monotonic(), Peak(a)
    send(r, stream.events[warm:])
    limit = 120 + args.memories * 0.01
    wait(lambda: answered(r) >= len(stream.outputs), limit, "the main phase's answers", a)
    report["main_s"] = time.monotonic() - began
    fingerprint = engine.model.fingerprint
    stores = {
        p: SnapshotStore(servers.s3.url("snapshots"), None, prefix=model_prefix(p, fingerprint))
        for p in range(PARTITIONS)
    }
    wait(lambda: snapshotted(r, stores), limit, "snapshots of everything", a, every_s=1.0)
    report["settled_s"] = time.monotonic() - began
    time.sleep(1.0)  # the eviction that follows the last snapshot
    report["rss_end_mb"] = a.rss_mb()
    report["rss_peak_mb"] = max(peak.stop(), report["rss_end_mb"])
    report["a_metrics"] = a.metrics()
    report["a"] = compare(responses(r), stream, expected)
    return a, deleted


def on_host_b(servers: Servers, stream: Stream, engine: Engine, deleted: list[str]) -> Worker:
    args, r, report = servers.args, servers.redis.client(), servers.report
    a_owned = set(range(PARTITIONS))
    before = len(stream.events)
    report["kinds"] = probes(stream, args.memories, deleted)
    expected = reference(engine, stream.events)
    killed_at = time.monotonic()
    report["killed"] = servers.hosts[0].kill_all()
    b = servers.worker(servers.hosts[1], "host-b")
    send(r, stream.events[before:])
    wait(lambda: owned_by(r, "host-b"), 180, "host B owning every partition", b)
    report["takeover_s"] = time.monotonic() - killed_at
    wait(lambda: answered(r) >= len(stream.outputs), 180, "host B's answers", b)
    report["answered_s"] = time.monotonic() - killed_at
    report["b_metrics"] = b.metrics()
    took = b.took()
    report["restored"] = sum(p in took and took[p][1] != "None" for p in a_owned)
    report["b"] = compare(responses(r), stream, expected)
    return b


def failures(report: dict[str, Any], args: argparse.Namespace) -> list[str]:
    kinds = ("missing", "unexpected", "duplicated", "differ")
    bad = [f"{ph}: {k} {report[ph][k]}" for ph in ("a", "b") for k in kinds if report[ph][k]]
    if report["dead"]:
        bad.append(f"{report['dead']} dead letters")
    if report["restored"] != PARTITIONS:
        bad.append(f"host B restored {report['restored']} of {PARTITIONS} partitions from S3")
    growth = report["rss_end_mb"] - report["rss_start_mb"]
    if growth > args.resident_mb + args.slack_mb:
        bad.append(f"RSS grew {growth:.1f} MB > {args.resident_mb} + {args.slack_mb} MB")
    return bad


def _counts(figures: Counter) -> str:
    kinds = ("missing", "duplicated", "unexpected", "differ")
    return ", ".join(f"{k} {figures[k]}" for k in kinds)


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    am, bm = report["a_metrics"], report["b_metrics"]
    a, b, budget = report["a"], report["b"], args.resident_mb
    growth = report["rss_end_mb"] - report["rss_start_mb"]
    beyond = (growth - budget) * 2**20 / args.memories
    lines = [
        "",
        f"== state drill: {args.memories:,} memories, {args.deletes} deletes, "
        f"MEMNET_RESIDENT_MB={budget}",
        f"host A: {a['answers']:,} answers, {a['deletes_answered']} delete responses in "
        f"{report['main_s']:.0f} s; all in snapshots after {report['settled_s']:.0f} s",
        f"  RSS after warm-up {report['rss_start_mb']:.1f} MB, at the end "
        f"{report['rss_end_mb']:.1f} MB (peak {report['rss_peak_mb']:.1f} MB)",
        f"  growth {growth:+.1f} MB vs budget {budget} MB (+{args.slack_mb} MB allowed); "
        f"beyond the budget: {beyond:.0f} B per memory written",
        f"  resident memories {am.get('memnet_resident_memories', 0):,.0f} "
        f"({am.get('memnet_resident_bytes', 0) / 2**20:.1f} MB, as of its last batch); "
        f"evictions {am.get('memnet_memory_evictions_total', 0):,.0f}; "
        f"loads {am.get('memnet_memory_loads_total', 0):,.0f}; "
        f"snapshots {am.get('memnet_snapshot_seconds_count', 0):,.0f} "
        f"({am.get('memnet_snapshot_seconds_sum', 0):.0f} s in all)",
        f"  {_counts(a)}",
        f"host A killed ({report['killed']} processes); host B owned every partition after "
        f"{report['takeover_s']:.1f} s (restored {report['restored']}/{PARTITIONS} from S3 "
        f"snapshots), answered everything after {report['answered_s']:.1f} s",
        f"host B: probes {dict(report['kinds'])}; "
        f"loads {bm.get('memnet_memory_loads_total', 0):,.0f}",
        f"  {_counts(b)}; dead letters {report['dead']}",
        f"total {time.monotonic() - STARTED:.0f} s",
    ]
    print("\n".join(lines))


def drill(servers: Servers) -> int:
    args = servers.args
    engine = Engine(load_model(servers.model))
    stream = Stream(np.random.default_rng(args.seed))
    a, deleted = on_host_a(servers, stream, engine)
    say("main phase answered; killing host A, starting host B")
    b = on_host_b(servers, stream, engine, deleted)
    servers.report["dead"] = len(responses(servers.redis.client(), "dead"))
    print_report(servers.report, args)
    bad = failures(servers.report, args)
    print("FAILED: " + "; ".join(bad) if bad else "OK: every answer exact")
    for worker in (a, b):
        worker.host.kill_all()
        worker.proc.wait(10)
    return 1 if bad else 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=80_000, help="distinct memories written")
    parser.add_argument("--resident-mb", type=int, default=32, help="MEMNET_RESIDENT_MB")
    parser.add_argument("--deletes", type=int, default=100)
    parser.add_argument("--queries", type=int, default=2000, help="queries in the main phase")
    parser.add_argument("--slack-mb", type=int, default=16,
                        help="RSS growth allowed beyond the budget")  # fmt: skip
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if reason := netns_available():
        print(f"state_drill: cannot simulate hosts here: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="memnet-drill-"))
    say(f"working in {work}")
    model = work / "model.safetensors"
    save_model(random_model(MODEL, seed=0), model)
    redis_server = RedisServer(work / "redis", bind="0.0.0.0")
    try:
        with S3Server(ip_address="0.0.0.0") as s3, Hosts(work / "hosts", 2) as hosts:
            os.environ.update(s3.env())  # this process reads the snapshots too
            # moto's in-memory bucket can fail a listing that races a delete (a KeyError, a
            # 500 that obstore retries): werkzeug would print each one's traceback here
            logging.getLogger("werkzeug").setLevel(logging.CRITICAL)
            return drill(Servers(redis_server, s3, hosts, model, args))
    finally:
        redis_server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
