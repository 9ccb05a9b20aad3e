"""Several `memnet worker` processes: fair split, exactly once, SIGKILL, SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from memnet import Engine, load_model
from tests.streams import (
    assert_same_answer,
    events,
    library_answers,
    outputs,
    send,
    wait_for,
)
from tests.test_worker import DIMS, MEMORIES
from worker.local import WorkerProcess, owners

PREFIX = "p"
PARTITIONS = 8


@pytest.fixture
def start(redis_url, tmp_path, model_file):
    started: list[WorkerProcess] = []

    def launch(name: str) -> WorkerProcess:
        env = {
            "REDIS_URL": redis_url,
            "MEMNET_MODEL": str(model_file),
            "MEMNET_SNAPSHOT_DIR": str(tmp_path / "snap"),
            "MEMNET_PREFIX": PREFIX,
            "MEMNET_PARTITIONS": str(PARTITIONS),
            "MEMNET_LEASE_MS": "1500",
            "MEMNET_BATCH_SIZE": "50",
            "MEMNET_WORKER_ID": name,
            "MEMNET_SNAPSHOT_EVERY_ENTRIES": "200",
            "MEMNET_LOG_LEVEL": "INFO",
        }
        worker = WorkerProcess(env, tmp_path / f"{name}.log")
        started.append(worker)
        return worker

    yield launch
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(10)


def split(client):
    held = owners(client, PREFIX, PARTITIONS)
    return sorted(Counter(held).values()) if None not in held else None


def answered_exactly_once(client, batch, model_file):
    expected = library_answers(Engine(load_model(model_file)), batch)
    out = outputs(client, PREFIX, PARTITIONS)
    counts = Counter(m["id"] for _, m in out)
    assert set(counts) == set(expected), "missing or unexpected responses"
    assert max(counts.values()) == 1, "duplicated responses"
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])


def queries(batch):
    return sum(e["op"] == "query" for e in batch)


@pytest.mark.parametrize("n, shares", [(2, [4, 4]), (3, [2, 3, 3])])
def test_workers_split_partitions_fairly_and_answer_everything_once(
    n, shares, start, redis_server, model_file
):
    r = redis_server.client()
    workers = [start(f"w{i}") for i in range(n)]
    wait_for(lambda: split(r) == shares, 90, f"partitions split {shares}")
    batch = events(1500, MEMORIES * 3, DIMS, np.random.default_rng(5))
    send(r, PREFIX, PARTITIONS, batch)
    wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= queries(batch), 60, "responses")
    assert split(r) == shares
    answered_exactly_once(r, batch, model_file)
    assert all(w.stop() == 0 for w in workers)


def test_sigkill_mid_stream_then_restart_loses_and_repeats_nothing(start, redis_server, model_file):
    r = redis_server.client()
    a, b = start("a"), start("b")
    wait_for(lambda: split(r) == [4, 4], 90, "two workers sharing")
    batch = events(3000, [f"k{i}" for i in range(40)], DIMS, np.random.default_rng(6))
    chunks = np.array_split(np.arange(len(batch)), 10)
    for number, chunk in enumerate(chunks):
        send(r, PREFIX, PARTITIONS, [batch[j] for j in chunk])
        if number == 3:
            time.sleep(0.3)  # let a work on it, then kill it mid-stream
            a.kill()
        if number == 6:
            a = start("a2")
        time.sleep(0.05)
    wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= queries(batch), 90, "responses")
    wait_for(lambda: split(r) == [4, 4], 30, "rebalanced")
    answered_exactly_once(r, batch, model_file)
    # final state: probe every memory; answers must equal an uninterrupted library run
    probes = [
        {
            "op": "query",
            "memory": f"k{i}",
            "id": f"probe{i}",
            "q": np.full(DIMS[1], 0.5, "<f4").tobytes(),
        }
        for i in range(40)
    ]
    send(r, PREFIX, PARTITIONS, probes)
    wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= queries(batch) + 40, 60, "probes")
    answered_exactly_once(r, batch + probes, model_file)
    assert a.stop() == 0 and b.stop() == 0


def test_sigterm_drains_snapshots_and_releases_within_4_seconds(
    start, redis_server, tmp_path, model_file
):
    r = redis_server.client()
    w = start("solo")
    wait_for(lambda: split(r) == [8], 90, "one worker owning all")
    batch = events(4000, MEMORIES, DIMS, np.random.default_rng(8))
    send(r, PREFIX, PARTITIONS, batch)
    time.sleep(0.2)
    began = time.monotonic()
    w.signal(signal.SIGTERM)
    code = w.proc.wait(10)
    took = time.monotonic() - began
    print(f"SIGTERM to exit: {took:.2f} s")
    assert code == 0 and took <= 4.0, f"exit {code} after {took:.2f} s"
    assert owners(r, PREFIX, PARTITIONS) == [None] * PARTITIONS  # leases released
    assert list((tmp_path / "snap").glob("p*/*/manifests/snap-*")), (
        "no snapshot written on shutdown"
    )
    # a new worker picks up exactly where it stopped
    start("next")
    wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= queries(batch), 60, "responses")
    answered_exactly_once(r, batch, model_file)


def test_ownership_converges_as_workers_join_and_leave(start, redis_server):
    """Within one lease plus a cycle of the change (a joining worker counts from the moment
    it registers; it compiles first), every worker holds floor or ceil of P/N."""
    r = redis_server.client()
    lease_s, bound = 1.5, 1.5 + 2 * 0.5 + 1.0  # lease + renewal cycles + polling slack
    workers = [start("j0")]
    wait_for(lambda: split(r) == [8], 90, "one worker owning all")

    def registered(n):
        return lambda: r.zcard(f"{PREFIX}:workers") == n

    for n, shares in ((2, [4, 4]), (3, [2, 3, 3])):
        workers.append(start(f"j{n - 1}"))
        wait_for(registered(n), 90, f"{n} workers registered")
        began = time.monotonic()
        wait_for(lambda s=shares: split(r) == s, bound, f"split {shares} after a join")
        print(f"join of worker {n}: balanced in {time.monotonic() - began:.2f} s")
    began = time.monotonic()
    assert workers[0].stop() == 0  # leaves cleanly: hands its partitions over
    wait_for(lambda: split(r) == [4, 4], bound, "split 4/4 after a clean leave")
    print(f"clean leave: balanced in {time.monotonic() - began:.2f} s")
    began = time.monotonic()
    workers[1].kill()  # dies: its leases must expire first
    wait_for(lambda: split(r) == [8], lease_s + bound, "one worker owning all after a kill")
    print(f"kill: taken over in {time.monotonic() - began:.2f} s")


def test_the_procfile_under_honcho_splits_3_3_2_and_stops_cleanly(
    redis_url, redis_server, tmp_path, model_file
):
    """The README's `honcho start -c worker=3` (virtual environment on PATH): the Procfile's
    workers split 8 partitions 3/3/2, serve metrics on honcho's ports, and honcho's SIGTERM
    stops them all within its 5 s, leases released, each exiting 0 as honcho sees it (the
    Procfile's `exec`: through `/bin/sh -c` alone honcho would report rc=-15)."""
    root = Path(__file__).resolve().parents[1]
    bin_dir = Path(sys.executable).parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "REDIS_URL": redis_url,
        "MEMNET_MODEL": str(model_file),
        "MEMNET_SNAPSHOT_DIR": str(tmp_path / "snap"),
        "MEMNET_PREFIX": "honcho",
        "MEMNET_LEASE_MS": "1500",
    }
    env.pop("MEMNET_METRICS_PORT", None)
    with open(tmp_path / "honcho.log", "wb") as log:
        honcho = subprocess.Popen(
            [str(bin_dir / "honcho"), "start", "-c", "worker=3", "-p", str(port)],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    r = redis_server.client()
    try:
        held = lambda: sorted(Counter(owners(r, "honcho", 8)).values())  # noqa: E731
        wait_for(lambda: None not in owners(r, "honcho", 8) and held() == [2, 3, 3], 120, "3/3/2")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        assert b"memnet_partitions_owned" in metrics
        honcho.send_signal(signal.SIGTERM)
        assert honcho.wait(15) is not None
    finally:
        if honcho.poll() is None:
            honcho.kill()
            honcho.wait(10)
    text = (tmp_path / "honcho.log").read_text()
    assert "memnet: not found" not in text and "SIGKILL" not in text, text
    assert owners(r, "honcho", 8) == [None] * 8, text  # every lease released on the way out
    for n in (1, 2, 3):
        assert f"worker.{n} stopped (rc=0)" in text, text
