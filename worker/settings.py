"""Settings of workers and clients, read from the environment (REDIS_URL, MEMNET_*): one
frozen dataclass. (Elsewhere only ``memnet demo`` looks at REDIS_URL, to choose a Redis, and
the engine at MEMNET_BLAS_THREADS.)

Every setting has a documented default whose unit is in its name (``HELP`` says what each
means; ``memnet worker --help`` lists them). A bad value stops start-up with a message naming
the variable.
"""

from __future__ import annotations

import math
import os
import re
import socket
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the environment variable."""


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    model: Path | None = None
    snapshot_dir: Path = Path("var/snapshots")
    snapshot_url: str = ""
    resident_mb: int = 1024
    archive: int = 1
    archive_days: float = 0.0
    cache_dir: Path = Path("var/cache")
    partitions: int = 8
    prefix: str = "memnet"
    batch_size: int = 1000
    block_ms: int = 100
    lease_ms: int = 5000
    snapshot_every_entries: int = 50_000
    snapshot_every_s: float = 60.0
    snapshots_kept: int = 3
    stop_snapshot_s: float = 3.0
    max_message_bytes: int = 1 << 20
    response_maxlen: int = 1_000_000
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    scan: str = ""
    gc_threshold: int = 100_000
    worker_id: str = field(default_factory=lambda: default_worker_id())

    @property
    def store_url(self) -> str:
        """Where snapshots live: MEMNET_SNAPSHOT_URL, else MEMNET_SNAPSHOT_DIR."""
        return self.snapshot_url or str(self.snapshot_dir)

    @property
    def renew_every_s(self) -> float:
        return self.lease_ms / 3000

    @property
    def stall_s(self) -> float:
        """How long the worker loop may go without a pass before the lease keeper stops
        renewing (its peers then take its partitions) and /healthz says 503: one step of
        large memories may take seconds."""
        return max(30.0, 10 * self.lease_ms / 1000)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_NAMES[f.name]
            raw = env.get(name)
            if f.name == "metrics_port" and raw is None:
                name, raw = "PORT", env.get("PORT")  # (honcho's and Heroku's)
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(name, f.name, raw)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        self._check_redis_url()
        if not self.prefix or any(c in self.prefix for c in "{} \n"):
            raise SettingsError(
                f"MEMNET_PREFIX must be non-empty without braces or spaces, got {self.prefix!r}"
            )
        if self.scan:
            from memnet import quantized  # here only: clients import settings, not memnet

            if self.scan not in quantized.available():
                raise SettingsError(
                    f"MEMNET_SCAN must be one of {', '.join(quantized.available())} on this "
                    f"CPU (or empty: the fastest), got {self.scan!r}"
                )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(
                f"MEMNET_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"
            )
        store = urlsplit(self.snapshot_url)
        if self.snapshot_url and (
            store.scheme not in ("", "file", "s3")
            or (store.scheme == "s3" and not store.netloc)
            or (store.scheme == "file" and store.netloc not in ("", "localhost"))
        ):  # (file://var/x would name the path /x on a host "var")
            raise SettingsError(
                "MEMNET_SNAPSHOT_URL must be a path, file:///PATH or s3://BUCKET[/PREFIX], "
                f"got {self.snapshot_url!r}"
            )
        if self.lease_ms < 300:
            raise SettingsError(f"MEMNET_LEASE_MS must be at least 300, got {self.lease_ms}")
        if self.gc_threshold < 1:
            raise SettingsError(f"MEMNET_GC_THRESHOLD must be at least 1, got {self.gc_threshold}")
        if self.snapshots_kept < 2:  # (the input is trimmed below the oldest kept one)
            raise SettingsError(
                f"MEMNET_SNAPSHOTS_KEPT must be at least 2 (a damaged snapshot is replaced by "
                f"the one before it, replaying the input since), got {self.snapshots_kept}"
            )

    def _check_redis_url(self) -> None:
        url = urlsplit(self.redis_url)
        if url.scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, "
                f"got {redact(self.redis_url)!r}"
            )
        try:
            url.port  # noqa: B018 (parsing it is the check: a non-number or out of range)
        except ValueError as e:
            raise SettingsError(
                f"REDIS_URL has a bad port ({e}): {redact(self.redis_url)!r}"
            ) from None
        import redis  # (here: the operator commands import settings, and no redis)

        try:  # its options (?socket_timeout=...): redis-py checks them making a connection
            redis.ConnectionPool.from_url(self.redis_url).make_connection()  # (no I/O)
        except TypeError:
            pass  # an option only RedisCluster takes (?read_from_replicas=...)
        except (ValueError, redis.RedisError) as e:
            raise SettingsError(
                f"REDIS_URL has a bad option ({redact(str(e))}): {redact(self.redis_url)!r}"
            ) from None


ENV_NAMES = {
    "redis_url": "REDIS_URL",
    "model": "MEMNET_MODEL",
    "snapshot_dir": "MEMNET_SNAPSHOT_DIR",
    "snapshot_url": "MEMNET_SNAPSHOT_URL",
    "resident_mb": "MEMNET_RESIDENT_MB",
    "archive": "MEMNET_ARCHIVE",
    "archive_days": "MEMNET_ARCHIVE_DAYS",
    "cache_dir": "MEMNET_CACHE_DIR",
    "partitions": "MEMNET_PARTITIONS",
    "prefix": "MEMNET_PREFIX",
    "batch_size": "MEMNET_BATCH_SIZE",
    "block_ms": "MEMNET_BLOCK_MS",
    "lease_ms": "MEMNET_LEASE_MS",
    "snapshot_every_entries": "MEMNET_SNAPSHOT_EVERY_ENTRIES",
    "snapshot_every_s": "MEMNET_SNAPSHOT_EVERY_S",
    "snapshots_kept": "MEMNET_SNAPSHOTS_KEPT",
    "stop_snapshot_s": "MEMNET_STOP_SNAPSHOT_S",
    "max_message_bytes": "MEMNET_MAX_MESSAGE_BYTES",
    "response_maxlen": "MEMNET_RESPONSE_MAXLEN",
    "metrics_port": "MEMNET_METRICS_PORT",
    "metrics_host": "MEMNET_METRICS_HOST",
    "log_level": "MEMNET_LOG_LEVEL",
    "scan": "MEMNET_SCAN",
    "gc_threshold": "MEMNET_GC_THRESHOLD",
    "worker_id": "MEMNET_WORKER_ID",
}
# What each setting means (memnet worker --help and the README's table say the same).
HELP = {
    "redis_url": "the Redis to use; rediss:// and user:password@ work (percent-encode "
    "special characters in the password)",
    "model": "the model file every worker serves",
    "snapshot_dir": "snapshots in a directory every worker reaches, one subdirectory per "
    "partition (used when MEMNET_SNAPSHOT_URL is empty)",
    "snapshot_url": "where snapshots live: a path, file:///PATH or s3://BUCKET/PREFIX (with "
    "the AWS_* variables: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
    "AWS_REGION; AWS_ALLOW_HTTP=true for plain http)",
    "resident_mb": "RAM for memories per worker; least recently used ones beyond it leave "
    "RAM once in a snapshot and are fetched from it on their next event",
    "cache_dir": "this machine's cache (the shared graph of large memories, compiled functions)",
    "archive": "1: input entries are archived in the snapshot store before Redis trims them "
    "(what memnet rebuild runs a new model over); 0: not",
    "archive_days": "archived input older than this many days is deleted (0: kept forever; a "
    "rebuild needs the whole history)",
    "partitions": "partition count, fixed once the first worker records it in PREFIX:meta",
    "prefix": "key prefix",
    "batch_size": "entries read per partition per step",
    "block_ms": "longest idle wait for new entries",
    "lease_ms": "partition lease, renewed every third of it",
    "snapshot_every_entries": "snapshot a partition after this many entries "
    "(or MEMNET_SNAPSHOT_EVERY_S)",
    "snapshot_every_s": "snapshot a partition after this many seconds "
    "(or MEMNET_SNAPSHOT_EVERY_ENTRIES)",
    "snapshots_kept": "snapshots kept per partition; the input is trimmed below the oldest",
    "stop_snapshot_s": "longest a stopping worker spends on final snapshots (SIGTERM); "
    "partitions that do not fit hand over with their previous snapshot",
    "max_message_bytes": "larger messages are dead-lettered",
    "response_maxlen": "approximate length kept of each out/dead stream (0: all)",
    "metrics_port": "Prometheus metrics port, else $PORT (honcho sets it per process); 0: off",
    "metrics_host": "address /metrics and /healthz listen on (0.0.0.0: every interface)",
    "log_level": "DEBUG, INFO, WARNING or ERROR; logs are JSON lines on stderr",
    "scan": "the exact search's candidate pass: vnni, avx2, c (int8, memnet/_scan.c) or blas "
    "(float32); empty: the fastest this CPU runs. Answers are the same on every one",
    "gc_threshold": "container objects allocated between two young collections of "
    "Python's cyclic garbage collector in the worker (Python's default: 700)",
    "worker_id": "consumer name and lease holder",
}
_SHOWN_DEFAULTS = {"model": "(required)", "worker_id": "HOST-PID-RANDOM", "scan": "(fastest)"}

# Set for the memnet command's own process (worker.cli.main), never on import: read by
# OpenBLAS and JAX when they load.
PROCESS_DEFAULTS = {"MEMNET_BLAS_THREADS": "1", "JAX_PLATFORMS": "cpu"}
PROCESS_HELP = {
    "MEMNET_BLAS_THREADS": "BLAS threads per process (sets OPENBLAS_NUM_THREADS, "
    "OMP_NUM_THREADS and MKL_NUM_THREADS where they are unset)",
    "JAX_PLATFORMS": "where JAX runs; the default skips JAX's start-up probe for a TPU",
}


def describe() -> list[tuple[str, str, str]]:
    """(environment variable, default as shown, meaning) for every setting, in order."""
    rows = []
    for f in fields(Settings):
        default = _SHOWN_DEFAULTS.get(f.name, f.default)
        rows.append((ENV_NAMES[f.name], str(default), HELP[f.name]))
    return rows + [(name, PROCESS_DEFAULTS[name], PROCESS_HELP[name]) for name in PROCESS_HELP]


def set_process_defaults(env: MutableMapping[str, str] | None = None) -> None:
    """What a memnet process sets before numpy or JAX loads (only the memnet command does:
    importing the packages changes no variable). One BLAS thread per process: several
    workers share the cores, and OpenBLAS's spinning threads turn 50 us products into 8 ms
    ones under load. JAX on the CPU (the platform the worker's answers are defined on)
    without the start-up probe for a TPU, and its log line."""
    env = os.environ if env is None else env
    threads = env.get("MEMNET_BLAS_THREADS") or PROCESS_DEFAULTS["MEMNET_BLAS_THREADS"]
    if not (threads.isascii() and threads.isdigit() and int(threads) >= 1):
        raise SettingsError(f"MEMNET_BLAS_THREADS must be a positive integer, got {threads!r}")
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, threads)
    env.setdefault("JAX_PLATFORMS", PROCESS_DEFAULTS["JAX_PLATFORMS"])


_POSITIVE = {
    "partitions",
    "batch_size",
    "block_ms",
    "lease_ms",
    "snapshot_every_entries",
    "snapshots_kept",
    "max_message_bytes",
    "resident_mb",
}


_BOOLEANS = {"archive"}
_MINIMUM = {"lease_ms": 300, "snapshots_kept": 2, "gc_threshold": 1}  # (check() says why)


def _parse(name: str, key: str, raw: str) -> object:
    if key in ("model", "snapshot_dir", "cache_dir"):
        return Path(raw)
    if key in ("redis_url", "prefix", "log_level", "worker_id", "metrics_host", "snapshot_url",
               "scan"):  # fmt: skip
        return raw
    try:
        floats = ("snapshot_every_s", "stop_snapshot_s", "archive_days")
        value: float = float(raw) if key in floats else int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number ({_allowed(key)}), got {raw!r}") from None
    if not math.isfinite(value):  # (nan would compare False with every bound and deadline)
        raise SettingsError(f"{name} must be a finite number, got {raw!r}")
    too_big = (key == "metrics_port" and value > 65535) or (key in _BOOLEANS and value > 1)
    if (key in _POSITIVE and value < 1) or value < 0 or too_big:  # (_MINIMUM: check() says)
        raise SettingsError(f"{name} is out of range ({_allowed(key)}): {raw!r}")
    return value


def _allowed(key: str) -> str:
    """What _parse allows for key, in words."""
    if key == "metrics_port":
        return "0 to 65535"
    if key in _BOOLEANS:
        return "0 or 1"
    least = _MINIMUM.get(key, 1 if key in _POSITIVE else 0)
    return f"at least {least}" if least else "0 or more"


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs and messages: the one of
    ``user:password@`` (read from the text as written, up to the last "@": a password may
    hold "/", "?", "#" or "@" not percent-encoded, and a URL with a bad port is redacted
    too) and a ``password=`` query parameter (redis-py's way for unix sockets)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at and ":" in userinfo:
        url = f"{scheme}{sep}{userinfo.partition(':')[0]}:***@{host}"
    return _PASSWORD_PARAMETER.sub(r"\1***", url)


_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
