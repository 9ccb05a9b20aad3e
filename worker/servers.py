"""Real servers on this machine, for the demo, eval-babi, the scripts and the tests:
redis-server processes, an S3 stand-in (moto, a dev-only dependency) and simulated hosts
(network namespaces, Linux and root only). Only the standard library and redis-py: no JAX,
no memnet."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import ipaddress
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import redis

_LOOPBACK = ("127.0.0.1", "::1", "-::1")


def free_port(below: int = 65536) -> int:
    """A free TCP port (cluster nodes need one below 55536: their bus port is +10000)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port < below:
            return port


def _local_address(bind: str) -> str:
    """The address a client on this machine reaches a server bound to `bind` at."""
    first = bind.split()[0].lstrip("-")
    wildcard = {"0.0.0.0", "*", "::", "::*"}  # noqa: S104 (recognised, not bound)
    return "127.0.0.1" if first in wildcard or "127.0.0.1" in bind.split() else first


class RedisServer:
    """One redis-server on a free port, in its own directory.

    `bind` is redis-server's list of addresses (space-separated). Bound beyond loopback
    (`"0.0.0.0"`, or a `Hosts.server_ip`) it also runs with protected mode off, or the
    simulated hosts would get DENIED: it has no password, so keep it to test networks."""

    def __init__(
        self, workdir: Path, *extra: str, port: int | None = None, bind: str = "127.0.0.1"
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed: a real Redis is needed here")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.bind = bind
        self.host = _local_address(bind)
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        return self.url_at(self.host)

    def url_at(self, address: str) -> str:
        """The URL at another of its addresses, e.g. a `Host.server_ip`."""
        return f"redis://{address}:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                self.bind,
                *self._protected_mode(),
                "--dir",
                str(self.workdir),
                "--save",
                "",
                "--appendonly",
                "no",
                *self.extra,
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.wait_ready()

    def _protected_mode(self) -> list[str]:
        loopback_only = all(a in _LOOPBACK for a in self.bind.split())
        return [] if loopback_only else ["--protected-mode", "no"]

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                redis.Redis(host=self.host, port=self.port, socket_timeout=1).ping()
                return
            except redis.AuthenticationError:
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on {self.port} did not start; see "
                        f"{self.workdir / 'redis.log'}"
                    ) from None
                time.sleep(0.02)

    def stop(self, kill: bool = False) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill() if kill else self.proc.terminate()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(host=self.host, port=self.port)


class RedisCluster:
    """A local 3-master Redis Cluster (no replicas), as `redis-cli --cluster create` makes."""

    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.nodes = [
            RedisServer(
                workdir / f"node{i}",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                port=free_port(55000),
            )
            for i in range(masters)
        ]
        subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *[f"127.0.0.1:{n.port}" for n in self.nodes],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.wait_ok()

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            states = [n.client().cluster("info").get("cluster_state") for n in self.nodes]
            if all(s == "ok" for s in states):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not become ok: {states}")
            time.sleep(0.1)

    def client(self):
        from redis.cluster import RedisCluster as Client

        return Client.from_url(self.url)

    def stop(self) -> None:
        for n in self.nodes:
            n.stop()


def _check_bindable(address: str, port: int) -> None:
    """Fail now rather than hang: ThreadedMotoServer.start waits forever when its bind fails."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))


class S3Server:
    """moto's S3 server on a free port, in a thread of this process, with one empty bucket.

    moto keeps its state per process: every S3Server here sees every bucket, so each gets a
    fresh name. Clients find it through `env()` (standard AWS variables). Bound to 0.0.0.0 it
    is reachable from simulated hosts at `endpoint_at(host.server_ip)`."""

    def __init__(
        self,
        bucket: str | None = None,
        *,
        ip_address: str = "127.0.0.1",
        port: int | None = None,
        region: str = "us-east-1",
    ) -> None:
        from moto.server import ThreadedMotoServer  # dev-only dependency

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request
        self.port = port or free_port()
        self.bucket = bucket or f"memnet-{secrets.token_hex(4)}"
        self.region = region
        self.host = _local_address(ip_address)
        _check_bindable(ip_address, self.port)
        self._server = ThreadedMotoServer(ip_address=ip_address, port=self.port, verbose=False)
        self._server.start()
        self._owner = self._running = True
        self._create_bucket()

    def _create_bucket(self) -> None:
        url = f"{self.endpoint}/{self.bucket}"  # our own http:// URL, hence the noqa below
        request = urllib.request.Request(url, method="PUT")  # noqa: S310
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310
            pass

    def with_new_bucket(self, bucket: str | None = None) -> S3Server:
        """This server with another, empty bucket: a fresh store in milliseconds, where a
        server's start and stop take 0.5 s. Stopping the copy leaves the server running."""
        other = copy.copy(self)
        other.bucket = bucket or f"memnet-{secrets.token_hex(4)}"
        other._owner = False
        other._create_bucket()
        return other

    @property
    def endpoint(self) -> str:
        return self.endpoint_at(self.host)

    def endpoint_at(self, address: str) -> str:
        return f"http://{address}:{self.port}"

    def url(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}"

    def env(self, address: str | None = None) -> dict[str, str]:
        """What an S3 client (obstore, boto3, the AWS CLI) needs, reaching it at `address`."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_at(address or self.host),
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",  # moto accepts any
            "AWS_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
        }

    def stop(self) -> None:
        """Stop the server (0.5 s: werkzeug polls for shutdown), unless a copy's."""
        if self._owner and self._running:
            self._running = False
            self._server.stop()

    def __enter__(self) -> S3Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# Simulated hosts: one network namespace per host, each with a veth whose other end is on a
# bridge in the root namespace. The bridge holds `server_ip` (.1 of a free 10.213.X.0/24);
# hosts are .2, .3, ... and reach each other and the root namespace, nothing else. Names carry
# the creating pid so a later run removes what a killed one left behind.

_IP = shutil.which("ip", path=os.defpath + ":/usr/sbin:/sbin") or "ip"
_PREFIX = "memnet-"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([_IP, *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


@functools.cache
def netns_available() -> str | None:
    """Why simulated hosts cannot be made here, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which(_IP) is None:
        return "the `ip` command (iproute2) is not installed"
    name = f"{_PREFIX}probe-{os.getpid()}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    veth = _ip(
        "link", "add", f"mnp{os.getpid()}", "type", "veth", "peer", "netns", name, check=False
    )
    _ip("netns", "del", name, check=False)  # takes the veth pair with it
    if veth.returncode != 0:
        return f"cannot make a veth pair: {veth.stderr.strip()}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(name: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]


def _kill_ns(name: str, timeout_s: float = 10.0) -> int:
    """SIGKILL every process in namespace `name` until none is left; how many were killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while pids := _ns_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in {name} survive SIGKILL: {pids}")
        time.sleep(0.01)
    return len(killed)


def _orphaned(label: str) -> bool:
    """Whether `label` ("memnet-PID" or "memnet-PID-...") names a process that is gone."""
    owner = label.removeprefix(_PREFIX).split("-")[0]
    return label.startswith(_PREFIX) and owner.isdigit() and not _pid_alive(int(owner))


def _sweep_stale() -> None:
    """Remove namespaces and bridges whose creating process is gone (killed test runs)."""
    for ns in json.loads(_ip("-j", "netns", "list").stdout or "[]"):
        if _orphaned(ns["name"]):
            _kill_ns(ns["name"])
            _ip("netns", "del", ns["name"], check=False)
    for link in json.loads(_ip("-j", "link", "show", "type", "bridge").stdout or "[]"):
        if _orphaned(link.get("ifalias", "")):
            _ip("link", "del", link["ifname"], check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 no address of this machine is in (call under `_subnet_lock`)."""
    used = [
        ipaddress.ip_address(a["local"])
        for link in json.loads(_ip("-j", "-4", "addr").stdout or "[]")
        for a in link.get("addr_info", [])
    ]
    for x in random.sample(range(256), 256):
        net = ipaddress.IPv4Network(f"10.213.{x}.0/24")
        if not any(a in net for a in used):
            return net
    raise RuntimeError("no free 10.213.X.0/24 subnet for simulated hosts")


@contextlib.contextmanager
def _subnet_lock():
    """Serialises choosing and claiming subnets between processes (parallel test runs)."""
    with open(Path(tempfile.gettempdir()) / "memnet-hosts.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Host:
    """One simulated machine: a network namespace at `ip`, its own working directory
    `workdir` (no filesystem is shared unless a test passes paths across), and servers in the
    root namespace reachable at `server_ip`."""

    def __init__(self, name: str, ip: str, server_ip: str, workdir: Path) -> None:
        self.name = name
        self.ip = ip
        self.server_ip = server_ip
        self.workdir = workdir

    def popen(
        self,
        args: list[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdout=None,
        stderr=None,
        **kwargs,
    ) -> subprocess.Popen:
        """Start `args` inside this host (in `workdir` unless `cwd` says otherwise). The
        Popen's pid is the command itself: `ip netns exec` execs it."""
        return subprocess.Popen(
            [_IP, "netns", "exec", self.name, *args],
            cwd=cwd or self.workdir,
            env=env,
            stdout=stdout,
            stderr=stderr,
            **kwargs,
        )

    def run(self, args: list[str], *, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run `args` inside this host to completion, capturing its output as text."""
        proc = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def pids(self) -> list[int]:
        return _ns_pids(self.name)

    def kill_all(self) -> int:
        """SIGKILL every process in this host, as a power cut would; how many there were.
        Reap any you started with Popen.wait()."""
        return _kill_ns(self.name)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ip={self.ip!r})"


class Hosts:
    """Simulated hosts on one private subnet; `server_ip` is the root namespace's address
    on it, where servers bound to 0.0.0.0 (or to `server_ip`) are reached. Add hosts with
    `add()`; `close()` kills their processes and removes namespaces, veths and bridge."""

    def __init__(self, root: Path, count: int = 0) -> None:
        if reason := netns_available():
            raise RuntimeError(reason)
        _sweep_stale()
        self.root = root
        self.tag = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.bridge = f"mnb{self.tag.split('-')[1]}"
        self.hosts: list[Host] = []
        self._veths: list[str] = []
        with _subnet_lock():
            self.subnet = _free_subnet()
            self.server_ip = str(self.subnet[1])
            _ip("link", "add", self.bridge, "type", "bridge", "forward_delay", "0")
            _ip("link", "set", self.bridge, "alias", f"{_PREFIX}{os.getpid()}")
            _ip("addr", "add", f"{self.server_ip}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        for _ in range(count):
            self.add()

    def add(self) -> Host:
        i = len(self.hosts)
        if i + 2 >= self.subnet.num_addresses - 1:
            raise RuntimeError("a Hosts subnet holds at most 253 hosts")
        name, veth, ip = f"{_PREFIX}{self.tag}-{i}", f"{self.bridge}v{i}", str(self.subnet[i + 2])
        _ip("netns", "add", name)
        host = Host(name, ip, self.server_ip, self.root / f"host{i}")
        self.hosts.append(host)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name)
        self._veths.append(veth)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", name, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        host.workdir.mkdir(parents=True, exist_ok=True)
        return host

    def close(self) -> None:
        for host in self.hosts:
            _kill_ns(host.name)
        # Deleting a namespace frees its devices later, in the kernel's own time: delete the
        # veths first so that nothing is left once close() returns.
        for veth in self._veths:
            _ip("link", "del", veth, check=False)
        for host in self.hosts:
            _ip("netns", "del", host.name, check=False)
        self.hosts.clear()
        self._veths.clear()
        _ip("link", "del", self.bridge, check=False)

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self):
        return iter(self.hosts)

    def __len__(self) -> int:
        return len(self.hosts)

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
