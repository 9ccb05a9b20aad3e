#!/usr/bin/env python
"""Chaos suite: 3 workers, 8 partitions, a long mixed stream, and faults all along.

While a producer streams events over many memories, the suite SIGKILLs a random worker every
few seconds (and restarts one), and between the kills applies each operational fault once:

- pause: SIGSTOP a worker past its lease, then SIGCONT it (a zombie);
- redis: SIGKILL Redis and restart it (append-only file, fsync always: no data loss);
- full: the snapshot store (a 64 MiB tmpfs the script mounts) filled to ENOSPC for a while;
- readonly: the snapshot store remounted read-only for a while;
- group: ``XGROUP DESTROY`` of two partitions' consumer group (the owner must recreate it);
- meta: ``DEL PREFIX:meta`` (live workers re-assert it; the time it takes is printed);
- flushall: ``FLUSHALL``: Redis loses every stream, response, lease and epoch. The producer
  re-sends its whole input history (explicit ids), and the workers must report the loss
  ("Redis lost data", at error level) and rebuild each partition from its snapshot + replay;
- deploy: a model upgrade mid-stream, as an operator does it: ``memnet rebuild --model B``
  and ``memnet deploy --model B`` (B: another model of the same shape, another seed), then
  as many workers with ``MEMNET_MODEL=B`` as are live, and SIGTERM to the model-A workers
  once the B workers hold every partition. Every worker (re)started from then on serves B,
  and the kills go on.

The workers connect as a Redis user with exactly ``worker.permissions.acl_rules`` (created on
redis-server's command line, so it survives the Redis restart); the script, the producer and
the comparison use the default user. Without root (or if mount fails) the snapshot store is
a plain directory and the two snapshot-store faults are skipped, saying so.

Then the very same input entries (same ids) go through one uninterrupted worker per model
(A and B, each over the whole input) on a fresh Redis each, and the suite compares: updates
lost / applied twice (per-memory write counts in the final snapshots: B's), responses
missing / duplicated / different (bitwise) -- each against model A's reference if its entry
id is at most its partition's recorded switch point, else against B's (``answered_by_A``,
``answered_by_B``) --, final memories that differ from B's reference, and workers that died
on their own (not killed, nor stopped after the deploy, by the suite). All must be 0, and
every partition must have recorded its switch from A to B.
Responses that existed before the FLUSHALL and are gone at the end are counted apart, as
``responses_lost_by_redis`` (Redis lost them, not the workers), if the snapshot their partition
was rebuilt from covers their query (later ones were replayed from the re-sent input and must
have been answered again: else they are missing); those that reappear must equal both their
pre-flush version and the reference, and ``redis_loss_reported`` must be true. Every kill must
be recovered from (``recovery_s``), and a full or read-only store must have made snapshots fail
(``snapshot_failures_full`` / ``_readonly``; a store fault that could not be applied is not
counted as applied).

    python scripts/chaos.py              # 30k events (2 to 2.5 minutes here)
    python scripts/chaos.py --quick      # 8k events, the CI version (65 to 130 s here)
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import msgpack
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memnet import ModelConfig, random_model, save_model  # noqa: E402
from scripts.chaos_compare import COUNTS, Reference, compare  # noqa: E402
from worker.local import WorkerProcess, own_env, owners  # noqa: E402
from worker.permissions import acl_rules  # noqa: E402
from worker.protocol import GROUP, Keys, pack, parse_id, partition_of  # noqa: E402
from worker.servers import RedisServer  # noqa: E402

PREFIX, PARTITIONS, LEASE_MS = "chaos", 8, 2000
MODEL = ModelConfig(input_dim=16, memory_dim=16, output_dim=4, hidden=16, slots=256, top_k=5)
# The workers' Redis user: exactly the minimal rules; the password needs percent-encoding.
USER, PASSWORD = "memnet", "chaos-p@ss/w%rd:1"
STORE_MB = 64
# A partition with new entries snapshots every SNAPSHOT_EVERY_S; a store fault held longer
# than that meets a snapshot of every such partition, whatever their phase (held 3 s, with
# 2 s between the two store faults, the 5 s cadence of partitions taken at the same moment
# stepped over both windows on one machine: no worker noticed either fault).
SNAPSHOT_EVERY_S = 5
HOLD_S = SNAPSHOT_EVERY_S + 1.0  # the least --hold
# Every fault once, interleaved with kills (then kills every few seconds until the end).
# The deploy comes after the FLUSHALL (which would erase its switch points) and early enough
# that model B serves a good part of the stream, through the faults that follow.
PLAN = (
    "kill",
    "pause",
    "kill",
    "flushall",
    "deploy",
    "kill",
    "full",
    "readonly",
    "group",
    "meta",
    "kill",
    "redis",
    "kill",
)
CLOCK = [time.monotonic()]  # when the faulty run began (fault lines show seconds since)


def say(text: str) -> None:
    print(f"  {time.monotonic() - CLOCK[0]:5.1f} s  {text}", flush=True)


def make_input(n: int, memories: int, seed: int) -> list[tuple[int, str, bytes, str | None]]:
    """(partition, entry id, msg, query id) with explicit, increasing ids per partition."""
    rng = np.random.default_rng(seed)
    base = int(time.time() * 1000)
    out = []
    for j in range(n):
        name = f"user-{int(rng.integers(0, memories))}"
        p = partition_of(name, PARTITIONS)
        u = rng.random()
        qid = None
        if u < 0.6:
            msg = {
                "op": "write",
                "memory": name,
                "x": rng.standard_normal(MODEL.input_dim).astype("<f4").tobytes(),
            }
        else:
            qid = f"q{j}"
            key = "x" if u < 0.8 else "q"
            dim = MODEL.input_dim if key == "x" else MODEL.memory_dim
            msg = {
                "op": "query",
                "memory": name,
                "id": qid,
                key: rng.standard_normal(dim).astype("<f4").tobytes(),
            }
        out.append((p, f"{base}-{j}", pack(msg), qid))
    return out


class Producer:
    """XADDs the entries at about ``rate`` per second with explicit (idempotent) ids,
    retrying through outages. ``lock`` is held around each entry, so a fault can stop the
    producer between two entries; ``sent`` counts the entries that landed.

    The last quarter of the entries waits for ``resume`` (the deploy set it once model B's
    workers serve): model B then answers at least that quarter, however slow the machine;
    ``held_s`` says how long it waited (0 where the deploy was through in time)."""

    def __init__(self, url: str, entries: list, rate: float) -> None:
        self.url, self.entries, self.rate = url, entries, rate
        self.lock = threading.Lock()
        self.sent = 0
        self.done = threading.Event()
        self.resume = threading.Event()
        self.hold_at = len(entries) * 3 // 4 // 100 * 100
        self.held_s = 0.0

    def run(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=2)
        started = time.monotonic()
        for n in range(0, len(self.entries), 100):
            if n == self.hold_at and not self.resume.is_set():
                began = time.monotonic()
                say(f"producer: entry {n} waits until the deploy is through")
                self.resume.wait()
                self.held_s = time.monotonic() - began
                started += self.held_s  # the same pace after it
            while time.monotonic() - started < n / self.rate:
                time.sleep(0.005)
            for j in range(n, min(n + 100, len(self.entries))):
                with self.lock:
                    add(client, self.entries[j])
                    self.sent = j + 1
        self.done.set()

    def resend(self, client: redis.Redis) -> int:
        """XADD again every entry sent so far, in order (the caller holds ``lock``)."""
        for j in range(0, self.sent, 500):
            pipe = client.pipeline(transaction=False)
            for p, entry_id, msg, _ in self.entries[j : min(j + 500, self.sent)]:
                pipe.xadd(Keys(PREFIX).inp(p), {"msg": msg}, id=entry_id)
            for reply in pipe.execute(raise_on_error=False):
                if isinstance(reply, Exception) and "equal or smaller" not in str(reply):
                    raise reply
        return self.sent


def add(client: redis.Redis, entry: tuple) -> None:
    p, entry_id, msg, _ = entry
    while True:
        try:
            client.xadd(Keys(PREFIX).inp(p), {"msg": msg}, id=entry_id)
            return
        except redis.ResponseError as e:
            if "equal or smaller" in str(e):
                return  # an earlier try landed before its reply was lost
            raise
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.2)


class Cluster:
    """The worker processes; ``model`` is the one a worker started now serves."""

    def __init__(self, workdir: Path, url: str, model: Path, count: int) -> None:
        self.workdir, self.url, self.model = workdir, url, model
        workdir.mkdir(parents=True, exist_ok=True)
        self.workers: dict[str, WorkerProcess] = {}
        self.killed: set[str] = set()
        self.retired: dict[str, int | str] = {}  # stopped after a deploy: exit codes
        self.serial = 0
        for _ in range(count):
            self.start()

    def settings(self, url: str) -> dict[str, str]:
        """What the workers and the operator's commands share (url: whose Redis user)."""
        return {
            "REDIS_URL": url,
            "MEMNET_SNAPSHOT_DIR": str(self.workdir / "snapshots"),
            "MEMNET_PREFIX": PREFIX,
            "MEMNET_PARTITIONS": str(PARTITIONS),
        }

    def start(self) -> str:
        self.serial += 1
        name = f"w{self.serial}"
        env = {
            **self.settings(self.url),
            "MEMNET_MODEL": str(self.model),
            "MEMNET_LEASE_MS": str(LEASE_MS),
            "MEMNET_BATCH_SIZE": "200",
            "MEMNET_SNAPSHOT_EVERY_ENTRIES": "2000",
            "MEMNET_SNAPSHOT_EVERY_S": str(SNAPSHOT_EVERY_S),
            "MEMNET_WORKER_ID": name,
        }
        self.workers[name] = WorkerProcess(env, self.workdir / f"{name}.log", inherit=False)
        return name

    def kill(self, name: str) -> None:
        self.killed.add(name)
        self.workers[name].kill()

    def live(self) -> list[str]:
        return [n for n, w in self.workers.items() if w.proc.poll() is None]

    def died(self) -> list[str]:
        """Workers that exited on their own (not killed by the suite, not stopped yet)."""
        gone = self.killed | set(self.retired) | set(self.live())
        return [n for n in self.workers if n not in gone]

    def stop(self, name: str) -> int | str:
        """SIGTERM; the exit code (a warning unless 0)."""
        try:
            code: int | str = self.workers[name].stop(20)
        except subprocess.TimeoutExpired:
            code = "killed: did not stop within 20 s"
        if code != 0:
            when = "" if self.serving(name) else " (before it served: still starting)"
            say(f"warning: {name} exited with {code} on SIGTERM{when}")
        return code

    def retire(self, names: list[str]) -> None:
        """Stop the workers of a model no longer served (their exit codes are kept)."""
        for name in names:
            self.retired[name] = self.stop(name)

    def stop_all(self) -> None:
        for name in self.live():
            self.stop(name)

    def serving(self, name: str) -> bool:
        """Has the worker logged that it serves (it started up)?"""
        log = self.workers[name].log
        return f"worker {name} serving" in log.read_text(errors="replace")


def all_owned_by(client: redis.Redis, live: set[str]) -> bool:
    try:
        held = owners(client, PREFIX, PARTITIONS)
    except redis.RedisError:
        return False
    return all(h in live for h in held)


def wait_recovered(
    client: redis.Redis, cluster: Cluster, killed: str, began: float
) -> float | None:
    """Seconds from the kill until every partition is held by a live worker (None: > 60 s)."""
    while not all_owned_by(client, set(cluster.live()) - {killed}):
        if time.monotonic() - began > 60:
            return None
        time.sleep(0.05)
    return time.monotonic() - began


def wait_until(condition: Any, timeout_s: float, every_s: float = 0.02) -> float | None:
    """Seconds until condition() held (Redis errors count as not yet), or None."""
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        try:
            if condition():
                return time.monotonic() - began
        except redis.RedisError:
            pass
        time.sleep(every_s)
    return None


class SnapshotStore:
    """The run's snapshot directory, on a tmpfs of its own when the script may mount one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.mounted, self.why = False, "not root"
        if os.geteuid() == 0:
            done = mount("-t", "tmpfs", "-o", f"size={STORE_MB}m", "tmpfs", str(path))
            self.mounted = done.returncode == 0
            self.why = None if self.mounted else f"mount failed: {done.stderr.strip()}"

    def unmount(self) -> None:
        if self.mounted and mount_command("umount", str(self.path)).returncode != 0:
            mount_command("umount", "-l", str(self.path))


def mount(*args: str) -> subprocess.CompletedProcess:
    return mount_command("mount", *args)


def remount(path: str, mode: str) -> subprocess.CompletedProcess:
    """``mount -o remount,MODE``, retried for up to 5 s: the kernel refuses to make a
    filesystem read-only while a file on it is open for writing."""
    for _ in range(100):
        done = mount("-o", f"remount,{mode}", path)
        if done.returncode == 0:
            break
        time.sleep(0.05)
    return done


def mount_command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=30)


class Faults:
    """Applies the faults; collects what they did (printed as they happen)."""

    def __init__(
        self,
        server: RedisServer,
        cluster: Cluster,
        producer: Producer,
        store: SnapshotStore,
        rng: random.Random,
        hold_s: float,
        upgrade: Path,
    ) -> None:
        self.server, self.cluster, self.producer, self.store = server, cluster, producer, store
        self.rng, self.hold_s, self.upgrade = rng, hold_s, upgrade
        self.applied: list[str] = []
        self.recoveries: list[float | None] = []
        self.threads: list[threading.Thread] = []
        self.figures: dict[str, Any] = {"meta_back_s": None, "group_back_s": None}
        self.figures.update(rebuild_s=None, deploy_s=None, b_serving_s=None)
        self.b_workers: set[str] = set()
        self.flushed: list[tuple[str, dict]] | None = None  # responses just before FLUSHALL
        self.logs = Logs(cluster.workdir)
        self.flush_mark: dict[str, int] | None = None

    def apply(self, action: str) -> None:
        if getattr(self, f"fault_{action}")() is not False:  # False: it could not be applied
            self.applied.append(action)

    def background(self, target: Any) -> None:
        thread = threading.Thread(target=target)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def fault_kill(self) -> None:
        """SIGKILL a random worker, restart one a second later, time the takeover."""
        live = self.cluster.live()
        if not live:
            say("no live worker to kill: starting one")
            self.cluster.start()
            return
        name = self.rng.choice(live)
        began = time.monotonic()
        self.cluster.kill(name)
        time.sleep(1.0)
        self.cluster.start()

        def measure() -> None:
            took = wait_recovered(self.server.client(), self.cluster, name, began)
            self.recoveries.append(took)
            said = "not within 60 s" if took is None else f"after {took:.2f} s"
            say(f"killed {name}: its partitions were owned again {said}")

        self.background(measure)

    def fault_pause(self) -> None:
        """SIGSTOP a worker for 2.5 leases, then SIGCONT it (it comes back as a zombie)."""
        name = self.rng.choice(self.cluster.live())
        worker = self.cluster.workers[name]
        worker.signal(signal.SIGSTOP)
        threading.Timer(2.5 * LEASE_MS / 1000, worker.signal, args=(signal.SIGCONT,)).start()
        say(f"paused {name} for {2.5 * LEASE_MS / 1000:.1f} s")

    def fault_redis(self) -> None:
        """SIGKILL Redis and start it again from its append-only file."""
        self.server.stop(kill=True)
        time.sleep(1.0)
        self.server.start()
        say("killed and restarted Redis")

    def fault_full(self) -> None:
        """Fill the snapshot store with a ballast file until ENOSPC, hold, delete it."""
        ballast = self.store.path / "ballast"
        written = 0
        mark = self.logs.mark()
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for chunk in (1 << 20, 1 << 16, 1 << 12):
                zeros = bytes(chunk)
                try:
                    while True:
                        written += os.write(fd, zeros)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
            say(
                f"filled the snapshot store ({written / 2**20:.1f} MiB of ballast, ENOSPC) "
                f"for {self.hold_s:.0f} s"
            )
            time.sleep(self.hold_s)
        finally:
            os.close(fd)
            ballast.unlink()
        say(f"snapshot store emptied again; {self.snapshot_errors(mark, 'full')}")

    def snapshot_errors(self, mark: dict[str, int], fault: str) -> str:
        """What the workers logged of failed snapshots since mark (kept in the figures: a
        store fault the workers never noticed was not a fault)."""
        failed = [e for e in self.logs.since(mark) if "snapshot failed" in str(e.get("msg"))]
        self.figures[f"snapshot_failures_{fault}"] = len(failed)
        levels = sorted({e.get("level") for e in failed})
        plural = "" if len(failed) == 1 else "s"
        said = f" ({', '.join(levels)})" if levels else ""
        return f"the workers logged {len(failed)} snapshot failure{plural}{said}"

    def fault_readonly(self) -> None:
        """Remount the snapshot store read-only for a while, then read-write again."""
        path, mark = str(self.store.path), self.logs.mark()
        done = remount(path, "ro")
        if done.returncode != 0:
            say(f"could not remount the snapshot store read-only: {done.stderr.strip()}")
            return False
        try:
            say(f"snapshot store read-only for {self.hold_s:.0f} s")
            time.sleep(self.hold_s)
        finally:
            done = remount(path, "rw")
            if done.returncode != 0:
                raise RuntimeError(f"cannot remount {path} read-write: {done.stderr.strip()}")
        say(f"snapshot store read-write again; {self.snapshot_errors(mark, 'readonly')}")

    def fault_group(self) -> None:
        """XGROUP DESTROY of two random partitions; time until both groups are back."""
        client, keys = self.server.client(), Keys(PREFIX)
        chosen = sorted(self.rng.sample(range(PARTITIONS), 2))
        for p in chosen:
            client.xgroup_destroy(keys.inp(p), GROUP)
        say(f"destroyed consumer group {GROUP!r} of partitions {chosen}")

        def back() -> bool:
            return all(
                any(g["name"].decode() == GROUP for g in client.xinfo_groups(keys.inp(p)))
                for p in chosen
            )

        def measure() -> None:
            took = wait_until(back, 30)
            self.figures["group_back_s"] = None if took is None else round(took, 2)
            said = "not recreated within 30 s" if took is None else f"recreated after {took:.2f} s"
            say(f"consumer groups of partitions {chosen}: {said}")

        self.background(measure)

    def fault_meta(self) -> None:
        """DEL PREFIX:meta once every live worker serves (a starting one writes it anyway);
        time until the live workers have re-asserted it."""
        client, key = self.server.client(), Keys(PREFIX).meta
        wait_until(lambda: all(self.cluster.serving(n) for n in self.cluster.live()), 15, 0.1)
        starting = [n for n in self.cluster.live() if not self.cluster.serving(n)]
        client.delete(key)
        took = wait_until(lambda: client.exists(key), 20)
        self.figures["meta_back_s"] = None if took is None else round(took, 2)
        said = "not back within 20 s" if took is None else f"back after {took:.2f} s"
        note = f" ({', '.join(starting)} still starting)" if starting else ""
        say(f"deleted {key}: {said}{note}")

    def fault_flushall(self) -> None:
        """Record what Redis holds and FLUSHALL in one transaction, then re-send the input.

        A real producer keeps an outbox of what it sent until it is sure Redis kept it and
        re-sends it after such a loss; the producer here does that with its whole history
        (explicit ids, in order per partition: idempotent), so the input is whole again."""
        keys, client = Keys(PREFIX), self.server.client()
        with self.producer.lock:
            self.flush_mark = self.logs.mark()
            pipe = client.pipeline(transaction=True)
            for p in range(PARTITIONS):
                pipe.xrange(keys.out(p))
            for p in range(PARTITIONS):
                pipe.xrange(keys.inp(p))
            pipe.flushall()
            replies = pipe.execute()
            resent = self.producer.resend(client)
        self.flushed = [
            (i.decode(), msgpack.unpackb(f[b"msg"], raw=False))
            for reply in replies[:PARTITIONS]
            for i, f in reply
        ]
        inputs = {i.decode() for reply in replies[PARTITIONS:-1] for i, _ in reply}
        unknown = inputs - {e[1] for e in self.producer.entries[:resent]}
        self.figures.update(inputs_at_flush=len(inputs), inputs_resent=resent)
        say(
            f"FLUSHALL: Redis held {len(self.flushed)} responses and {len(inputs)} input "
            f"entries; re-sent {resent} input entries"
            + (f" (warning: {len(unknown)} were never sent)" if unknown else "")
        )

    def fault_deploy(self) -> None:
        """Upgrade to model B (``upgrade_workers``); then the producer may go on past its
        last quarter and the A workers (idle since the deploy) get SIGTERM."""
        try:
            self.upgrade_workers()
        finally:
            self.producer.resume.set()
        cluster = self.cluster
        old = [n for n in cluster.live() if n not in self.b_workers]
        cluster.retire(old)
        codes = ", ".join(f"{n} {cluster.retired[n]}" for n in old)
        say(f"SIGTERM to model A's workers: exit codes {codes}")

    def upgrade_workers(self) -> None:
        """``memnet rebuild`` and ``memnet deploy`` of model B, run as an operator runs them
        (the default Redis user); then as many B workers start as are live, until they hold
        every partition. Every worker started from then on serves B. First it waits until
        every live A worker serves: one still starting when the deploy switches would be
        refused at start-up (its model is no longer served)."""
        cluster = self.cluster
        wait_until(lambda: all(cluster.serving(n) for n in cluster.live()), 30, 0.1)
        for command in ("rebuild", "deploy"):
            took, said = self.operator(command)
            self.figures[f"{command}_s"] = round(took, 1)
            say(f"memnet {command} --model B: {said} ({took:.1f} s)")
        cluster.model = self.upgrade
        self.b_workers = new = {cluster.start() for _ in cluster.live()}
        client = self.server.client()
        took = wait_until(lambda: set(owners(client, PREFIX, PARTITIONS)) <= new, 120, 0.1)
        self.figures["b_serving_s"] = None if took is None else round(took, 1)
        said = "not within 120 s" if took is None else f"after {took:.1f} s"
        say(f"model B's workers {', '.join(sorted(new))} hold every partition {said}")

    def operator(self, command: str) -> tuple[float, str]:
        """Run ``memnet COMMAND --model B``: seconds, and the first line it printed (its
        report); raises if it fails (its output is in run/COMMAND.log)."""
        began = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", command, "--model", str(self.upgrade)],
            env={**own_env(), **self.cluster.settings(self.server.url)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        with open(self.cluster.workdir / f"{command}.log", "w") as log:
            log.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"memnet {command} exited with {done.returncode}: {done.stderr}")
        lines = done.stdout.strip().splitlines() or [""]
        return time.monotonic() - began, lines[0]

    def rebuilt_at(self) -> dict[int, str | None]:
        """Each partition's snapshot position at its first take after the FLUSHALL (what
        Redis's loss of responses can excuse: those of queries up to it)."""
        first: dict[int, tuple[int, str | None]] = {}  # p -> (epoch, position): the lowest
        for e in self.logs.since(self.flush_mark or {}):  # epoch is the first take (the
            if m := TOOK.match(str(e.get("msg"))):  # logs' times are whole seconds)
                take = (int(m[2]), None if m[3] == "None" else m[3])
                first[int(m[1])] = min(first.get(int(m[1]), take), take)
        return {p: position for p, (_, position) in first.items()}

    def loss_reported(self) -> bool | None:
        """Did a worker log "Redis lost data" at error level after the FLUSHALL?"""
        if self.flush_mark is None:
            return None
        return any(
            e.get("level") == "error" and "Redis lost data" in str(e.get("msg"))
            for e in self.logs.since(self.flush_mark)
        )


class Logs:
    """The workers' logs (JSON lines): what they logged since a mark (their sizes then)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def mark(self) -> dict[str, int]:
        return {str(f): f.stat().st_size for f in self.folder.glob("w*.log")}

    def since(self, mark: dict[str, int]) -> Iterator[dict]:
        for log in sorted(self.folder.glob("w*.log")):
            with open(log, "rb") as f:
                f.seek(mark.get(str(log), 0))
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a traceback's lines, or a line cut by SIGKILL
                    if isinstance(entry, dict):
                        yield entry


def chaos(faults: Faults, every_s: float) -> None:
    """Every fault of the plan, then kills, every few seconds, until the producer is done
    and the plan is through."""
    plan = [a for a in PLAN if a not in ("full", "readonly") or faults.store.mounted]
    if "deploy" not in plan:
        faults.producer.resume.set()
    done = faults.producer.done
    while plan or not done.is_set():
        if done.is_set():
            time.sleep(every_s)
        elif done.wait(every_s) and not plan:
            break
        faults.apply(plan.pop(0) if plan else "kill")
    faults.join()


def wait_done(client: redis.Redis, entries: list, cluster: Cluster, stall_s: float) -> bool:
    """Until every partition's committed offset reached its last entry (its responses are
    published in the same commit); False if nothing moved for stall_s or no worker lives."""
    keys = Keys(PREFIX)
    last = {p: parse_id(entry_id) for p, entry_id, _, _ in entries}
    seen, moved = None, time.monotonic()
    while time.monotonic() - moved < stall_s and cluster.live():
        try:
            values = [client.get(keys.part(p, "offset")) for p in range(PARTITIONS)]
        except redis.RedisError:
            values = None
        if values is not None:
            offsets = [parse_id(v.decode()) if v else (0, 0) for v in values]
            if all(offsets[p] >= last[p] for p in last):
                return True
            if offsets != seen:
                seen, moved = offsets, time.monotonic()
        time.sleep(0.2)
    return False


def reference(
    workdir: Path, name: str, model: Path, entries: list, stall_s: float
) -> tuple[RedisServer, Reference]:
    """The same input through one uninterrupted worker of model on a fresh Redis (left
    running: the caller stops it)."""
    server = RedisServer(workdir / f"ref-{name}-redis")
    keys, client = Keys(PREFIX), server.client()
    pipe = client.pipeline(transaction=False)
    for p, entry_id, msg, _ in entries:
        pipe.xadd(keys.inp(p), {"msg": msg}, id=entry_id)
    pipe.execute()
    ref = Cluster(workdir / f"ref-{name}", server.url, model, 1)
    if not wait_done(client, entries, ref, stall_s):
        say(f"warning: the reference worker of model {name} did not get through the input")
    ref.stop_all()
    return server, Reference(name, client, ref.workdir / "snapshots", model)


def references(
    workdir: Path, models: dict[str, Path], entries: list, stall_s: float
) -> list[tuple[RedisServer, Reference]]:
    """One reference per model, all at once (each its own Redis and worker)."""
    done: dict[str, tuple[RedisServer, Reference]] = {}

    def one(name: str) -> None:
        done[name] = reference(workdir, name, models[name], entries, stall_s)

    threads = [threading.Thread(target=one, args=(name,)) for name in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [name for name in models if name not in done]
    if missing:
        for server, _ in done.values():
            server.stop()
        raise RuntimeError(f"the reference run of model {', '.join(missing)} failed")
    return [done[name] for name in models]


def wait_serving(client: redis.Redis, cluster: Cluster) -> None:
    """Until every live worker holds a share of the partitions (all held), at most 120 s."""
    took = wait_until(
        lambda: set(owners(client, PREFIX, PARTITIONS)) == set(cluster.live()), 120, 0.1
    )
    said = "not within 120 s" if took is None else f"after {took:.1f} s"
    print(f"  the workers shared all partitions {said}", flush=True)


def worker_url(port: int) -> str:
    return f"redis://{USER}:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/0"


def run(
    args: argparse.Namespace, workdir: Path, models: dict[str, Path], entries: list
) -> dict[str, Any]:
    """The faulty run (model A, then B from the deploy on) and the comparison; the figures."""
    server = RedisServer(
        workdir / "redis",
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--user",
        USER,
        "on",
        f">{PASSWORD}",
        *acl_rules(PREFIX),
    )
    store = SnapshotStore(workdir / "run" / "snapshots")
    if not store.mounted:
        print(f"  the snapshot store is no tmpfs ({store.why}): 'full' and 'readonly' skipped")
    cluster = None
    try:
        cluster = Cluster(workdir / "run", worker_url(server.port), models["A"], 3)
        wait_serving(server.client(), cluster)
        producer = Producer(server.url, entries, args.rate)
        faults = Faults(
            server, cluster, producer, store, random.Random(args.seed), args.hold, models["B"]
        )
        # (a daemon: if the script fails, a producer retrying a stopped Redis must not hang it)
        thread = threading.Thread(target=producer.run, daemon=True)
        began = CLOCK[0] = time.monotonic()
        thread.start()
        chaos(faults, args.kill_every)
        thread.join()
        if not wait_done(server.client(), entries, cluster, args.stall):
            say("warning: the workers did not get through the input")
        elapsed = time.monotonic() - began
        died, alive = cluster.died(), cluster.live()
        for name in died:
            say(f"{name} died on its own (exit code {cluster.workers[name].proc.returncode})")
        cluster.stop_all()
        # Model B's reference is the final one; without a deploy B served nothing.
        served = models if "deploy" in faults.applied else {"A": models["A"]}
        refs = references(workdir, served, entries, args.stall)
        try:
            figures = compare(
                server.client(),
                workdir / "run" / "snapshots",
                [ref for _, ref in refs],
                entries,
                PREFIX,
                PARTITIONS,
                flushed=faults.flushed,
                rebuilt_at=faults.rebuilt_at() if faults.flushed is not None else None,
            )
        finally:
            for ref_server, _ in refs:
                ref_server.stop()
    finally:
        if cluster is not None:
            for name in cluster.live():  # only after a failure of the script itself
                cluster.kill(name)
        server.stop()
        store.unmount()
    return {
        **figures,
        "redis_loss_reported": faults.loss_reported(),
        **faults.figures,
        "workers_started": len(cluster.workers),
        "workers_killed": len(cluster.killed),
        "workers_died": len(died),
        "workers_retired": len(cluster.retired),
        "retired_exit_codes": sorted(set(map(str, cluster.retired.values()))),
        "workers_alive": len(alive),
        "faults": faults.applied,
        "store_faults_skipped": store.why,
        "producer_held_s": round(producer.held_s, 1),
        "seconds": round(elapsed, 1),
        "kills": len(faults.recoveries),
        "recovery_s": [None if r is None else round(r, 2) for r in faults.recoveries],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=30_000)
    parser.add_argument("--memories", type=int, default=300)
    parser.add_argument("--rate", type=float, default=300.0, help="events per second")
    parser.add_argument("--kill-every", type=float, default=4.0, help="seconds between faults")
    parser.add_argument(
        "--hold",
        type=float,
        default=HOLD_S,
        help=f"seconds a store stays full/ro (at least {HOLD_S}: longer than a snapshot period)",
    )
    parser.add_argument("--stall", type=float, default=120.0, help="give up after no progress")
    parser.add_argument("--quick", action="store_true", help="8k events at 160/s (CI)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.events, args.rate, args.kill_every, args.stall = 8000, 160.0, 2.0, 45
    if args.hold < HOLD_S:
        parser.error(f"--hold must be at least {HOLD_S} s (longer than a snapshot period)")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="memnet-chaos-"))
    models = {name: workdir / f"model-{name}.safetensors" for name in ("A", "B")}
    for seed, path in enumerate(models.values(), start=args.seed):
        save_model(random_model(MODEL, seed=seed), path)
    entries = make_input(args.events, args.memories, args.seed)
    queries = sum(1 for e in entries if e[3])
    print(
        f"chaos: {args.events} events ({queries} queries) over {args.memories} memories, "
        f"3 workers, {PARTITIONS} partitions, in {workdir}",
        flush=True,
    )
    figures = run(args, workdir, models, entries)
    figures.update(events=args.events, queries=queries)
    figures["total_s"] = round(time.monotonic() - started, 1)
    for key, value in figures.items():
        print(f"{key:>24}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0 if passed(figures) else 1


STORE_FAULTS = ("full", "readonly")
TOOK = re.compile(r"took partition (\d+) \(epoch (\d+)\) at (\S+),")


def passed(figures: dict[str, Any]) -> bool:
    """Every count 0; every kill recovered from; a full or read-only store made snapshots
    fail; if Redis lost data, the workers said so; meta re-asserted; after a deploy every
    partition recorded its switch, B answered, A's workers stopped cleanly."""
    applied = figures["faults"]
    return (
        all(figures[c] == 0 for c in COUNTS)
        and None not in figures["recovery_s"]
        and all(figures.get(f"snapshot_failures_{f}", 0) > 0 for f in STORE_FAULTS if f in applied)
        and ("flushall" not in applied or figures["redis_loss_reported"] is True)
        and ("meta" not in applied or figures["meta_back_s"] is not None)
        and ("group" not in applied or figures["group_back_s"] is not None)
        and ("deploy" not in applied or deployed(figures))
    )


def deployed(figures: dict[str, Any]) -> bool:
    return (
        figures["partitions_switched"] == PARTITIONS
        and figures["answered_by_B"] > 0
        and figures["retired_exit_codes"] == ["0"]
    )


if __name__ == "__main__":
    sys.exit(main())
