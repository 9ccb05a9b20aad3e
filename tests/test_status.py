"""What operators see: dead letters (``memnet dead``), ``memnet status`` and its --check,
and a worker's /healthz and /metrics."""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from memnet import Engine, load_model
from tests.streams import send, worker_settings
from worker import dead, health, status
from worker.faults import Throttled
from worker.local import owners
from worker.protocol import Keys, dead_letter, pack, partition_of
from worker.worker import Worker

PREFIX = "ts"
PARTITIONS = 4
KEYS = Keys(PREFIX)


def settings(redis_url, tmp_path, model_file, **overrides):
    return worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS, **overrides)


def burst(s, model_file):
    Worker(s, Engine(load_model(model_file))).run(burst=True)


def redis_ms(client):
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_operator_modules_are_light_to_import():
    """The CLI imports worker.status to register its commands: no JAX, redis or numpy."""
    code = (
        "import sys, worker.dead, worker.status; heavy = {'jax', 'redis', 'numpy'}; "
        "print(sorted(heavy & set(sys.modules))); import worker.health; print('jax' in sys.modules)"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert found.stdout.split("\n")[:2] == ["[]", "False"], found.stderr


def test_commands_register_on_the_cli():
    parser = argparse.ArgumentParser()
    status.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["dead", "--partition", "1", "--partition", "2", "-f", "--json"])
    assert (args.run, args.partition, args.follow, args.json, args.count) == (
        dead.cmd_dead,
        [1, 2],
        True,
        True,
        20,
    )
    args = parser.parse_args(["status", "--check", "--max-lag", "5"])
    assert (args.run, args.check, args.max_lag, args.json) == (status.cmd_status, True, 5, False)


def test_dead_letters_and_status_show_bad_input_live_workers_and_snapshots(
    redis_url, tmp_path, model_file, redis_server
):
    r = redis_server.client()
    good = {"op": "write", "memory": "mem-1", "x": [0.5] * 8}
    bad = [
        {"op": "write", "memory": "mem-0", "x": [1.0, 2.0]},  # wrong length
        {"op": "query", "memory": "mem-1", "id": "q1", "text": 3},
        ("mem-2", b"\xc1"),  # not msgpack: no memory to show
    ]
    ids = send(r, PREFIX, PARTITIONS, [good, *bad, good])
    s = settings(redis_url, tmp_path, model_file)
    burst(s, model_file)

    out, err = io.StringIO(), io.StringIO()
    assert dead.show(s, as_json=True, out=out, err=err) == 0
    # entry ids are per stream: two partitions may hold the same one
    letters = {
        (d["partition"], d["entry"]): d for d in map(json.loads, out.getvalue().splitlines())
    }
    wrong_length, text_query, not_msgpack = (
        (partition_of(m, PARTITIONS), entry)
        for m, entry in zip(["mem-0", "mem-1", "mem-2"], ids[1:4], strict=True)
    )
    assert set(letters) == {wrong_length, text_query, not_msgpack}
    wrong_length = letters[wrong_length]
    assert (wrong_length["memory"], wrong_length["op"]) == ("mem-0", "write")
    assert "8" in wrong_length["error"] and "2" in wrong_length["error"]
    assert (letters[text_query]["memory"], letters[text_query]["id"]) == ("mem-1", "q1")
    assert "'text' must be a string" in letters[text_query]["error"]
    assert letters[not_msgpack]["memory"] is None
    assert "not valid msgpack" in letters[not_msgpack]["error"]

    out = io.StringIO()
    p0 = partition_of("mem-0", PARTITIONS)
    assert dead.show(s, [p0], count=5, out=out, err=err) == 0
    line = out.getvalue().strip()
    assert line.startswith(f"{ids[1]}  p{p0}  write  mem-0  ") and wrong_length["error"] in line

    # status: only live members of the workers set, dead-letter counts, the snapshot dir
    now = redis_ms(r)
    r.zadd(KEYS.workers, {"gone-w": now - 60_000, "live-w": now + 60_000})
    r.set(KEYS.part(p0, "lease"), "gone-w")
    got = status.gather(s)
    assert got["workers"] == ["live-w"] and got["expired_workers"] == ["gone-w"]
    per_partition = {p: 0 for p in range(PARTITIONS)}
    for letter in letters.values():
        per_partition[letter["partition"]] += 1
    assert {row["partition"]: row["dead"] for row in got["rows"]} == per_partition
    assert got["model"] == load_model(model_file).fingerprint
    assert got["dims"] == {"input_dim": 8, "memory_dim": 8, "output_dim": 3}
    assert got["snapshot_store"] == str(tmp_path / "snap") and got["snapshot_store_found"]
    assert got["rows"][p0]["snapshot"]["position"] == ids[3]  # the last entry of p0

    out = io.StringIO()
    assert status.print_status(s, out=out) == 0
    text = out.getvalue()
    assert "1 live worker: live-w (1 expired member of the set not shown)" in text
    assert f"model {got['model'][:12]}" in text and "input_dim 8" in text
    assert f"snapshots read from {tmp_path / 'snap'}" in text
    assert "gone-w (not live)" in text
    header, *rows = text.splitlines()[3:]
    assert header.split()[-3:] == ["dead", "last", "snapshot"]
    end = header.index("dead") + len("dead")  # right-aligned under its header
    assert [int(row[:end].split()[-1]) for row in rows] == list(per_partition.values())

    out = io.StringIO()
    assert status.check(s, out=out) == 1
    assert f"partition {p0}: no live owner (lease held by gone-w, not alive)" in out.getvalue()

    # run elsewhere, the snapshot directory is not there: said so, not silently empty
    elsewhere = settings(redis_url, tmp_path / "elsewhere", model_file)
    out = io.StringIO()
    assert status.print_status(elsewhere, out=out) == 0
    assert f"{tmp_path / 'elsewhere' / 'snap'} does not exist here" in out.getvalue()
    assert all(row.rstrip().endswith("-") for row in out.getvalue().splitlines()[4:])


def test_follow_prints_dead_letters_as_they_come(redis_url, tmp_path, model_file, redis_server):
    r = redis_server.client()
    r.hset(KEYS.meta, mapping={"partitions": PARTITIONS, "protocol": 1})
    old = r.xadd(KEYS.dead(1), {"msg": dead_letter("1-1", "old news", None)}).decode()
    raw = pack({"op": "write", "memory": "m1", "x": []})
    calls = []

    def stop():  # the first check adds a dead letter, the second ends the command
        calls.append(1)
        if len(calls) == 1:
            r.xadd(KEYS.dead(3), {"msg": dead_letter("9-9", "'x' is empty", raw)}, id="9-9")
        return len(calls) > 1

    out = io.StringIO()
    s = settings(redis_url, tmp_path, model_file)
    assert dead.show(s, follow_new=True, as_json=True, out=out, block_ms=50, stop=stop) == 0
    shown = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(d["entry"], d["partition"], d["error"]) for d in shown] == [
        (old, 1, "old news"),
        ("9-9", 3, "'x' is empty"),
    ]
    assert (shown[1]["memory"], shown[1]["raw_bytes"]) == ("m1", len(raw))
    # a partition out of range is refused; junk in a dead stream is shown as unreadable
    err = io.StringIO()
    assert dead.show(s, [7], out=io.StringIO(), err=err) == 2 and "no partition 7" in err.getvalue()
    r.xadd(KEYS.dead(0), {"msg": b"\xc1"})
    out = io.StringIO()
    dead.show(s, [0], out=out)
    assert dead.UNREADABLE in out.getvalue()


def test_an_empty_redis_says_so_in_one_line(redis_url, tmp_path, model_file):
    s = settings(redis_url, tmp_path, model_file)
    line = f"no deployment under prefix {PREFIX} at {redis_url} (no worker has run)\n"
    for run in (lambda out: status.print_status(s, out=out), lambda out: status.check(s, out=out)):
        out = io.StringIO()
        assert run(out) == 1
        assert out.getvalue() == line
    out = io.StringIO()
    assert status.print_status(s, as_json=True, out=out) == 1
    assert json.loads(out.getvalue())["deployment"] is False
    out, err = io.StringIO(), io.StringIO()
    assert dead.show(s, out=out, err=err) == 0
    assert out.getvalue() == "" and "no dead letters" in err.getvalue()


def test_check_passes_while_a_live_worker_owns_every_partition(
    redis_url, tmp_path, model_file, redis_server
):
    r = redis_server.client()
    s = settings(redis_url, tmp_path, model_file, worker_id="w-live")
    worker = Worker(s, Engine(load_model(model_file)))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while owners(r, PREFIX, PARTITIONS) != ["w-live"] * PARTITIONS:
            assert time.monotonic() < deadline, owners(r, PREFIX, PARTITIONS)
            time.sleep(0.05)
        out = io.StringIO()
        assert status.check(s, out=out) == 0, out.getvalue()
        assert out.getvalue().startswith("ok: 4 partitions, each owned by a live worker (1 live)")
        out = io.StringIO()
        assert status.check(s, as_json=True, out=out) == 0
        assert json.loads(out.getvalue()) == {"ok": True, "problems": [], "max_lag": 10000}
    finally:
        worker.request_stop()
        thread.join(30)
    assert not thread.is_alive()

    out = io.StringIO()
    assert status.check(s, out=out) == 1  # it released its leases and left
    assert "partition 0: no live owner (no lease)" in out.getvalue()
    # a lease whose holder is gone (e.g. SIGKILLed, its lease not yet expired); a backlog
    for p in range(PARTITIONS):
        r.set(KEYS.part(p, "lease"), "w-dead", px=60_000)
    ids = [r.xadd(KEYS.inp(2), {"msg": b"x"}).decode() for _ in range(3)]
    out = io.StringIO()
    assert status.check(s, max_lag=2, out=out) == 1
    found = out.getvalue().splitlines()
    assert found[0] == f"no live workers under prefix {PREFIX}"
    assert "partition 3: no live owner (lease held by w-dead, not alive)" in found
    assert "partition 2: lag 3 > 2" in found
    # a lag Redis cannot count: bounded by the stream's length
    r.xgroup_destroy(KEYS.inp(2), "memnet")
    r.xgroup_create(KEYS.inp(2), "memnet", id=ids[1])
    row = status.gather(s, snapshots=False)["rows"][2]
    assert row["lag"] is None and "cannot count" in row["lag_note"]
    lags = [p for p in status.problems(status.gather(s), max_lag=2) if "lag" in p]
    assert len(lags) == 1 and lags[0].startswith("partition 2: lag unknown (Redis cannot count")
    assert not [p for p in status.problems(status.gather(s), max_lag=100) if "lag" in p]
    # delivered and never committed (a worker stuck on it): the lag does not show it
    r.xreadgroup("memnet", "w-stuck", {KEYS.inp(2): ">"}, count=1)
    got = status.gather(s, snapshots=False)
    row = got["rows"][2]
    assert row["pending"] == 1 and row["oldest_pending"] == ids[2]
    assert not [p for p in status.problems(got, max_lag=100) if "not committed" in p]
    got["stall_s"] = row["oldest_pending_s"] - 1  # (30 s in service: as if it had passed)
    assert [p for p in status.problems(got, max_lag=100) if "not committed" in p] == [
        f"partition 2: entry {ids[2]} delivered {row['oldest_pending_s']} s ago and not "
        f"committed (over {got['stall_s']:.0f} s: its worker is stuck on it?)"
    ]


def get(port, path):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_healthz_follows_the_loop_and_metrics_are_served(caplog):
    progress = [time.monotonic()]
    caplog.set_level(logging.INFO, "worker.health")
    server, port = health.start("127.0.0.1", 0, lambda: progress[0], within_s=2.0)
    try:
        assert f"metrics and health on http://127.0.0.1:{port} (/metrics, /healthz)" in caplog.text
        assert get(port, "/healthz") == (200, "ok\n")
        progress[0] = time.monotonic() - 5
        code, body = get(port, "/healthz")
        assert code == 503 and body.startswith("worker loop stalled: last pass 5.")
        assert body.endswith("(limit 2 s, after which its leases are not renewed)\n")
        progress[0] = None
        assert get(port, "/healthz")[0] == 503
        code, body = get(port, "/metrics")
        assert code == 200 and "memnet_dead_letters_total" in body
        assert get(port, "/other")[0] == 404
        with pytest.raises(OSError, match=f"cannot serve metrics and health on 127.0.0.1:{port}"):
            health.start("127.0.0.1", port, lambda: 0.0, 1.0)
    finally:
        server.shutdown()
        server.server_close()


def test_dead_letters_are_logged_at_warning_once_a_minute_at_most(caplog):
    throttled = Throttled(logging.getLogger("test.dead"))
    raw = pack({"op": "write", "memory": "mem-0", "x": [1.0]})
    batch = [("5-0", dead_letter("5-0", "'x' has 1 values, expected 8", raw)), ("5-1", b"?")]
    with caplog.at_level(logging.WARNING, "test.dead"):
        dead.log_dead_letters(throttled, 3, batch)
        dead.log_dead_letters(throttled, 1, batch[:1])
        dead.log_dead_letters(throttled, 1, [])
    assert [r.getMessage() for r in caplog.records] == [
        "partition 3: 2 input entries dead-lettered; the first, 5-0 (memory mem-0): "
        "'x' has 1 values, expected 8 (`memnet dead --partition 3` lists them)"
    ]


def test_lines_held_back_are_told_within_their_period_without_a_new_one(caplog):
    """(The count of dead letters held back was told only with a later dead letter: after
    a burst and then none, never.)"""
    throttled = Throttled(logging.getLogger("test.held"), every_s=0.2)
    with caplog.at_level(logging.WARNING, "test.held"):
        throttled.log("k", logging.WARNING, "partition %d: %d dead", 0, 1)
        throttled.log("k", logging.WARNING, "partition %d: %d dead", 1, 3)
        throttled.log("k", logging.WARNING, "partition %d: %d dead", 2, 2)
        throttled.flush()  # (within the period: nothing yet)
        time.sleep(0.25)
        throttled.flush()
        throttled.flush()  # (told once)
    assert [r.getMessage() for r in caplog.records] == [
        "partition 0: 1 dead",
        "partition 2: 2 dead (2 lines like this held back in the last minute; the latest)",
    ]
