"""Faults: zombies are fenced, damaged or foreign snapshots are handled, Redis restarts."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest

from memnet import Engine, load_model, random_model, save_model
from tests.conftest import WORKER_MODEL
from tests.streams import (
    assert_same_answer,
    events,
    library_answers,
    outputs,
    send,
    wait_for,
    worker_settings,
)
from worker.faults import Fenced
from worker.local import WorkerProcess
from worker.protocol import Keys, parse_id, partition_of
from worker.scripts import fenced
from worker.servers import RedisServer
from worker.worker import Worker

PREFIX = "f"
PARTITIONS = 4
DIMS = (WORKER_MODEL.input_dim, WORKER_MODEL.memory_dim)
MEMORIES = [f"f{i}" for i in range(12)]


def settings(redis_url, tmp_path, model_file, **overrides):
    values = {"batch_size": 10, "lease_ms": 600, **overrides}
    return worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS, **values)


def started(s, engine):
    """A worker driven by hand (no threads), holding its fair share."""
    w = Worker(s, engine)
    w.burst = True
    w._start_up()
    w.owner.rebalance(w.keeper.members, grace=True)
    return w


def redis_state(r):
    keys = Keys(PREFIX)
    return [
        (
            r.xlen(keys.out(p)),
            r.xlen(keys.dead(p)),
            r.xlen(keys.inp(p)),
            r.xpending(keys.inp(p), "memnet")["pending"],
        )
        for p in range(PARTITIONS)
    ]


def assert_all_answered_once(r, batch, model_file):
    expected = library_answers(Engine(load_model(model_file)), batch)
    out = outputs(r, PREFIX, PARTITIONS)
    ids = [m["id"] for _, m in out]
    assert sorted(ids) == sorted(expected), "missing or duplicated responses"
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])


def test_a_zombie_cannot_publish_ack_or_trim(redis_url, redis_server, tmp_path, model_file, caplog):
    r = redis_server.client()
    engine = Engine(load_model(model_file))
    batch = events(240, MEMORIES, DIMS, np.random.default_rng(20))
    send(r, PREFIX, PARTITIONS, batch[:120])
    a = started(settings(redis_url, tmp_path, model_file, worker_id="A"), engine)
    assert sorted(a.parts) == list(range(PARTITIONS))
    a.step()  # A commits a batch per partition
    send(r, PREFIX, PARTITIONS, batch[120:])
    p = partition_of(MEMORIES[0], PARTITIONS)
    part = a.parts[p]
    pending = part.prepare(a.owner.read([part])[part])
    in_flight = part.finish(pending, engine.process(pending.items))  # A applied a batch...
    old_epoch = part.epoch
    time.sleep(0.8)  # ...when it stalls past its lease (nothing renews it)
    b = started(settings(redis_url, tmp_path, model_file, worker_id="B"), engine)
    assert sorted(b.parts) == list(range(PARTITIONS)) and b.parts[p].epoch > old_epoch

    before = redis_state(r)
    with caplog.at_level(logging.WARNING, logger="worker.ownership"):
        assert a.commit_all({part: in_flight}) == {part: False}  # publish + ack refused
        a.step()  # reads of every other partition refused too
    assert a.parts == {}
    assert "MEMNET_FENCED" in caplog.text and "dropping partition" in caplog.text
    keys = Keys(PREFIX)
    with pytest.raises(Fenced):
        names = ("epoch", "in", "trimmed", "deploying", "unarchived", "taker")
        fenced(
            a.scripts.trim,
            keys=[keys.part(p, n) for n in names],
            args=[old_epoch, "9999999999999-0", "m", "1", "A"],
        )
    assert (
        a.scripts.renew(
            keys=[keys.part(p, n) for n in ("epoch", "lease", "taker")], args=[old_epoch, "A", 600]
        )
        == 0
    )
    assert redis_state(r) == before  # the zombie changed nothing

    while b.step():
        pass
    assert_all_answered_once(r, batch, model_file)


def test_two_workers_never_hold_one_epoch_after_redis_forgot_a_take(
    redis_url, redis_server, tmp_path, model_file
):
    """Redis losing data (an older RDB, a lagging replica) can bring a partition's epoch
    back below the epoch its live owner took; the next take by another worker then gets
    that very epoch. The scripts checked the epoch alone, so both owners read, each taking
    entries the other never applies (a review's reproduction: queries never answered, and
    answers from a memory that missed entries). The epoch's taker is checked too."""
    r, keys, p = redis_server.client(), Keys(PREFIX), 0
    engine = Engine(load_model(model_file))
    a = started(settings(redis_url, tmp_path, model_file, worker_id="A", lease_ms=60_000), engine)
    epoch = a.parts[p].epoch
    r.set(keys.part(p, "epoch"), epoch - 1)  # Redis as it was before A took p
    r.delete(keys.part(p, "lease"), keys.part(p, "taker"))
    b = started(settings(redis_url, tmp_path, model_file, worker_id="B", lease_ms=60_000), engine)
    assert sorted(b.parts) == [p] and b.parts[p].epoch == epoch  # the very epoch A holds
    send(r, PREFIX, PARTITIONS, events(40, MEMORIES, DIMS, np.random.default_rng(3)))
    assert isinstance(a.owner.read([a.parts[p]])[a.parts[p]], Fenced)
    a.keeper.renew(p, epoch)
    assert a.owner._lost == {p: (epoch, False)}  # (its lease is lost: dropped at the next step)
    assert not isinstance(b.owner.read([b.parts[p]])[b.parts[p]], Exception)


def test_the_trim_points_only_go_up(redis_server):
    """A newly deployed model's kept snapshots can be older than the old model's trim: its
    first trim removes nothing, and must not lower PREFIX:{p}:trimmed (a fallback to a
    snapshot below the entries already gone would pass for complete) or :unarchived."""
    from worker.scripts import Scripts

    r, keys, p = redis_server.client(), Keys("trimpoints"), 0
    names = ("epoch", "in", "trimmed", "deploying", "unarchived", "taker")
    for i in range(1, 31):
        r.xadd(keys.inp(p), {"msg": b"x"}, id=f"{i}-0")
    r.set(keys.part(p, "epoch"), 1)
    r.set(keys.part(p, "taker"), "w")
    trim = Scripts(r).trim

    def trimmed_to(point: str, archived: str = "1") -> tuple[bytes, bytes | None]:
        trim(keys=[keys.part(p, n) for n in names], args=[1, point, "m", archived, "w"])
        return r.get(keys.part(p, "trimmed")), r.get(keys.part(p, "unarchived"))

    assert trimmed_to("20-0", "0") == (b"20-0", b"20-0")
    assert trimmed_to("10-0", "0") == (b"20-0", b"20-0")  # (removes nothing, lowers nothing)
    assert r.xrange(keys.inp(p), count=1)[0][0] == b"20-0"
    assert trimmed_to("20-18446744073709551615") == (b"20-18446744073709551615", b"20-0")
    assert trimmed_to("20-9") == (b"20-18446744073709551615", b"20-0")  # (not as strings)
    assert trimmed_to("100-0") == (b"100-0", b"20-0")
    assert trimmed_to("99-5") == (b"100-0", b"20-0")


def run_burst(redis_url, tmp_path, model_file, **overrides):
    s = settings(redis_url, tmp_path, model_file, lease_ms=2000, **overrides)
    Worker(s, Engine(load_model(s.model))).run(burst=True)


def three_runs(r, redis_url, tmp_path, model_file, rng_seed=21):
    """Three bursts with events in between: two snapshots kept, input trimmed."""
    batch = events(450, MEMORIES, DIMS, np.random.default_rng(rng_seed))
    for chunk in (batch[:150], batch[150:300]):
        send(r, PREFIX, PARTITIONS, chunk)
        run_burst(redis_url, tmp_path, model_file)
    return batch


def test_a_corrupt_newest_snapshot_falls_back_to_an_older_one(
    redis_url, redis_server, tmp_path, model_file, caplog
):
    r = redis_server.client()
    batch = three_runs(r, redis_url, tmp_path, model_file)
    for p in range(PARTITIONS):  # every memory blob the newest snapshot wrote
        part = tmp_path / "snap" / f"p{p}" / load_model(model_file).fingerprint[:16]
        newest = sorted((part / "manifests").glob("snap-*.json"))[-1]
        index = json.loads(newest.read_text())["manifest"]["index"]["key"]
        root = tmp_path / "snap"
        for key, _size, _writes, _base, (at, length, _sha) in json.loads(
            (root / index).read_text()
        )["memories"].values():  # each memory's slice of its pack
            data = bytearray((root / key).read_bytes())
            data[at + length - 3] ^= 0xFF
            (root / key).write_bytes(bytes(data))
    send(r, PREFIX, PARTITIONS, batch[300:])
    with caplog.at_level(logging.WARNING):
        run_burst(redis_url, tmp_path, model_file)
    assert caplog.text.count("checksum mismatch (blob corrupted)") >= PARTITIONS
    assert_all_answered_once(r, batch, model_file)  # longer replay, nothing twice


def test_a_damaged_pack_met_by_a_snapshot_takes_the_partition_again(
    redis_url, redis_server, tmp_path, model_file, caplog
):
    """A delete's snapshot copies the deleted memory's pack-mates; a damaged one is moved
    to corrupt/ and the partition taken again (as a fetch does), not retried forever."""
    r = redis_server.client()
    w = started(
        settings(redis_url, tmp_path, model_file, lease_ms=60_000), Engine(load_model(model_file))
    )
    p = partition_of(MEMORIES[0], PARTITIONS)
    mates = [m for m in MEMORIES if partition_of(m, PARTITIONS) == p][:2]
    send(r, PREFIX, PARTITIONS, [e for e in events(60, MEMORIES, DIMS, np.random.default_rng(5))])
    while w.step():
        pass
    part = w.parts[p]
    w.snapshot(part)
    entry = part.store.view[mates[1]]
    path = tmp_path / "snap" / entry.key  # (keys name the partition and model: pP/MODEL/)
    data = bytearray(path.read_bytes())
    data[entry.part[0] + entry.part[1] // 2] ^= 0x01
    path.write_bytes(bytes(data))
    send(r, PREFIX, PARTITIONS, [{"op": "delete", "memory": mates[0]}])
    w.step()
    assert not part.memories.get(mates[0])
    with caplog.at_level(logging.WARNING):
        w.snapshot(part)
    assert p not in w.parts and w.owner.rebuild_due
    assert "checksum mismatch" in caplog.text and not path.exists()
    w.shutdown()


def test_missing_snapshots_with_trimmed_input_are_refused_not_guessed(
    redis_url, redis_server, tmp_path, model_file, caplog
):
    r = redis_server.client()
    batch = three_runs(r, redis_url, tmp_path, model_file)
    assert r.exists(Keys(PREFIX).part(0, "trimmed"))
    shutil.rmtree(tmp_path / "snap")
    send(r, PREFIX, PARTITIONS, batch[300:])
    answered = len(outputs(r, PREFIX, PARTITIONS))
    with caplog.at_level(logging.ERROR):
        run_burst(redis_url, tmp_path, model_file)
    assert caplog.text.count("cannot be rebuilt exactly: no usable snapshot") == PARTITIONS
    assert len(outputs(r, PREFIX, PARTITIONS)) == answered  # no answers from a wrong memory


def test_a_fallback_below_the_trimmed_input_is_refused_not_served(
    redis_url, redis_server, tmp_path, model_file, caplog
):
    """Snapshots the kept ones build on are kept too, but the input is trimmed at the oldest
    kept one: when every kept snapshot is damaged, the store's fallback to such an ancestor
    would replay from an entry whose successors are gone."""
    r = redis_server.client()
    rng = np.random.default_rng(23)
    first = {}  # one memory of each partition, written in the first run only: the packs of
    for name in MEMORIES:  # the first snapshot stay (a pack goes with its last memory)
        first.setdefault(partition_of(name, PARTITIONS), name)
    later = [name for name in MEMORIES if name not in first.values()]
    batch = events(150, MEMORIES, DIMS, rng) + events(600, later, DIMS, rng)
    for start in range(0, 600, 150):  # a snapshot at each hand-over; trims at the next run
        send(r, PREFIX, PARTITIONS, batch[start : start + 150])
        run_burst(redis_url, tmp_path, model_file)
    root, fingerprint = tmp_path / "snap", load_model(model_file).fingerprint[:16]
    for p in range(PARTITIONS):
        manifests = sorted((root / f"p{p}" / fingerprint / "manifests").glob("snap-*.json"))
        assert len(manifests) >= 3  # two kept (snapshots_kept) and the full one they need
        for newer in manifests[1:]:  # damage all but that one (their index blobs)
            index = root / json.loads(newer.read_text())["manifest"]["index"]["key"]
            index.write_bytes(index.read_bytes()[:-3] + b"###")
        oldest = json.loads(manifests[0].read_text())["manifest"]["position"]
        assert parse_id(oldest) < parse_id(r.get(Keys(PREFIX).part(p, "trimmed")).decode())
    send(r, PREFIX, PARTITIONS, batch[600:])
    answered = len(outputs(r, PREFIX, PARTITIONS))
    with caplog.at_level(logging.ERROR):
        run_burst(redis_url, tmp_path, model_file)
    assert caplog.text.count("cannot be rebuilt exactly: its newest usable snapshot") == (
        PARTITIONS
    )
    assert len(outputs(r, PREFIX, PARTITIONS)) == answered  # no answers from a wrong memory


def test_no_snapshot_but_full_history_replays_everything_once(
    redis_url, redis_server, tmp_path, model_file
):
    r = redis_server.client()
    batch = events(300, MEMORIES, DIMS, np.random.default_rng(22))
    send(r, PREFIX, PARTITIONS, batch[:150])
    crashed = started(
        settings(redis_url, tmp_path, model_file, worker_id="crashed"),
        Engine(load_model(model_file)),
    )
    while crashed.step():  # answers everything, then dies before any snapshot
        pass
    assert not list((tmp_path / "snap").glob("p*/*/manifests/*"))  # (no snapshot)
    assert not r.exists(Keys(PREFIX).part(0, "trimmed"))
    time.sleep(0.8)
    send(r, PREFIX, PARTITIONS, batch[150:])
    run_burst(redis_url, tmp_path, model_file)
    assert_all_answered_once(r, batch, model_file)


def test_snapshots_of_another_model_are_never_used(
    redis_url, redis_server, tmp_path, model_file, caplog
):
    """Each model has its own snapshots (pP/MODEL/): a worker of another model forced in
    without memnet rebuild finds none of its own, and with the input trimmed refuses every
    partition rather than answer from a wrong memory; the first model's stay as they were."""
    r = redis_server.client()
    three_runs(r, redis_url, tmp_path, model_file)
    before = sorted(p.name for p in (tmp_path / "snap").glob("p*/*/manifests/*"))
    other = tmp_path / "other.safetensors"
    save_model(random_model(WORKER_MODEL, seed=99), other)
    r.delete(Keys(PREFIX).meta)  # the operator forces the switch (meta would refuse the model)
    answered = len(outputs(r, PREFIX, PARTITIONS))
    with caplog.at_level(logging.WARNING):
        run_burst(redis_url, tmp_path, model_file, model=other)
    assert caplog.text.count("cannot be rebuilt exactly: no usable snapshot") == PARTITIONS
    assert len(outputs(r, PREFIX, PARTITIONS)) == answered
    assert sorted(p.name for p in (tmp_path / "snap").glob("p*/*/manifests/*")) == before


@pytest.mark.slow
def test_redis_restart_mid_stream_loses_nothing(tmp_path, model_file):
    server = RedisServer(tmp_path / "aof", "--appendonly", "yes", "--appendfsync", "always")
    r = server.client()
    try:
        worker = WorkerProcess(
            {
                "REDIS_URL": server.url,
                "MEMNET_MODEL": str(model_file),
                "MEMNET_SNAPSHOT_DIR": str(tmp_path / "snap"),
                "MEMNET_PREFIX": PREFIX,
                "MEMNET_PARTITIONS": str(PARTITIONS),
                "MEMNET_LEASE_MS": "2000",
                "MEMNET_BATCH_SIZE": "20",
                "MEMNET_SNAPSHOT_EVERY_ENTRIES": "100",
            },
            tmp_path / "worker.log",
        )
        wait_for(lambda: r.exists(Keys(PREFIX).part(0, "lease")), 90, "the worker to start")
        batch = events(1200, MEMORIES, DIMS, np.random.default_rng(23))
        send(r, PREFIX, PARTITIONS, batch[:600])
        time.sleep(0.3)
        server.stop()  # graceful: the append-only file is complete
        time.sleep(1.0)
        server.start()
        r = server.client()
        send(r, PREFIX, PARTITIONS, batch[600:])
        queries = sum(e["op"] == "query" for e in batch)
        wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= queries, 90, "all responses")
        assert worker.stop() == 0
        assert_all_answered_once(r, batch, model_file)
        log = (tmp_path / "worker.log").read_text()
        assert "Redis unavailable" in log
    finally:
        server.stop()


def test_wrong_password_stops_start_up_with_a_clear_message(
    tmp_path, model_file, monkeypatch, capsys
):
    from worker.cli import main as cli

    secret = "s3cret/p@ss%word"
    server = RedisServer(tmp_path / "acl", "--requirepass", secret)
    try:
        monkeypatch.setenv("REDIS_URL", f"redis://:wrong@127.0.0.1:{server.port}/0")
        monkeypatch.setenv("MEMNET_MODEL", str(model_file))
        monkeypatch.setenv("MEMNET_SNAPSHOT_DIR", str(tmp_path / "snap"))
        assert cli(["worker", "--burst"]) == 2
        err = capsys.readouterr().err
        assert "REDIS_URL: Redis refused the credentials" in err and "wrong" not in err
    finally:
        server.stop()


def test_acl_user_with_password_in_the_url_only(tmp_path, model_file):
    from urllib.parse import quote

    secret = "s3cret/p@ss%word:x"
    server = RedisServer(tmp_path / "acl")
    admin = server.client()
    admin.execute_command(
        "ACL", "SETUSER", "memnet", "on", f">{secret}", "~f:*", "+@all", "-@dangerous"
    )
    admin.execute_command("ACL", "SETUSER", "default", "off")
    url = f"redis://memnet:{quote(secret, safe='')}@127.0.0.1:{server.port}/0"
    try:
        worker = WorkerProcess(
            {
                "REDIS_URL": url,
                "MEMNET_MODEL": str(model_file),
                "MEMNET_SNAPSHOT_DIR": str(tmp_path / "snap"),
                "MEMNET_PREFIX": PREFIX,
                "MEMNET_PARTITIONS": str(PARTITIONS),
                "MEMNET_LOG_LEVEL": "DEBUG",
            },
            tmp_path / "worker.log",
        )
        import redis

        r = redis.Redis.from_url(url)
        wait_for(lambda: r.exists(Keys(PREFIX).part(0, "lease")), 90, "the worker to start")
        batch = events(200, MEMORIES, DIMS, np.random.default_rng(24))
        send(r, PREFIX, PARTITIONS, batch)
        queries = sum(e["op"] == "query" for e in batch)
        wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= queries, 60, "responses")
        assert worker.stop() == 0
        assert_all_answered_once(r, batch, model_file)
        log = (tmp_path / "worker.log").read_text()
        assert "memnet:***@" in log  # the URL is logged, redacted
        assert secret not in log and quote(secret, safe="") not in log
    finally:
        server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from worker.servers import RedisCluster

    c = RedisCluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


@pytest.mark.slow
def test_workers_run_unchanged_on_a_redis_cluster(cluster, tmp_path, model_file):
    r = cluster.client()
    r.flushall()
    env = {
        "REDIS_URL": cluster.url,
        "MEMNET_MODEL": str(model_file),
        "MEMNET_SNAPSHOT_DIR": str(tmp_path / "snap"),
        "MEMNET_PREFIX": PREFIX,
        "MEMNET_PARTITIONS": str(PARTITIONS),
        "MEMNET_LEASE_MS": "2000",
    }
    workers = [
        WorkerProcess({**env, "MEMNET_WORKER_ID": f"c{i}"}, tmp_path / f"c{i}.log")
        for i in range(2)
    ]
    try:
        keys = Keys(PREFIX)
        wait_for(
            lambda: all(r.exists(keys.part(p, "lease")) for p in range(PARTITIONS)),
            90,
            "the workers to take the partitions",
        )
        slots = {r.keyslot(keys.inp(p)) for p in range(PARTITIONS)}
        assert len(slots) == PARTITIONS  # partitions really live in different slots
        batch = events(600, MEMORIES, DIMS, np.random.default_rng(25))
        send(r, PREFIX, PARTITIONS, batch)
        queries = sum(e["op"] == "query" for e in batch)
        wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= queries, 90, "responses")
        assert_all_answered_once(r, batch, model_file)
    finally:
        assert all(w.stop() == 0 for w in workers)


def test_a_partition_handed_over_stops_showing_its_lag_here(redis_url, redis_server, tmp_path,
                                                            model_file):  # fmt: skip
    """memnet_partition_lag is per partition: only its owner exports it (summed over
    workers, or alerted on, a partition that moved would count twice or stay firing)."""
    from worker import metrics

    def shown():
        return {s.labels["partition"] for s in metrics.LAG.collect()[0].samples}

    w = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    w.keeper.tick()
    assert shown() >= {str(p) for p in range(PARTITIONS)}
    w.owner.hand_over(0)
    w.keeper.tick()
    assert "0" not in shown() and {"1", "2", "3"} <= shown()
    w._progress -= 2 * w.s.stall_s  # a stalled loop: its leases lapse, others take them over
    w.keeper.tick()
    assert not shown() & {str(p) for p in range(PARTITIONS)}
    w.shutdown()


def test_a_snapshot_store_serves_one_deployment(redis_url, redis_server, tmp_path, model_file):
    """Its keys do not name MEMNET_PREFIX: a second deployment pointed at it would load the
    first one's snapshots and mix their input archives."""
    from worker.settings import SettingsError

    first = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    first.shutdown()
    other = worker_settings(redis_url, tmp_path, model_file, "other", PARTITIONS)
    with pytest.raises(SettingsError, match=f"holds the deployment MEMNET_PREFIX={PREFIX}, not"):
        Worker(other, Engine(load_model(model_file)))._start_up()
    again = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    again.shutdown()  # (its own deployment: accepted)


def test_a_store_that_ignores_conditional_writes_is_refused_at_start_up(
    redis_url, redis_server, tmp_path, model_file, monkeypatch
):
    """Some S3-compatible services ignore If-None-Match: a create overwrites. Snapshot
    publication (one manifest per serial) and the store's deployment claim rely on creates
    that fail where an object exists; such a store is refused, naming what it lacks."""
    from worker import ownership
    from worker.settings import SettingsError

    real = ownership.store_at

    class Overwriting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def create(self, key, data):
            self.inner.put(key, data)

    monkeypatch.setattr(ownership, "store_at", lambda url: Overwriting(real(url)))
    with pytest.raises(SettingsError, match="does not refuse to create an object that exists"):
        Worker(
            settings(redis_url, tmp_path, model_file), Engine(load_model(model_file))
        )._start_up()


def test_an_engine_failure_that_comes_back_stays_with_its_partition(
    redis_url, redis_server, tmp_path, model_file
):
    """A bug the engine hits on one partition's input (not bad input: that is dead-lettered
    before the engine) reloads the partitions of the failed call; after that each goes alone
    for a while, so the others are not reloaded again while it fails again and again."""
    from tests.streams import Running

    r = redis_server.client()
    engine = Engine(load_model(model_file))
    real = engine.process

    def process(items):  # a bug reached by one input
        hit = [getattr(e, "row", None) is not None and e.row[0] == 1234.5 for _, e in items]
        if any(hit):
            failures.append(all(hit))  # (True: the call held the poisoned partition alone)
            raise RuntimeError("a bug in the engine")
        return real(items)

    failures = []

    engine.process = process
    poisoned = next(name for name in MEMORIES if partition_of(name, PARTITIONS) == 0)
    others = [name for name in MEMORIES if partition_of(name, PARTITIONS) != 0]
    batch = events(200, others, DIMS, np.random.default_rng(24))
    poison = {"op": "write", "memory": poisoned, "x": [1234.5] * DIMS[0]}
    send(r, PREFIX, PARTITIONS, [poison, *batch])
    worker = Running(Worker(settings(redis_url, tmp_path, model_file, lease_ms=2000), engine))
    queries = sum(e["op"] == "query" for e in batch)
    try:
        wait_for(lambda: len(outputs(r, PREFIX, PARTITIONS)) >= queries, 30, "the others' answers")
    finally:
        worker.stop()
    assert len(failures) >= 2 and all(failures[1:])  # after the first, it failed alone


def test_a_failed_finish_commits_none_of_its_call(redis_url, redis_server, tmp_path, model_file,
                                                  monkeypatch):  # fmt: skip
    """A bug in one partition's finish, inside an engine call shared by every partition,
    reloads every partition of the call: none of their batches may be committed then (the
    partitions finished before it were: released, yet their offsets moved on, their
    backoff was erased)."""
    from worker.partition import Partition

    r, keys = redis_server.client(), Keys(PREFIX)
    send(r, PREFIX, PARTITIONS, events(80, MEMORIES, DIMS, np.random.default_rng(3)))
    w = started(
        settings(redis_url, tmp_path, model_file, lease_ms=5000), Engine(load_model(model_file))
    )
    assert sorted(w.parts) == list(range(PARTITIONS))
    real = Partition.finish

    def finish(self, pending, results):
        if self.number == 2:
            raise RuntimeError("a bug in finish")
        return real(self, pending, results)

    monkeypatch.setattr(Partition, "finish", finish)
    before = [r.get(keys.part(p, "offset")) for p in range(PARTITIONS)]
    w.step()
    assert w.parts == {}  # every partition of the call reloaded
    assert [r.get(keys.part(p, "offset")) for p in range(PARTITIONS)] == before
    assert sorted(w.owner._retry) == list(range(PARTITIONS))  # each backs off


def test_a_lease_lost_at_an_epoch_drops_only_that_epoch(redis_url, redis_server, tmp_path,
                                                        model_file):  # fmt: skip
    """The keeper's verdict names the epoch it lost: when the loop has dropped the
    partition and taken it again meanwhile, the new take stays (it was dropped without a
    release, its lease held, the partition unserved until it expired)."""
    w = started(
        settings(redis_url, tmp_path, model_file, lease_ms=5000), Engine(load_model(model_file))
    )
    part = w.parts[1]
    old = part.epoch
    w.owner.drop(1, "a fault")
    w.owner.release(part)
    w.owner.take(1)
    assert w.parts[1].epoch > old
    w.owner.mark_lost(1, old, data_lost=False)  # (the keeper's renewal at the old epoch)
    w.owner.drop_lost()
    assert 1 in w.parts and w.parts[1].epoch > old
    w.owner.mark_lost(1, w.parts[1].epoch, data_lost=False)
    w.owner.drop_lost()
    assert 1 not in w.parts


def test_one_partitions_failing_snapshots_are_logged_once_while_others_succeed(
    redis_url, redis_server, tmp_path, model_file, monkeypatch, caplog
):
    """A store that fits small snapshots but not a big one: partition 0's snapshot fails
    at every try while the others' succeed. Its failure is told once (the others' success
    ended it, and it was told again at every try, with 'snapshots succeed again')."""
    from memnet.errors import SnapshotError
    from worker.partition import Partition

    w = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    real = Partition.snapshot

    def snapshot(self, abort=None):
        if self.number == 0:
            raise SnapshotError("the store is full")
        return real(self, abort)

    monkeypatch.setattr(Partition, "snapshot", snapshot)
    with caplog.at_level(logging.INFO, logger="worker.worker"):
        for _ in range(4):
            for p in range(PARTITIONS):
                w.snapshot(w.parts[p])
    assert caplog.text.count("partition 0: snapshot failed") == 1
    assert "succeed again" not in caplog.text


def test_a_librarys_repeated_error_lines_pass_once_a_minute():
    """redis-py's cluster client logs every failed topology refresh at ERROR, at each call
    while a node is out of reach (several a second): the worker's log handler lets such a
    line through once a minute per kind, with the count held back; memnet's own lines
    (throttled where they repeat) all pass."""
    import io

    from worker.logs import LibraryLinesThrottled

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    throttle = LibraryLinesThrottled(every_s=0.2)
    handler.addFilter(throttle)
    library, ours = logging.getLogger("redis.cluster"), logging.getLogger("worker.worker")
    for logger in (library, ours):
        logger.addHandler(handler)
    try:
        for port in range(5):
            library.error(f"Topology refresh failed, keeping the current one: port {port}")
            ours.warning("partition 0: its Redis node is out of reach (port %d)", port)
        time.sleep(0.25)
        library.error("Topology refresh failed, keeping the current one: port 9")
    finally:
        for logger in (library, ours):
            logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    refresh = [line for line in lines if line.startswith("Topology")]
    assert refresh == [
        "Topology refresh failed, keeping the current one: port 0",
        "Topology refresh failed, keeping the current one: port 9 (4 like it held back)",
    ]
    assert sum(line.startswith("partition 0") for line in lines) == 5


def test_a_held_back_line_keeps_no_exception_alive():
    """Throttled keeps the latest held-back line to tell it within the minute: an exception
    there would keep its traceback's frames alive (a dropped partition's memories with
    them). It keeps the exception's text."""
    import gc
    import weakref

    from worker.faults import Throttled

    class Big:
        pass

    def fail(held):
        held = held  # (a frame local the traceback keeps)
        raise RuntimeError("a fault")

    throttled, errors = Throttled(logging.getLogger("test")), []
    for _ in range(2):  # the second is held back
        big = Big()
        try:
            fail(big)
        except RuntimeError as e:
            throttled.log("k", logging.ERROR, "failed (%s)", e)
            errors.append(weakref.ref(big))
        del big
    gc.collect()
    assert errors[1]() is None
    assert throttled._latest["k"][2] == ("a fault",)


def commit_fails(w, monkeypatch, error, times):
    """w's commits raise error the first ``times`` times; the list holds how many are left."""
    real, fails = w.owner.commit, [times]

    def commit(batches):
        if fails[0]:
            fails[0] -= 1
            raise error
        return real(batches)

    monkeypatch.setattr(w.owner, "commit", commit)
    return fails


def test_a_commit_waiting_for_redis_is_alive_not_stalled(
    redis_url, redis_server, tmp_path, model_file, monkeypatch, caplog
):
    """A commit retried while Redis is unreachable keeps the loop's progress (what /healthz
    and the lease keeper read) moving: an outage is not a stalled loop. A stall is logged
    once, not at every tick."""
    import redis as redis_py

    r = redis_server.client()
    engine = Engine(load_model(model_file))
    send(r, PREFIX, PARTITIONS, events(40, MEMORIES, DIMS, np.random.default_rng(22)))
    w = started(settings(redis_url, tmp_path, model_file), engine)
    fails = commit_fails(w, monkeypatch, redis_py.ConnectionError("Connection refused"), 3)
    seen = []
    monkeypatch.setattr(w.stopping, "wait", lambda s: seen.append(w._progress) or time.sleep(s))
    w._progress = 0.0
    assert w.step() and fails == [0]
    assert w._progress > 0.0 and len(seen) == 3  # (set after each retry's wait)

    w._progress = time.monotonic() - 10 * w.s.stall_s
    with caplog.at_level(logging.ERROR, logger="worker.leases"):
        for _ in range(3):
            w.keeper.tick()
    assert caplog.text.count("made no progress") == 1


def test_the_lease_keeper_thread_stops_and_reports_it(redis_url, tmp_path, model_file):
    """LeaseKeeper is a Thread: an attribute named _stop hid Thread._stop, and is_alive()
    raised TypeError once the thread had ended (so did /healthz's last_progress)."""
    w = Worker(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    w._start_up()
    w.keeper.start()
    w.keeper.stop()
    w.keeper.join(5)
    assert w.keeper.is_alive() is False and w.last_progress() is None


def test_backoff_survives_any_number_of_failures(monkeypatch):
    """redis-py before 8.2 computed base * 2**failures: OverflowError after ~1,000 failures
    (an hour of an outage) ended the worker from its own fault handler."""
    from redis.backoff import EqualJitterBackoff

    from worker.faults import Backoff

    def compute(self, failures):  # redis-py 8.1's, which pyproject admits
        temp = min(self._cap, self._base * 2**failures) / 2
        return temp + temp * 0.5

    monkeypatch.setattr(EqualJitterBackoff, "compute", compute)
    backoff = Backoff(base_s=0.1, cap_s=5.0)
    backoff.failures = 5000
    assert 2.5 <= backoff.fail() <= 5.0


def test_the_loops_backoff_starts_over_only_after_a_full_rebalance_period(
    redis_url, tmp_path, model_file
):
    """Passes that do not touch Redis (no partitions, no rebalance due) come between
    failing ones: they must not reset a backoff whose fault persists."""
    w = Worker(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    for _ in range(3):
        w.backoff.fail()
    w._faulted_at = time.monotonic()
    w._progress = w._faulted_at + 0.01  # a pass right after the fault
    w._recovered()
    assert w.backoff.failures == 3
    w._progress = w._faulted_at + w.s.renew_every_s + 0.01  # this pass ran the rebalance
    w._recovered()
    assert w.backoff.failures == 0


def test_resident_gauges_follow_partitions_handed_over(
    redis_url, redis_server, tmp_path, model_file
):
    """A worker whose model is no longer the deployment's hands every partition over: its
    resident gauges go to 0 then, not stay at the last batch's figures until it stops."""
    from worker import metrics

    r = redis_server.client()
    send(r, PREFIX, PARTITIONS, events(80, MEMORIES, DIMS, np.random.default_rng(23)))
    w = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    while w.step():
        pass
    assert metrics.RESIDENT_MEMORIES._value.get() == len(MEMORIES)
    assert metrics.RESIDENT_BYTES._value.get() > 0
    w.keeper.meta.active = False  # (as after `memnet deploy` of another model)
    w._loop_once()
    assert w.parts == {}
    assert metrics.RESIDENT_MEMORIES._value.get() == 0 == metrics.RESIDENT_BYTES._value.get()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("OutOfMemoryError:command not allowed when used memory > 'maxmemory'.", "UNAVAILABLE"),
        ("ResponseError:user_script:39: OOM command not allowed when used memory", "UNAVAILABLE"),
        ("ReadOnlyError:You can't write against a read only replica.", "UNAVAILABLE"),
        ("ResponseError:user_script:1: READONLY You can't write against a replica", "UNAVAILABLE"),
        ("ResponseError:NOGROUP No such key 'x' or consumer group 'memnet'", "NOGROUP"),
        ("ResponseError:ERR an OOM-like word: ROOM READONLYX", "OTHER"),
    ],
)
def test_redis_refusing_writes_is_waited_out_like_an_outage(error, kind):
    """At maxmemory (OOM) or a replica after a failover (READONLY), Redis refuses writes
    for a while: the loop backs off (and drops its connections on READONLY), instead of
    releasing every partition with a traceback."""
    import redis as redis_py

    from worker.faults import Kind, classify, read_only

    name, message = error.split(":", 1)
    exc = getattr(redis_py.exceptions, name)(message)
    assert classify(exc) is Kind[kind]
    assert read_only(exc) == ("READONLY " in message or name == "ReadOnlyError")


def test_one_partitions_failed_renewal_leaves_the_others_renewed(
    redis_url, redis_server, tmp_path, model_file, monkeypatch
):
    """A renewal that fails for one partition (its cluster node down) must not stop the
    lease keeper from renewing the others (their leases would lapse too)."""
    import redis as redis_py

    r = redis_server.client()
    w = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    assert sorted(w.parts) == list(range(PARTITIONS))
    real = w.keeper.scripts.renew

    def renew(keys, args):
        if "{0}" in keys[0]:
            raise redis_py.ConnectionError("the node of partition 0 is down")
        return real(keys=keys, args=args)

    monkeypatch.setattr(w.keeper.scripts, "renew", renew)
    for p in range(PARTITIONS):
        r.pexpire(Keys(PREFIX).part(p, "lease"), 50)
    with pytest.raises(redis_py.ConnectionError, match="partition 0"):
        w.keeper.tick()
    ttl = [r.pttl(Keys(PREFIX).part(p, "lease")) for p in range(PARTITIONS)]
    assert ttl[0] <= 50 and all(t > 400 for t in ttl[1:]), ttl


@pytest.mark.parametrize("step", ["time", "heartbeat"])
def test_a_live_set_out_of_reach_leaves_the_leases_renewed(
    redis_url, redis_server, tmp_path, model_file, monkeypatch, step
):
    """PREFIX:workers and Redis's clock may sit on a cluster node that holds none of this
    worker's partitions: that node down (or failing over) must not let every lease lapse."""
    import redis as redis_py

    r = redis_server.client()
    w = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    assert sorted(w.parts) == list(range(PARTITIONS))

    def down(*args, **kwargs):
        raise redis_py.ConnectionError("the node of PREFIX:workers is down")

    if step == "time":
        monkeypatch.setattr(w.keeper, "redis_ms", down)
    else:
        monkeypatch.setattr(w.keeper.scripts, "heartbeat", down)
    for p in range(PARTITIONS):
        r.pexpire(Keys(PREFIX).part(p, "lease"), 50)
    with pytest.raises(redis_py.ConnectionError, match="PREFIX:workers"):
        w.keeper.tick()
    assert all(r.pttl(Keys(PREFIX).part(p, "lease")) > 400 for p in range(PARTITIONS))


@pytest.mark.parametrize(
    "error",
    ["ClusterError:TTL exhausted.", "RedisClusterUnreachableError:cannot be connected",
     "SlotNotCoveredError:slot 12 is not covered", "MasterDownError:MASTERDOWN link down"],
)  # fmt: skip
def test_a_cluster_out_of_reach_or_reconfiguring_is_waited_out(error):
    """What redis-py raises when a cluster cannot be reached (a refresh of its topology
    reaches no node), when TRYAGAIN outlasts its retries (a slot being migrated) or a slot
    has no node: waited out like an outage, never an error that ends a starting worker
    (RedisClusterException is no RedisError) or releases every partition."""
    import redis as redis_py

    from worker.faults import UNAVAILABLE, Kind, classify

    name, message = error.split(":", 1)
    exc = getattr(redis_py.exceptions, name)(message)
    assert classify(exc) is Kind.UNAVAILABLE and isinstance(exc, UNAVAILABLE)


def test_an_archive_that_cannot_be_written_leaves_the_partition_serving_untrimmed(
    redis_url, redis_server, tmp_path, model_file, monkeypatch, caplog
):
    """Archiving before a trim fails (the store is full, S3 is down): like a failed snapshot,
    the partition serves on and its input stays untrimmed until archiving succeeds; it was
    released and restored from its snapshot at every try."""
    from worker import ownership

    r = redis_server.client()
    batch = events(200, MEMORIES, DIMS, np.random.default_rng(24))
    send(r, PREFIX, PARTITIONS, batch)
    s = settings(redis_url, tmp_path, model_file, snapshot_every_entries=10, archive=True)
    w = started(s, Engine(load_model(model_file)))
    epochs = {p: part.epoch for p, part in w.parts.items()}
    real, failing = ownership.Archive.append, [True]

    def append(self, entries):
        if failing[0]:
            raise OSError(28, "No space left on device")
        return real(self, entries)

    monkeypatch.setattr(ownership.Archive, "append", append)
    keys = Keys(PREFIX)
    left = tmp_path / "snap" / "archive" / "p0" / ".tmp-a-crashed-append"  # (a killed owner's)
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a segment")
    with caplog.at_level(logging.ERROR, logger="worker.ownership"):
        while w.step():
            pass
    assert {p: part.epoch for p, part in w.parts.items()} == epochs  # none released
    assert sum(r.xlen(keys.inp(p)) for p in range(PARTITIONS)) == len(batch)  # none trimmed
    assert caplog.text.count("archiving failed") == len(w.parts)  # once per partition
    assert "Traceback" not in caplog.text
    failing[0] = False
    send(r, PREFIX, PARTITIONS, events(100, MEMORIES, DIMS, np.random.default_rng(25)))
    while w.step():
        pass
    assert sum(r.xlen(keys.inp(p)) for p in range(PARTITIONS)) < len(batch)  # trimmed now
    assert not left.exists()  # removed by the new owner's first archiving


def test_a_fault_after_the_first_empty_read_still_backs_off(
    redis_url, redis_server, tmp_path, model_file, monkeypatch
):
    """A partition taken again reads nothing, then fails to tidy its group (a revoked
    XGROUP DELCONSUMER): that read must not count as serving, or its backoff starts over
    at every take (released and restored every second)."""
    import redis as redis_py

    w = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    w.burst = False
    real = w.owner.scripts.tidy

    def tidy(keys, args):
        if "{0}" in keys[0]:
            raise redis_py.exceptions.NoPermissionError("NOPERM no XGROUP DELCONSUMER")
        return real(keys=keys, args=args)

    monkeypatch.setattr(w.owner.scripts, "tidy", tidy)
    monkeypatch.setattr(w, "wait", lambda: time.sleep(0.01))
    ended = time.monotonic() + 5
    while time.monotonic() < ended:
        w._loop_once()
    assert w.owner._retry[0].failures >= 2  # 1 s, then 2 s...: not reset by each take


def test_a_failing_archive_retention_does_not_hold_the_trim(
    redis_url, redis_server, tmp_path, model_file, monkeypatch
):
    """Pruning old archive segments fails (a store that takes writes, not deletes): the
    trim, which needs only the archive written, goes ahead."""
    from worker import ownership

    r = redis_server.client()
    batch = events(200, MEMORIES, DIMS, np.random.default_rng(26))
    send(r, PREFIX, PARTITIONS, batch)
    s = settings(redis_url, tmp_path, model_file, snapshot_every_entries=10, archive=True)
    w = started(s, Engine(load_model(model_file)))

    def prune(self, part):
        raise PermissionError(13, "Permission denied", "archive/p0/old-segment")

    monkeypatch.setattr(ownership.Ownership, "prune", prune)
    epochs = {p: part.epoch for p, part in w.parts.items()}
    while w.step():
        pass
    assert {p: part.epoch for p, part in w.parts.items()} == epochs
    assert sum(r.xlen(Keys(PREFIX).inp(p)) for p in range(PARTITIONS)) < len(batch)


def test_a_commit_refused_by_a_replica_reconnects_before_it_retries(
    redis_url, redis_server, tmp_path, model_file, monkeypatch
):
    """A failover left the connections on the old primary, now a replica: the commit's
    script fails READONLY. Retried on the same connections it would fail for ever; each
    retry connects afresh (REDIS_URL's host resolved again)."""
    import redis as redis_py

    r = redis_server.client()
    send(r, PREFIX, PARTITIONS, events(40, MEMORIES, DIMS, np.random.default_rng(27)))
    w = started(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file)))
    refused = redis_py.ResponseError("user_script:39: READONLY You can't write to a replica")
    fails, dropped = commit_fails(w, monkeypatch, refused, 2), []
    monkeypatch.setattr(w.client.connection_pool, "disconnect", lambda: dropped.append(1))
    assert w.step() and fails == [0]
    assert len(dropped) == 2


def test_a_stop_right_after_a_delete_still_trims_the_deleted_memorys_writes(
    redis_url, redis_server, tmp_path, model_file
):
    """Erasure on time without more input: a stop whose final snapshot is the one after a
    delete trims the deleted memory's writes from the input (the next owner owes no
    erasure snapshot, and an idle partition takes none). A review's reproduction of a
    change that left the trim to the next owner: the writes stayed."""
    r, keys, rng = redis_server.client(), Keys(PREFIX), np.random.default_rng(1)
    p = partition_of("gone", PARTITIONS)
    filler = next(f"m{i}" for i in range(100) if partition_of(f"m{i}", PARTITIONS) == p)

    def write(name):
        return {"op": "write", "memory": name, "x": rng.standard_normal(DIMS[0]).tolist()}

    def drain(worker):
        while worker.step():
            pass

    s = settings(redis_url, tmp_path, model_file, snapshot_every_entries=10_000,
                 snapshot_every_s=0.3, snapshots_kept=2, archive=False)  # fmt: skip
    w = started(s, Engine(load_model(model_file)))
    send(r, PREFIX, PARTITIONS, [write(filler)])
    drain(w)
    w.snapshot(w.parts[p])
    send(
        r,
        PREFIX,
        PARTITIONS,
        [write("gone") for _ in range(3)] + [{"op": "delete", "memory": "gone"}],
    )
    drain(w)
    w.snapshot(w.parts[p])  # the delete's own snapshot: one more is owed
    send(r, PREFIX, PARTITIONS, [write(filler)])
    drain(w)
    w.request_stop()
    w.shutdown()  # (its final snapshot is the one owed)
    from tests.streams import stream

    writes = [m for _, m in stream(r, keys.inp(p)) if m["memory"] == "gone" and m["op"] == "write"]
    assert writes == []
