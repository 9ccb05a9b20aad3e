"""Workers on this machine for commands that bring their own (``memnet demo``,
``memnet eval-babi``): a Redis to use, worker processes under a private key prefix, and
collecting responses; and ``memnet worker`` as one process, for the scripts and the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import redis

from worker.client import MemnetClient
from worker.connection import connect, text
from worker.protocol import Keys, pack, parse_id
from worker.servers import RedisServer


@contextlib.contextmanager
def local_redis(workdir: Path) -> Iterator[tuple[str, str]]:
    """(url, description): REDIS_URL if set, else a private redis-server if one is
    installed, else an embedded fakeredis server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"], "REDIS_URL"
        return
    if shutil.which("redis-server"):
        server = RedisServer(workdir / "redis")
        try:
            yield server.url, "a private redis-server"
        finally:
            server.stop()
        return
    # The demo extra; a missing one is reported by worker.cli as the extra to install.
    import fakeredis
    import lupa  # noqa: F401 (the workers' Lua scripts run on it inside fakeredis)

    server = fakeredis.TcpFakeServer(("127.0.0.1", 0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0", "an embedded fakeredis server"
    finally:
        server.shutdown()
        server.server_close()


def _checkout() -> Path | None:
    """The source checkout this ``worker`` package is imported from (its root holds
    pyproject.toml), or None for an installed package."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


class WorkerProcess:
    """``memnet worker`` as a real process (what honcho runs), its stderr appended to log.

    From a checkout it runs in the checkout's root, so ``python -m worker.cli`` imports this
    same source even where it is not installed; an installed package runs where it is."""

    def __init__(self, env: dict[str, str], log: Path, inherit: bool = True) -> None:
        """``inherit=False``: none of this process's deployment settings (``own_env``)."""
        self.log = log
        with open(log, "ab") as stderr:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.cli", "worker"],
                env={**(os.environ if inherit else own_env()), **env},
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=_checkout(),
            )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                raise
        return self.proc.returncode


def owners(client: redis.Redis, prefix: str, partitions: int) -> list[str | None]:
    """Each partition's lease holder (a worker id), None where no worker holds it."""
    keys = Keys(prefix)
    values = [client.get(keys.part(p, "lease")) for p in range(partitions)]
    return [v.decode() if v is not None else None for v in values]


def own_env() -> dict[str, str]:
    """This process's environment without a deployment's settings (MEMNET_*, REDIS_URL,
    AWS_*, PORT): what a script's own workers start from, so a shell set up for production
    cannot point them at its Redis, snapshot store or metrics port."""
    ours, named = ("MEMNET_", "AWS_"), ("REDIS_URL", "PORT")
    return {k: v for k, v in os.environ.items() if not k.startswith(ours) and k not in named}


def worker_env(url: str, model: Path, prefix: str, workdir: Path, partitions: int) -> dict:
    """The environment of a local worker (the demo's, eval-babi's): this one's without any
    deployment setting (``own_env``: a demo must not snapshot or archive into the caller's
    store, share its worker id or take its batch size), with its own Redis, model, prefix,
    snapshot directory and cache (in workdir: nothing left where the command was run)."""
    env = {
        **own_env(),
        "REDIS_URL": url,
        "MEMNET_MODEL": str(model),
        "MEMNET_SNAPSHOT_DIR": str(workdir / f"snapshots-{prefix}"),
        "MEMNET_CACHE_DIR": str(workdir / "cache"),
        "MEMNET_PREFIX": prefix,
        "MEMNET_PARTITIONS": str(partitions),
        "MEMNET_LEASE_MS": "2000",
        "MEMNET_LOG_LEVEL": "WARNING",
    }
    return env


@contextlib.contextmanager
def local_workers(
    url: str, model: Path, prefix: str, workdir: Path, count: int = 2, partitions: int = 8
) -> Iterator[MemnetClient]:
    """``count`` worker processes serving model under prefix; yields a client once they
    hold every partition; stops them (SIGTERM) and deletes the prefix's keys after."""
    env = worker_env(url, model, prefix, workdir, partitions)
    workers = [
        subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], env=env)
        for _ in range(count)
    ]
    try:
        client = MemnetClient(url, prefix)
        _wait_owned(client, workers, partitions)
        yield client
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(10)
            except subprocess.TimeoutExpired:
                w.kill()
        _cleanup(url, prefix)


def _wait_owned(client: MemnetClient, workers: list[subprocess.Popen], partitions: int) -> None:
    deadline = time.monotonic() + 120
    fair = sorted([partitions // len(workers) + (i < partitions % len(workers)) for i in
                   range(len(workers))])  # fmt: skip
    while time.monotonic() < deadline:
        if any(w.poll() is not None for w in workers):
            raise SystemExit("memnet: a worker exited during start-up")
        try:
            owners = [client.redis.get(client.keys.part(p, "lease")) for p in range(partitions)]
        except Exception:
            owners = [None]
        if None not in owners and sorted(owners.count(o) for o in set(owners)) == fair:
            return
        time.sleep(0.1)
    raise SystemExit("memnet: workers did not take the partitions within 120 s")


def send(client: MemnetClient, events: list[dict]) -> None:
    """XADD every event to its partition's input stream, pipelined in batches."""
    pipe = client.redis.pipeline(transaction=False)
    for event in events:
        pipe.xadd(client.keys.inp(client.partition(event["memory"])), {"msg": pack(event)})
        if len(pipe) >= 500:
            pipe.execute()
    pipe.execute()


def collect(
    client: MemnetClient, queries: set[str], partitions: int = 8, timeout_s: float = 60.0
) -> tuple[dict[str, dict], list[float]]:
    """Responses by query id (until all arrived or the timeout) and each one's latency from
    its input entry's id time to its arrival, in seconds."""
    deadline = time.monotonic() + timeout_s
    responses: dict[str, dict] = {}
    latencies = []
    positions = {client.keys.out(p): "0-0" for p in range(partitions)}
    while len(responses) < len(queries) and time.monotonic() < deadline:
        for stream, entries in client.redis.xread(positions, count=1000, block=500) or []:
            now = time.time()
            for entry_id, fields in entries:
                positions[text(stream)] = text(entry_id)
                message = msgpack.unpackb(fields[b"msg"], raw=False)
                responses[message["id"]] = message
                latencies.append(now - parse_id(text(entry_id))[0] / 1000)
    return responses, latencies


def _cleanup(url: str, prefix: str) -> None:
    with contextlib.suppress(Exception):
        client = connect(url)
        for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            client.delete(key)
