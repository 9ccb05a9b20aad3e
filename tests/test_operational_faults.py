"""Operational faults a serving worker survives: a full or unwritable snapshot store, a
destroyed consumer group, Redis losing data (seen without INFO), missing ACL rights, a deleted
or contested ``meta``, and a stop with very many memories. Each against a real redis-server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import redis

from memnet import Engine, load_model, random_model, save_model
from tests.conftest import WORKER_MODEL
from tests.streams import (
    assert_same_answer,
    events,
    library_answers,
    outputs,
    wait_for,
    worker_settings,
)
from worker.local import owners
from worker.permissions import acl_rules
from worker.protocol import Keys, pack, partition_of
from worker.servers import RedisServer
from worker.settings import SettingsError
from worker.worker import Worker

PREFIX = "o"
PARTITIONS = 4
DIMS = (WORKER_MODEL.input_dim, WORKER_MODEL.memory_dim)
MEMORIES = [f"o{i}" for i in range(12)]
KEYS = Keys(PREFIX)


@pytest.fixture(scope="module")
def engine(model_file):
    return Engine(load_model(model_file))


def settings(url, tmp_path, model_file, partitions=PARTITIONS, **overrides):
    values = {"lease_ms": 1500, "snapshot_every_entries": 40, **overrides}
    return worker_settings(url, tmp_path, model_file, PREFIX, partitions, **values)


class Serving:
    """A worker's loop in a thread, as ``memnet worker`` runs it (request_stop is what its
    SIGTERM handler calls); remembers whether the loop ended on its own."""

    def __init__(self, s, engine) -> None:
        self.worker = Worker(s, engine)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_for(lambda: len(self.worker.parts) == PARTITIONS, 60, "the worker to take over")

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:  # a worker must never end by itself: the test says so
            self.error = e

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def stop(self, timeout_s: float = 10.0) -> float:
        began = time.monotonic()
        self.worker.request_stop()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the worker did not stop"
        assert self.error is None, repr(self.error)
        return time.monotonic() - began


def with_ids(batch, start_ms=1_700_000_000_000):
    """(partition, explicit entry id, msg) per event: producers that can send again."""
    return [
        (partition_of(e["memory"], PARTITIONS), f"{start_ms + j}-0", pack(e))
        for j, e in enumerate(batch)
    ]


def send_ids(r, entries):
    """XADD with explicit ids; an id already there is skipped (idempotent, like a producer
    with an outbox)."""
    for p, entry_id, msg in entries:
        with contextlib.suppress(redis.ResponseError):
            r.xadd(KEYS.inp(p), {"msg": msg}, id=entry_id)


def queries(batch):
    return sum(e["op"] == "query" for e in batch)


def answered(r, n):
    wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= n, 60, f"{n} responses")


def assert_exactly_once(r, batch, engine, only=None):
    expected = library_answers(engine, batch)
    out = outputs(r, PREFIX, PARTITIONS)
    ids = [m["id"] for _, m in out]
    assert len(ids) == len(set(ids)), "duplicated responses"
    want = set(expected) if only is None else set(only)
    assert want <= set(ids), f"missing responses: {sorted(want - set(ids))[:5]}"
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A small filesystem that fills up (root only: CI and this machine run as root)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem is full."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return ballast


def reported_loss(caplog):
    """Error-level lines saying Redis lost data."""
    return [
        x
        for x in caplog.records
        if x.levelno == logging.ERROR and "Redis lost data" in x.getMessage()
    ]


def snapshot_failures(caplog):
    return [r for r in caplog.records if "snapshot failed" in r.getMessage()]


# ---- 1. a snapshot store that is full, then read-only ----------------------------------
def test_a_full_or_read_only_snapshot_store_never_stops_a_worker(
    redis_url, redis_server, tmp_path, model_file, engine, caplog
):
    r = redis_server.client()
    batch = events(600, MEMORIES, DIMS, np.random.default_rng(40))
    entries = with_ids(batch)
    with tmpfs(tmp_path / "snap", "1m") as snap, caplog.at_level(logging.INFO):
        ballast = fill(snap)
        serving = Serving(settings(redis_url, tmp_path, model_file), engine)
        send_ids(r, entries[:300])  # snapshots due every 40 entries: each one fails (ENOSPC)
        answered(r, queries(batch[:300]))
        assert snapshot_failures(caplog), "the store was expected to be full"
        subprocess.run(["mount", "-o", "remount,ro", str(snap)], check=True)
        send_ids(r, entries[300:])
        answered(r, queries(batch))
        assert serving.alive()
        assert not any(r.exists(KEYS.part(p, "trimmed")) for p in range(PARTITIONS))
        subprocess.run(["mount", "-o", "remount,rw", str(snap)], check=True)
        ballast.unlink()
        serving.stop()  # the final snapshots now succeed, and leases are released
        assert owners(r, PREFIX, PARTITIONS) == [None] * PARTITIONS
        for p in range(PARTITIONS):
            assert list((snap / f"p{p}").glob("*/manifests/snap-*")), f"partition {p}: no snapshot"
    assert_exactly_once(r, batch, engine)
    assert len(snapshot_failures(caplog)) <= 2  # throttled: once, then once a minute


# ---- 6. failing snapshots back off instead of flooding the log -------------------------
def test_failing_snapshots_back_off_and_log_once_a_minute(
    redis_url, redis_server, tmp_path, model_file, engine, caplog
):
    r = redis_server.client()
    (tmp_path / "snap").write_text("not a directory")  # every snapshot fails at once
    batch = events(300, MEMORIES, DIMS, np.random.default_rng(41))
    with caplog.at_level(logging.INFO):
        serving = Serving(settings(redis_url, tmp_path, model_file, batch_size=5), engine)
        send_ids(r, with_ids(batch))
        answered(r, queries(batch))
        time.sleep(2.0)  # idle with snapshots due: backing off, not retrying every pass
        assert serving.alive()
        serving.stop()
    failures = snapshot_failures(caplog)
    assert 1 <= len(failures) <= 2, [f.getMessage() for f in failures]
    assert "next try in" in failures[0].getMessage()
    assert not any(r.exists(KEYS.part(p, "trimmed")) for p in range(PARTITIONS))
    assert_exactly_once(r, batch, engine)


# ---- 2. a consumer group destroyed under a serving worker ------------------------------
def test_a_destroyed_consumer_group_is_recreated_at_the_applied_position(
    redis_url, redis_server, tmp_path, model_file, engine, caplog
):
    r = redis_server.client()
    batch = events(400, MEMORIES, DIMS, np.random.default_rng(42))
    entries = with_ids(batch)
    with caplog.at_level(logging.INFO):
        serving = Serving(settings(redis_url, tmp_path, model_file), engine)
        send_ids(r, entries[:200])
        answered(r, queries(batch[:200]))
        for p in (0, 2):
            assert r.xgroup_destroy(KEYS.inp(p), "memnet") == 1
        send_ids(r, entries[200:])
        answered(r, queries(batch))
        assert serving.alive()
        for p in (0, 2):
            assert [g["name"] for g in r.xinfo_groups(KEYS.inp(p))] == [b"memnet"]
        serving.stop()
    assert "consumer group is gone" in caplog.text
    assert_exactly_once(r, batch, engine)


# ---- 3. Redis restarts from an older RDB, for a user without INFO ----------------------
def test_redis_losing_data_is_found_without_info_and_rebuilt(tmp_path, model_file, engine, caplog):
    server = RedisServer(
        tmp_path / "rdb", "--user", "app", "on", ">pw", "~o:*", "+@all", "-@dangerous"
    )
    url = f"redis://app:pw@127.0.0.1:{server.port}/0"
    admin = server.client()
    batch = events(400, MEMORIES, DIMS, np.random.default_rng(43))
    entries = with_ids(batch)
    try:
        with caplog.at_level(logging.INFO):
            r = redis.Redis.from_url(url)
            with pytest.raises(redis.exceptions.NoPermissionError):
                r.info()  # the worker cannot read run_id
            # no snapshot ahead of the RDB: every answer Redis lost can be given again
            s = settings(url, tmp_path, model_file, snapshot_every_entries=10**9)
            serving = Serving(s, engine)
            send_ids(r, entries[:200])
            answered(r, queries(batch[:200]))
            admin.save()  # the RDB Redis will come back from
            send_ids(r, entries[200:])
            answered(r, queries(batch))
            server.stop(kill=True)  # what was written after SAVE is lost
            server.start()
            admin = server.client()
            r = redis.Redis.from_url(url)
            assert len(outputs(r, PREFIX, PARTITIONS)) < queries(batch)  # Redis lost some
            send_ids(r, entries[200:])  # the producer sends what Redis lost again
            answered(r, queries(batch))
            time.sleep(0.5)
            assert serving.alive()
            serving.stop()
        assert reported_loss(caplog)
        assert_exactly_once(r, batch, engine)  # as if nothing happened
    finally:
        server.stop()


# ---- 7. FLUSHALL is reported as data loss and the memories rebuilt ---------------------
def test_flushall_is_reported_at_error_level_and_rebuilt_from_snapshots(
    redis_url, redis_server, tmp_path, model_file, engine, caplog
):
    r = redis_server.client()
    batch = events(500, MEMORIES, DIMS, np.random.default_rng(44))
    entries = with_ids(batch)
    with caplog.at_level(logging.INFO):
        serving = Serving(settings(redis_url, tmp_path, model_file), engine)
        send_ids(r, entries[:300])
        answered(r, queries(batch[:300]))
        r.flushall()
        send_ids(r, entries)  # the producer's outbox: everything again
        later = [e["id"] for e in batch[300:] if e["op"] == "query"]
        wait_for(
            lambda: set(later) <= {m["id"] for _, m in outputs(r, PREFIX, PARTITIONS)},
            60,
            "the queries sent after the flush",
        )
        wait_for(lambda: r.exists(KEYS.meta), 10, "meta to be re-asserted")
        assert serving.alive()
        serving.stop()
    assert reported_loss(caplog)
    # memories rebuilt from snapshots + replay: later answers are those of the whole history
    assert_exactly_once(r, batch, engine, only=later)


# ---- 4. the documented minimal ACL, and a user missing a right -------------------------
def worker_env(url, tmp_path, model_file, name):
    return {
        "REDIS_URL": url,
        "MEMNET_MODEL": str(model_file),
        "MEMNET_SNAPSHOT_DIR": str(tmp_path / "snap"),
        "MEMNET_PREFIX": PREFIX,
        "MEMNET_PARTITIONS": str(PARTITIONS),
        "MEMNET_LEASE_MS": "1500",
        "MEMNET_SNAPSHOT_EVERY_ENTRIES": "50",
        "MEMNET_WORKER_ID": name,
    }


@pytest.mark.slow
def test_the_documented_minimal_acl_serves_through_a_handover_and_a_redis_restart(
    tmp_path, model_file, engine
):
    from worker.local import WorkerProcess

    rules = acl_rules(PREFIX)
    server = RedisServer(
        tmp_path / "acl", "--appendonly", "yes", "--appendfsync", "always",
        "--user", "memnet", "on", ">s3cret/pw", *rules,
    )  # fmt: skip
    url = f"redis://memnet:{quote('s3cret/pw', safe='')}@127.0.0.1:{server.port}/0"
    batch = events(600, MEMORIES, DIMS, np.random.default_rng(45))
    entries = with_ids(batch)
    r = redis.Redis.from_url(url)
    workers = []
    try:
        workers.append(WorkerProcess(worker_env(url, tmp_path, model_file, "a"), tmp_path / "a"))
        wait_for(lambda: owners(r, PREFIX, PARTITIONS) == ["a"] * PARTITIONS, 90, "a to start")
        send_ids(r, entries[:200])
        answered(r, queries(batch[:200]))
        workers.append(WorkerProcess(worker_env(url, tmp_path, model_file, "b"), tmp_path / "b"))
        wait_for(lambda: sorted(map(str, owners(r, PREFIX, PARTITIONS))) == list("aabb"), 90, "b")
        send_ids(r, entries[200:400])
        server.stop()  # graceful: nothing lost (append-only, fsync always)
        server.start()
        send_ids(r, entries[400:])
        answered(r, queries(batch))
        assert [w.stop() for w in workers] == [0, 0]
        assert_exactly_once(r, batch, engine)
        for name in "ab":
            log = (tmp_path / name).read_text()
            assert "NOPERM" not in log and "Traceback" not in log, log
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                w.kill()
        server.stop()


@pytest.mark.parametrize(
    "missing, named",
    [("+del", "'del' command"), ("-xtrim", "'xtrim' command"), ("-xack", "'xack' command")],
)
def test_a_user_missing_a_right_is_refused_at_start_up_naming_it(
    tmp_path, model_file, missing, named
):
    """Also a right only the scripts use (XTRIM, XACK): Redis checks those when a script
    runs them, at the first trim or commit, unless start-up tries them."""
    rules = [rule for rule in acl_rules(PREFIX) if rule != missing]
    if missing.startswith("-"):
        rules.append(missing)
    server = RedisServer(tmp_path / "acl", "--user", "memnet", "on", ">pw", *rules)
    env = {**os.environ, **worker_env(server.url, tmp_path, model_file, "x")}
    env["REDIS_URL"] = f"redis://memnet:pw@127.0.0.1:{server.port}/0"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "worker.cli", "worker"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=Path(__file__).resolve().parents[1],
        )
    finally:
        server.stop()
    assert done.returncode == 2, done.stderr
    assert named in done.stderr and "+@stream" in done.stderr
    assert "Traceback" not in done.stderr


# ---- 5. meta deleted: re-asserted; a newcomer of another configuration is refused ------
def test_meta_is_reasserted_and_a_mismatching_newcomer_is_refused(
    redis_url, redis_server, tmp_path, model_file, engine
):
    from worker.client import MemnetClient

    r = redis_server.client()
    serving = Serving(settings(redis_url, tmp_path, model_file), engine)
    stored = r.hgetall(KEYS.meta)
    assert stored[b"model"] == engine.model.fingerprint.encode()
    r.delete(KEYS.meta)
    began = time.monotonic()
    # a newcomer with another partition count, started while meta is gone, waits for the
    # live worker to re-assert it and is then refused
    newcomer = Worker(settings(redis_url, tmp_path, model_file, partitions=8), engine)
    with pytest.raises(SettingsError, match=r"MEMNET_PARTITIONS is 8.*has 4 partitions"):
        newcomer._start_up()
    assert r.hgetall(KEYS.meta) == stored and time.monotonic() - began < 5
    other = tmp_path / "other.safetensors"
    save_model(random_model(WORKER_MODEL, seed=5), other)
    stranger = Worker(settings(redis_url, tmp_path, other), Engine(load_model(other)))
    with pytest.raises(SettingsError, match="serves model"):
        stranger._start_up()
    client = MemnetClient(redis_url, PREFIX)
    response = client.query("o1", x=np.ones(WORKER_MODEL.input_dim, np.float32), timeout_s=10)
    assert "y" in response
    assert serving.alive()
    serving.stop()
    assert r.hget(KEYS.meta, "partitions") == b"4"


# ---- 8. stopping takes seconds, whatever the number of memories ------------------------
@pytest.mark.slow
def test_a_stop_abandons_final_snapshots_past_its_budget_and_loses_nothing(
    redis_url, redis_server, tmp_path, model_file, engine, caplog
):
    """Stopping is bounded by MEMNET_STOP_SNAPSHOT_S, not by the number of memories: with
    a zero budget every final snapshot is abandoned (before this, all 120,000 memories
    were written whatever it took), every lease is still released, and the next owner
    replays what the last snapshot lacks. How long a stop takes is measured by
    scripts/operator_drill.sh, not asserted here."""
    r = redis_server.client()
    rng = np.random.default_rng(46)
    names = [f"user-{i}" for i in range(120_000)]
    x = rng.standard_normal((len(names), WORKER_MODEL.input_dim)).astype("<f4")
    writes = [{"op": "write", "memory": n, "x": x[i].tobytes()} for i, n in enumerate(names)]
    s = settings(
        redis_url, tmp_path, model_file, batch_size=1000, snapshot_every_entries=10**9,
        snapshot_every_s=3600.0, stop_snapshot_s=0.0,
    )  # fmt: skip
    serving = Serving(s, engine)
    pipe = r.pipeline(transaction=False)
    for e in writes:
        pipe.xadd(KEYS.inp(partition_of(e["memory"], PARTITIONS)), {"msg": pack(e)})
    pipe.execute()
    wait_for(
        lambda: all(
            r.xinfo_groups(KEYS.inp(p))[0]["lag"] == 0
            and r.xpending(KEYS.inp(p), "memnet")["pending"] == 0
            for p in range(PARTITIONS)
        ),
        120,
        "every write to be applied",
    )
    assert sum(len(p.memories) for p in serving.worker.parts.values()) == len(names)
    with caplog.at_level(logging.INFO, logger="worker.worker"):
        serving.stop()
    abandoned = [m for m in caplog.messages if "snapshot abandoned" in m]
    assert len(abandoned) == PARTITIONS, caplog.messages
    assert owners(r, PREFIX, PARTITIONS) == [None] * PARTITIONS
    # nothing is lost: the next owner replays what the last snapshot lacks
    probe = [{"op": "query", "memory": n, "id": f"q-{n}", "x": x[0].tolist()} for n in names[:20]]
    for e in probe:
        r.xadd(KEYS.inp(partition_of(e["memory"], PARTITIONS)), {"msg": pack(e)})
    Worker(s, engine).run(burst=True)
    mine = [w for w in writes if w["memory"] in set(names[:20])]
    assert_exactly_once(r, mine + probe, engine)


def test_a_client_finding_no_meta_gets_a_message_not_a_traceback(redis_url, monkeypatch, capsys):
    from worker.cli import main as cli

    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MEMNET_PREFIX", PREFIX)
    assert cli(["write", "--memory", "m", "--x", "1,2"]) == 2
    err = capsys.readouterr().err
    assert "o:meta does not exist: start a worker first" in err and "Traceback" not in err


def test_a_partition_that_cannot_be_taken_does_not_stop_the_others(
    redis_url, redis_server, tmp_path, model_file, engine, caplog, monkeypatch
):
    """An unreadable snapshot store of one partition (EIO, a stale NFS handle) costs that
    partition only: the worker serves the rest and tries it again after a backoff."""
    from worker import ownership

    real = ownership.open_store

    def open_store(settings, p, engine):
        if p == 1:
            raise OSError(5, "Input/output error", str(tmp_path / "snap" / "p1"))
        return real(settings, p, engine)

    monkeypatch.setattr(ownership, "open_store", open_store)
    r = redis_server.client()
    batch = [e for e in events(300, MEMORIES, DIMS, np.random.default_rng(47))]
    others = [e for e in batch if partition_of(e["memory"], PARTITIONS) != 1]
    with caplog.at_level(logging.INFO):
        w = Worker(settings(redis_url, tmp_path, model_file), engine)
        thread = threading.Thread(target=w.run, daemon=True)
        thread.start()
        wait_for(lambda: sorted(w.parts) == [0, 2, 3], 60, "the other partitions")
        send_ids(r, with_ids(batch))
        answered(r, queries(others))
        assert thread.is_alive() and 1 not in w.parts
        w.request_stop()
        thread.join(10)
    assert "partition 1: cannot take it" in caplog.text
    expected = library_answers(engine, others)
    out = outputs(r, PREFIX, PARTITIONS)
    assert sorted(m["id"] for _, m in out) == sorted(expected)
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])


def test_a_right_revoked_while_serving_backs_off_across_takes(tmp_path, model_file, engine, caplog):
    """XREADGROUP revoked: every take succeeds (restore, group, offsets), then the read
    fails. The partition's backoff must grow across those takes (it was reset by each, so
    each partition was released, restored and taken again every second); once the right is
    back it serves again, exactly."""
    server = RedisServer(tmp_path / "acl", "--user", "memnet", "on", ">pw", *acl_rules(PREFIX))
    url = f"redis://memnet:pw@127.0.0.1:{server.port}/0"
    admin = server.client()  # the default user
    batch = events(200, MEMORIES, DIMS, np.random.default_rng(49))
    try:
        with caplog.at_level(logging.INFO, logger="worker.ownership"):
            serving = Serving(settings(url, tmp_path, model_file), engine)
            admin.execute_command("ACL", "SETUSER", "memnet", "-xreadgroup")
            caplog.clear()
            time.sleep(8)
            takes = Counter(int(m[1]) for m in re.finditer(r"took partition (\d+)", caplog.text))
            admin.execute_command("ACL", "SETUSER", "memnet", "+xreadgroup")
            send_ids(admin, with_ids(batch))
            answered(admin, queries(batch))
            assert serving.alive()
            serving.stop()
        # backoff from 1 s, doubling, drawn in [d/2, d]: at most 5 tries in 8 s (at least 8
        # when each take reset it)
        assert takes and max(takes.values()) <= 5, takes
        assert "permission denied" in caplog.text  # ("serves again" once it served a minute)
        assert_exactly_once(admin, batch, engine)
    finally:
        server.stop()


def test_a_right_revoked_after_the_commit_backs_off_across_takes(
    tmp_path, model_file, engine, caplog
):
    """XTRIM revoked: each take reads and commits, then the trim after a snapshot fails.
    The commit in between must not start the backoff over (it did: each partition was
    released, restored and taken again every second, with an ERROR line each time)."""
    server = RedisServer(tmp_path / "acl", "--user", "memnet", "on", ">pw", *acl_rules(PREFIX))
    url = f"redis://memnet:pw@127.0.0.1:{server.port}/0"
    admin = server.client()
    batch = events(1200, MEMORIES, DIMS, np.random.default_rng(53))
    entries = with_ids(batch)
    s = settings(url, tmp_path, model_file, snapshot_every_entries=4, archive=False)
    try:
        with caplog.at_level(logging.INFO, logger="worker.ownership"):
            serving = Serving(s, engine)
            admin.execute_command("ACL", "SETUSER", "memnet", "-xtrim")
            caplog.clear()
            for at in range(0, 800, 50):  # 8 s of input: snapshots due all along
                send_ids(admin, entries[at : at + 50])
                time.sleep(0.5)
            takes = Counter(int(m[1]) for m in re.finditer(r"took partition (\d+)", caplog.text))
            denied = len(re.findall(r"partition \d+: permission denied", caplog.text))
            admin.execute_command("ACL", "SETUSER", "memnet", "+xtrim")
            send_ids(admin, entries[800:])
            answered(admin, queries(batch))
            assert serving.alive()
            serving.stop()
        assert takes and max(takes.values()) <= 5, takes  # (8 or more when reset)
        assert 0 < denied <= PARTITIONS, denied  # an ERROR once a partition, then held back
        assert_exactly_once(admin, batch, engine)
    finally:
        server.stop()


def test_redis_at_maxmemory_is_waited_out_without_churn(tmp_path, model_file, engine, caplog):
    """Redis refuses writes at maxmemory (noeviction: OOM, its full disk): the worker backs
    off, logs it once, and serves on, exactly, once memory is there again."""
    server = RedisServer(tmp_path / "oom")
    url, r = server.url, server.client()
    batch = events(300, MEMORIES, DIMS, np.random.default_rng(51))
    entries = with_ids(batch)
    try:
        with caplog.at_level(logging.INFO):
            serving = Serving(settings(url, tmp_path, model_file), engine)
            send_ids(r, entries[:100])
            answered(r, queries(batch[:100]))
            send_ids(r, entries[100:200])  # (in Redis before the limit; read during it)
            r.config_set("maxmemory-policy", "noeviction")
            r.config_set("maxmemory", 1)
            caplog.clear()
            time.sleep(6)
            during = caplog.text
            r.config_set("maxmemory", 0)
            send_ids(r, entries[200:])
            answered(r, queries(batch))
            assert serving.alive()
            serving.stop()
        assert_exactly_once(r, batch, engine)
        print(during)
        assert "OOM" in during and during.count("OOM") <= 4, during
        assert "took partition" not in during and "Traceback" not in during, during
        assert "dropping partition" not in during, during  # (the commit retried, not rebuilt)
    finally:
        server.stop()
