"""The test infrastructure for state beyond one machine works for real: moto's S3 through
obstore, and simulated hosts (network namespaces) reaching servers in the root namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from worker.servers import RedisServer, S3Server

obstore = pytest.importorskip("obstore")
from obstore.exceptions import AlreadyExistsError  # noqa: E402
from obstore.store import from_url  # noqa: E402


def in_host(host, code: str, env: dict[str, str] | None = None, **kwargs):
    """Run Python `code` inside `host`; its stdout as JSON."""
    done = host.run([sys.executable, "-c", code], env={**os.environ, **(env or {})}, **kwargs)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_s3_server_through_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    store = from_url(s3_server.url("snapshots"))
    obstore.put(store, "a/1.bin", b"one")
    obstore.put(store, "a/2.bin", b"two")

    assert bytes(obstore.get(store, "a/1.bin").bytes()) == b"one"
    listed = sorted(m["path"] for m in obstore.list(store, prefix="a").collect())
    assert listed == ["a/1.bin", "a/2.bin"]
    whole = from_url(s3_server.url())  # the prefix really is a prefix in the bucket
    assert sorted(m["path"] for m in obstore.list(whole).collect()) == [
        "snapshots/a/1.bin",
        "snapshots/a/2.bin",
    ]
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "a/1.bin", b"other", mode="create")
    assert bytes(obstore.get(store, "a/1.bin").bytes()) == b"one"


def test_every_s3_server_gets_its_own_bucket(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    obstore.put(from_url(s3_server.url()), "mine", b"1")
    fresh = s3_server.with_new_bucket()
    assert fresh.bucket != s3_server.bucket
    assert obstore.list(from_url(fresh.url())).collect() == []
    fresh.stop()  # a copy's stop leaves the server up
    assert bytes(obstore.get(from_url(s3_server.url()), "mine").bytes()) == b"1"

    with S3Server() as other:  # a second server: another port, its own bucket
        assert (other.port, other.bucket) != (s3_server.port, s3_server.bucket)


REACH = """
import json, os, redis, obstore
from obstore.store import from_url
r = redis.Redis.from_url(os.environ["REDIS_URL"])
store = from_url(os.environ["S3_URL"])
print(json.dumps({
    "ping": r.ping(),
    "addr": r.client_info()["addr"],
    "object": bytes(obstore.get(store, "from-root").bytes()).decode(),
}))
"""


def test_hosts_reach_redis_and_s3_over_the_veth_network(hosts, hosts_redis, s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    store = from_url(s3_server.url())
    obstore.put(store, "from-root", b"hello")
    group = hosts(2)
    assert len({h.ip for h in group}) == 2
    for host in group:
        env = {
            **s3_server.env(host.server_ip),
            "REDIS_URL": hosts_redis.url_at(host.server_ip),
            "S3_URL": s3_server.url(),
        }
        seen = in_host(host, REACH, env)
        assert seen["ping"] is True
        assert seen["addr"].split(":")[0] == host.ip  # Redis saw it come over the veth
        assert seen["object"] == "hello"


def test_a_loopback_only_server_is_out_of_reach(hosts, tmp_path):
    """A host's 127.0.0.1 is its own: the root namespace's loopback servers are not there."""
    server = RedisServer(tmp_path / "loopback-redis")
    try:
        (host,) = hosts(1)
        code = (
            "import json, socket\n"
            "try:\n"
            f"    socket.create_connection(('127.0.0.1', {server.port}), timeout=2).close()\n"
            "    print(json.dumps('reached'))\n"
            "except ConnectionRefusedError:\n"
            "    print(json.dumps('refused'))\n"
        )
        assert in_host(host, code) == "refused"
        assert server.client().ping()
    finally:
        server.stop()


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_kill_all_kills_one_host_only(hosts):
    first, second = hosts(2)
    # A shell with a background child: kill_all must reach the whole tree, not just our pid.
    procs = [h.popen(["sh", "-c", "sleep 300 & exec sleep 300"]) for h in (first, second)]
    try:
        for host in (first, second):
            wait_for(lambda h=host: len(h.pids()) == 2)
        assert first.kill_all() == 2

        assert procs[0].wait(timeout=10) == -9
        assert first.pids() == []
        assert procs[1].poll() is None
        assert len(second.pids()) == 2
    finally:
        second.kill_all()
        for proc in procs:
            proc.wait(timeout=10)


WRITE_HERE = """
import json, os, pathlib
pathlib.Path("marker").write_text(os.environ["WHO"])
print(json.dumps({"cwd": os.getcwd(), "files": sorted(os.listdir("."))}))
"""


def test_hosts_have_their_own_working_directories(hosts, tmp_path):
    group = hosts(2)
    seen = [in_host(h, WRITE_HERE, {"WHO": h.name}) for h in group]

    assert seen[0]["cwd"] != seen[1]["cwd"]
    for host, result in zip(group, seen, strict=True):
        assert result["cwd"] == str(host.workdir)
        assert host.workdir.is_relative_to(tmp_path)
        assert result["files"] == ["marker"]  # nothing of the other host's
        assert (host.workdir / "marker").read_text() == host.name
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert in_host(group[0], WRITE_HERE, {"WHO": "x"}, cwd=elsewhere)["cwd"] == str(elsewhere)


def ip_json(*args: str) -> list[dict]:
    done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(done.stdout or "[]")


def test_close_removes_namespaces_veths_and_bridge(hosts):
    group = hosts(2)
    proc = group[0].popen(["sleep", "300"])
    names = {h.name for h in group}
    links_before = {link["ifname"] for link in ip_json("link")}
    assert group.bridge in links_before

    group.close()

    assert proc.wait(timeout=10) == -9
    assert not names & {ns["name"] for ns in ip_json("netns", "list")}
    leftovers = {link["ifname"] for link in ip_json("link")}
    assert not {name for name in leftovers if name.startswith(group.bridge)}
