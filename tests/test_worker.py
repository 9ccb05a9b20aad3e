"""The worker against a real redis-server: answers, order, dead letters, restarts."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from memnet import Engine, load_model, quantized, random_model, save_model
from memnet.snapshot import SnapshotStore
from tests.conftest import WORKER_MODEL
from tests.streams import (
    assert_same_answer,
    events,
    library_answers,
    outputs,
    send,
    stream,
    worker_settings,
)
from worker import streams
from worker.cli import main as cli
from worker.ownership import model_prefix
from worker.protocol import Keys, pack, partition_of
from worker.scripts import READ
from worker.worker import Worker

PREFIX = "t"
PARTITIONS = 4
CONFIG = WORKER_MODEL
DIMS = (CONFIG.input_dim, CONFIG.memory_dim)
MEMORIES = [f"mem-{i}" for i in range(10)]


def settings(redis_url, tmp_path, model_file, **overrides):
    return worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS, **overrides)


def burst(redis_url, tmp_path, model_file, **overrides):
    s = settings(redis_url, tmp_path, model_file, **overrides)
    Worker(s, Engine(load_model(model_file))).run(burst=True)


def test_responses_equal_the_library_and_sit_at_the_query_entry_id(
    redis_url, tmp_path, model_file, redis_server
):
    batch = events(500, MEMORIES, DIMS, np.random.default_rng(1))
    ids = send(redis_server.client(), PREFIX, PARTITIONS, batch)
    burst(redis_url, tmp_path, model_file)
    out = outputs(redis_server.client(), PREFIX, PARTITIONS)
    expected = library_answers(Engine(load_model(model_file)), batch)
    assert len(out) == len(expected)  # one response per query, none for writes
    entry_of = {e["id"]: i for e, i in zip(batch, ids, strict=True) if e["op"] == "query"}
    for entry_id, response in out:
        assert entry_of[response["id"]] == entry_id
        assert_same_answer(response, expected[response["id"]])
    assert not outputs(redis_server.client(), PREFIX, PARTITIONS, "dead")
    # everything is acknowledged and the offset records the last applied entry
    r = redis_server.client()
    for p in range(PARTITIONS):
        assert r.xpending(Keys(PREFIX).inp(p), "memnet")["pending"] == 0


@pytest.mark.parametrize("scan", quantized.available())
def test_every_candidate_pass_serves_the_same_answers(scan, redis_url, tmp_path, redis_server):
    """MEMNET_SCAN picks the exact search's candidate pass; the answers stay the library's
    (on its default pass) bit for bit. The memories here are beyond the small-memory arena
    (1,000 slots of 8), so every search goes through the exact scan."""
    config = dataclasses.replace(CONFIG, slots=1000)
    path = tmp_path / "large.safetensors"
    save_model(random_model(config, seed=3), path)
    batch = events(300, MEMORIES[:3], DIMS, np.random.default_rng(2))
    send(redis_server.client(), PREFIX, PARTITIONS, batch)
    before = quantized.path()
    try:
        burst(redis_url, tmp_path, path, scan=scan)
        assert quantized.path() == scan
    finally:
        quantized.set_path(before)
    out = outputs(redis_server.client(), PREFIX, PARTITIONS)
    expected = library_answers(Engine(load_model(path)), batch)
    assert len(out) == len(expected) > 100
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])


def overflowing_x(model_file):
    """An x that passes the input checks but whose I(x) overflows float32."""
    engine = Engine(load_model(model_file))
    for scale in (1e17, 1e18, 3e18, 6e18, 1e19):
        x = np.zeros(CONFIG.input_dim, np.float32)
        x[:2] = scale
        try:
            event = engine.write(x)
        except Exception:
            continue
        if engine.process([(engine.new_memory(), event)])[0] is not None:
            return x.tolist()
    raise AssertionError("no overflowing input found")


def invalid_messages(model_file):
    m = "mem-0"
    vector = np.ones(CONFIG.input_dim, "<f4").tobytes()
    return [
        (m, b"\xc1"),
        (m, pack([1, 2, 3])),
        (m, pack({"op": "erase", "memory": m, "id": "e1"})),
        (m, pack({"op": "write", "memory": m, "x": [1.0, 2.0]})),
        (m, pack({"op": "write", "memory": m, "x": [float("nan")] * 8})),
        (m, pack({"op": "query", "memory": m, "x": [1.0] * 8})),
        (m, pack({"op": "query", "memory": m, "id": "e2"})),
        (m, pack({"op": "query", "memory": m, "id": "e3", "x": vector, "q": vector})),
        (m, pack({"op": "query", "memory": m, "id": "e4", "q": [1.0] * 3})),
        (m, pack({"op": "write", "memory": "", "x": vector})),
        (m, pack({"op": "write", "memory": "m" * 300, "x": vector})),
        (m, pack({"op": "write", "memory": m, "x": vector, "pad": "z" * 2000})),
        (m, pack({"op": "query", "memory": m, "id": "e5", "x": overflowing_x(model_file)})),
    ]


def test_each_invalid_input_is_dead_lettered_and_the_worker_keeps_serving(
    redis_url, tmp_path, model_file, redis_server
):
    r = redis_server.client()
    rng = np.random.default_rng(2)
    good = events(120, MEMORIES, DIMS, rng)
    bad = invalid_messages(model_file)
    # a message for a memory that lives elsewhere, pushed into mem-0's partition
    stray = next(
        n
        for n in (f"x{i}" for i in range(99))
        if partition_of(n, PARTITIONS) != partition_of("mem-0", PARTITIONS)
    )
    mixed = good[:60] + bad + good[60:]
    ids = send(r, PREFIX, PARTITIONS, mixed)
    home = Keys(PREFIX).inp(partition_of("mem-0", PARTITIONS))
    stray_id = r.xadd(
        home, {"msg": pack({"op": "write", "memory": stray, "x": [0.0] * 8})}
    ).decode()
    no_field = r.xadd(home, {"other": b"1"}).decode()
    burst(redis_url, tmp_path, model_file, max_message_bytes=1000)

    dead = outputs(r, PREFIX, PARTITIONS, "dead")
    bad_ids = set(ids[60 : 60 + len(bad)]) | {stray_id, no_field}
    assert {entry for entry, _ in dead} == bad_ids
    for entry, letter in dead:
        assert letter["entry"] == entry and letter["error"]
    reasons = {letter["entry"]: letter["error"] for _, letter in dead}
    assert "routes to partition" in reasons[stray_id]
    assert "no 'msg' field" in reasons[no_field]
    assert "over the limit of 1000" in reasons[ids[60 + 11]]
    assert "non-finite values in memory space" in reasons[ids[60 + 12]]
    # error responses for the bad ones that carried a string id
    out = dict((m["id"], m) for _, m in outputs(r, PREFIX, PARTITIONS))
    for qid in ("e1", "e2", "e3", "e4", "e5"):
        assert "error" in out[qid] and out[qid]["memory"] == "mem-0"
    # the good events were answered as if the bad ones never existed
    expected = library_answers(Engine(load_model(model_file)), good)
    for qid, answer in expected.items():
        assert_same_answer(out[qid], answer)


def test_memory_survives_a_restart_and_the_input_is_trimmed(
    redis_url, tmp_path, model_file, redis_server
):
    r = redis_server.client()
    batch = events(400, MEMORIES, DIMS, np.random.default_rng(3))
    send(r, PREFIX, PARTITIONS, batch[:200])
    burst(redis_url, tmp_path, model_file)  # snapshots on exit
    send(r, PREFIX, PARTITIONS, batch[200:])
    burst(redis_url, tmp_path, model_file)
    send(r, PREFIX, PARTITIONS, batch[:0])
    expected = library_answers(Engine(load_model(model_file)), batch)
    out = outputs(r, PREFIX, PARTITIONS)
    assert len(out) == len(expected)
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])
    # two snapshots per partition are kept; the input below the older one is gone
    trimmed = sum(r.xlen(Keys(PREFIX).inp(p)) < 200 // PARTITIONS for p in range(PARTITIONS))
    prefix = model_prefix(0, load_model(model_file).fingerprint)
    kept = SnapshotStore(tmp_path / "snap", None, keep=2, prefix=prefix).positions()
    assert trimmed >= 1 and len(kept) == 2


def test_a_read_that_missed_its_script_is_sent_again_alone(
    redis_url, tmp_path, model_file, redis_server, monkeypatch
):
    """A read of one partition that did not find its script (one node of a cluster lost
    its scripts, or a SCRIPT FLUSH landed between two calls of a pipeline) is sent again
    alone: the reads of the pipeline that ran took their entries from the group, and read
    again with ">" they would skip them. Every query is answered once, as the library does."""
    r = redis_server.client()
    batch = events(300, MEMORIES, DIMS, np.random.default_rng(5))
    send(r, PREFIX, PARTITIONS, batch)
    real, reads = streams._evalsha, []

    def evalsha(pipe, script, keys, args):
        if script.script == READ:
            reads.append(keys[1])
            if len(reads) in (4, 12, 13):  # (the first read pipelines: 8 calls each)
                pipe.evalsha("0" * 40, len(keys), *keys, *args)  # a script Redis lacks
                return
        real(pipe, script, keys, args)

    monkeypatch.setattr(streams, "_evalsha", evalsha)
    r.config_resetstat()
    Worker(settings(redis_url, tmp_path, model_file), Engine(load_model(model_file))).run(
        burst=True
    )
    assert r.info("commandstats")["cmdstat_evalsha"]["failed_calls"] == 3
    assert reads[8] == reads[3] and reads[17] == reads[11] and reads[18] == reads[12]
    expected = library_answers(Engine(load_model(model_file)), batch)
    out = outputs(r, PREFIX, PARTITIONS)
    assert sorted(resp["id"] for _, resp in out) == sorted(expected)
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])
    keys = Keys(PREFIX)
    assert all(r.xpending(keys.inp(p), "memnet")["pending"] == 0 for p in range(PARTITIONS))


def test_a_step_sends_no_script_checks_and_reloads_scripts_redis_lost(
    redis_url, tmp_path, model_file, redis_server
):
    """Reads and commits go by sha alone (redis-py would add a SCRIPT EXISTS round trip
    before every pipeline that calls a Script); scripts Redis lost mid-run (SCRIPT FLUSH, as
    after a restart) are loaded again and nothing is lost or answered twice."""
    r = redis_server.client()
    batch = events(300, MEMORIES, DIMS, np.random.default_rng(4))
    send(r, PREFIX, PARTITIONS, batch)
    steps = []

    class Flushing(Worker):
        def process(self, work):
            super().process(work)
            steps.append(len(work))
            if len(steps) in (2, 5):
                r.script_flush()

    r.config_resetstat()
    s = settings(redis_url, tmp_path, model_file)
    Flushing(s, Engine(load_model(model_file))).run(burst=True)
    stats = r.info("commandstats")
    assert len(steps) > 5
    assert "cmdstat_script|exists" not in stats
    assert stats["cmdstat_script|load"]["calls"] >= 3 * 9  # every script, after each flush
    expected = library_answers(Engine(load_model(model_file)), batch)
    out = outputs(r, PREFIX, PARTITIONS)
    assert sorted(resp["id"] for _, resp in out) == sorted(expected)
    for _, response in out:
        assert_same_answer(response, expected[response["id"]])


def test_a_worker_configured_with_another_partition_count_refuses(
    redis_url, tmp_path, model_file, monkeypatch, capsys, redis_server
):
    redis_server.client().hset("t:meta", mapping={"partitions": 4, "protocol": 1})
    for key, value in {
        "REDIS_URL": redis_url,
        "MEMNET_MODEL": str(model_file),
        "MEMNET_PREFIX": "t",
        "MEMNET_PARTITIONS": "6",
        "MEMNET_SNAPSHOT_DIR": str(tmp_path),
    }.items():
        monkeypatch.setenv(key, value)
    assert cli(["worker", "--burst"]) == 2
    err = capsys.readouterr().err
    assert "MEMNET_PARTITIONS is 6" in err and "has 4 partitions" in err


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MEMNET_PARTITIONS": "many"}, "MEMNET_PARTITIONS must be a number (at least 1), got"),
        ({"MEMNET_BATCH_SIZE": "0"}, "MEMNET_BATCH_SIZE is out of range (at least 1)"),
        ({"MEMNET_ARCHIVE": "2"}, "MEMNET_ARCHIVE is out of range (0 or 1): '2'"),
        ({"MEMNET_METRICS_PORT": "70000"}, "out of range (0 to 65535)"),
        ({"MEMNET_LEASE_MS": "0"}, "MEMNET_LEASE_MS is out of range (at least 300): '0'"),
        ({"MEMNET_SNAPSHOTS_KEPT": "0"}, "out of range (at least 2)"),
        ({"MEMNET_GC_THRESHOLD": "-1"}, "out of range (at least 1)"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL must start with redis://"),
        ({"MEMNET_MODEL": ""}, "MEMNET_MODEL is not set"),
        ({"MEMNET_MODEL": "/nonexistent/model.safetensors"}, "no such model file"),
        ({"MEMNET_SCAN": "gpu"}, "MEMNET_SCAN must be one of"),
    ],
)
def test_bad_settings_stop_start_up_naming_the_setting(
    env, message, monkeypatch, capsys, redis_url, tmp_path
):
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("MEMNET_SNAPSHOT_DIR", str(tmp_path))
    monkeypatch.delenv("MEMNET_MODEL", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert cli(["worker"]) == 2
    assert message in capsys.readouterr().err


def test_out_stream_ids_reject_a_replayed_publish(redis_server):
    r = redis_server.client()
    r.xadd("probe", {"msg": b"1"}, id="5-1")
    with pytest.raises(Exception, match="equal or smaller"):
        r.xadd("probe", {"msg": b"1"}, id="5-1")
    assert len(stream(r, "probe")) == 1


def test_a_stop_requested_during_start_up_is_not_lost(
    redis_url, redis_server, tmp_path, model_file
):
    """SIGTERM during start-up raises SystemExit, which Python can swallow (inside a JAX
    garbage-collector callback, seen in the chaos suite): serve() then stops the worker as
    soon as it exists, before it takes any partition."""
    from worker.worker import serve

    stopped = threading.Event()
    stopped.set()
    serve(worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS), stopped=stopped)
    assert not any(r for r in redis_server.client().keys(f"{PREFIX}:*lease*"))


@pytest.mark.parametrize("server", ["redis-server", "fakeredis (the embedded demo's)"])
def test_a_commit_publishes_any_bytes_acks_every_entry_and_checks_its_counts(
    server, redis_url, rng
):
    """The commit script takes a batch's outputs as lengths and one concatenation and its
    acks as one string: messages of any bytes (empty, spaces, NUL, digits) arrive exactly,
    more than one XACK's worth of ids is acked, a commit sent again (its reply lost) lands
    once, and counts that do not match the outputs are refused before anything is
    published."""
    import fakeredis
    import redis

    from worker.partition import Batch
    from worker.scripts import Scripts
    from worker.streams import StreamIO

    Part = dataclasses.make_dataclass("Part", ["number", "epoch", "committed"], frozen=True)
    client = redis.Redis.from_url(redis_url) if server == "redis-server" else fakeredis.FakeRedis()
    keys = Keys("t")
    client.set(keys.part(0, "epoch"), 3)
    client.set(keys.part(0, "taker"), "w")
    ids = [client.xadd(keys.inp(0), {"msg": b"x"}).decode() for _ in range(1203)]
    client.xgroup_create(keys.inp(0), "memnet", id="0")
    client.xreadgroup("memnet", "w", {keys.inp(0): ">"})
    io = StreamIO(client, Scripts(client), keys, "w", 2000, 0)
    bodies = [b"", b" 12 7 ", b"\x00\xff", *(rng.bytes(int(n)) for n in rng.integers(0, 300, 60))]
    batch = Batch(last_id=ids[-1], acks=ids)
    batch.responses = [(ids[2 * j], body) for j, body in enumerate(bodies[:40])]
    batch.dead = [(ids[2 * j + 1], body) for j, body in enumerate(bodies[40:])]
    part = Part(number=0, epoch=3, committed=None)
    assert io.commit({part: batch}) == {part: None}
    assert io.commit({part: batch}) == {part: None}  # sent again: every XADD a duplicate
    for key, want in ((keys.out(0), batch.responses), (keys.dead(0), batch.dead)):
        assert [(i.decode(), f[b"msg"]) for i, f in client.xrange(key)] == want
    assert client.xpending(keys.inp(0), "memnet")["pending"] == 0
    assert client.get(keys.part(0, "offset")).decode() == ids[-1]
    refused = [3, ids[-1], 0, 2, 0, ids[-1], f"{ids[0]} 1", b"m", "", "w"]  # 2 announced, 1 sent
    epoch_in_out_dead = [keys.part(0, "epoch"), keys.inp(0), keys.out(0), keys.dead(0)]
    with pytest.raises(redis.ResponseError, match="do not match"):
        io.scripts.commit(
            keys=[*epoch_in_out_dead, keys.part(0, "offset"), keys.part(0, "taker")], args=refused
        )
    assert client.xlen(keys.out(0)) == 40
