"""Fixtures for state beyond one machine (issue 13): an S3 stand-in and simulated hosts.

A pytest plugin, loaded by conftest.py (`pytest_plugins = ["tests.fixtures_s3"]`)."""

from __future__ import annotations

import pytest

from worker.servers import Hosts, RedisServer, S3Server, netns_available


@pytest.fixture(scope="session")
def s3_service():
    """moto's S3 for the session (0.3 s to start, most of it importing moto; 0.5 s to stop).
    Bound to 0.0.0.0 so that simulated hosts reach it at `env(host.server_ip)`."""
    pytest.importorskip("moto.server", reason="moto[server] (a dev dependency) is not installed")
    with S3Server(ip_address="0.0.0.0") as server:
        yield server


@pytest.fixture
def s3_server(s3_service):
    """The session's S3 with a fresh, empty bucket for this test (a few ms)."""
    return s3_service.with_new_bucket()


@pytest.fixture
def hosts_redis(tmp_path):
    """A real, empty Redis the simulated hosts reach at `hosts_redis.url_at(host.server_ip)`
    (bound to 0.0.0.0, protected mode off); `hosts_redis.url` works from this process."""
    server = RedisServer(tmp_path / "hosts-redis", bind="0.0.0.0")
    yield server
    server.stop()


@pytest.fixture
def hosts(tmp_path):
    """`hosts(n)` makes n simulated hosts (network namespaces on one private subnet, each with
    its own directory under tmp_path); all are killed and removed after the test. Skips where
    namespaces cannot be made (not Linux, not root, no `ip`)."""
    if reason := netns_available():
        pytest.skip(f"simulated hosts unavailable: {reason}")
    made: list[Hosts] = []

    def make(n: int = 2) -> Hosts:
        group = Hosts(tmp_path / f"hosts{len(made)}")
        made.append(group)
        for _ in range(n):
            group.add()
        return group

    yield make
    for group in made:
        group.close()
