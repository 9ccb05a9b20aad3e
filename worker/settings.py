"""Worker settings: the only place that reads the environment.

Every setting has a documented default whose unit is in its name. A bad value stops start-up
with a message naming the variable.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


class SettingsError(ValueError):
    """A setting is missing or wrong; the message names the environment variable."""


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"  # REDIS_URL (rediss:// and user:pass@ work)
    model: Path | None = None  # MEMNET_MODEL: the model file every worker serves
    snapshot_dir: Path = Path("var/snapshots")  # MEMNET_SNAPSHOT_DIR, shared by all workers
    partitions: int = 8  # MEMNET_PARTITIONS: fixed for a deployment
    prefix: str = "memnet"  # MEMNET_PREFIX: key prefix
    batch_size: int = 1000  # MEMNET_BATCH_SIZE: entries read per partition per step
    block_ms: int = 100  # MEMNET_BLOCK_MS: longest wait for new entries when idle
    lease_ms: int = 5000  # MEMNET_LEASE_MS: partition lease; renewed every third of it
    snapshot_every_entries: int = 50_000  # MEMNET_SNAPSHOT_EVERY_ENTRIES
    snapshot_every_s: float = 60.0  # MEMNET_SNAPSHOT_EVERY_S
    snapshots_kept: int = 3  # MEMNET_SNAPSHOTS_KEPT
    stop_snapshot_s: float = 3.0  # MEMNET_STOP_SNAPSHOT_S: longest final snapshots on SIGTERM
    max_message_bytes: int = 1 << 20  # MEMNET_MAX_MESSAGE_BYTES
    response_maxlen: int = 1_000_000  # MEMNET_RESPONSE_MAXLEN: ~entries kept per out stream
    metrics_port: int = 0  # MEMNET_METRICS_PORT (else $PORT as honcho sets it); 0: off
    log_level: str = "INFO"  # MEMNET_LOG_LEVEL
    worker_id: str = field(default_factory=lambda: default_worker_id())  # MEMNET_WORKER_ID

    @property
    def renew_every_s(self) -> float:
        return self.lease_ms / 3000

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            name = ENV_NAMES[f.name]
            raw = env.get(name)
            if f.name == "metrics_port" and raw is None:
                raw = env.get("PORT")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(name, f.name, raw)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        scheme = urlsplit(self.redis_url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise SettingsError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, "
                f"got {redact(self.redis_url)!r}"
            )
        if not self.prefix or any(c in self.prefix for c in "{} \n"):
            raise SettingsError(
                f"MEMNET_PREFIX must be non-empty without braces or spaces, got {self.prefix!r}"
            )
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise SettingsError(
                f"MEMNET_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}"
            )
        if self.lease_ms < 300:
            raise SettingsError(f"MEMNET_LEASE_MS must be at least 300, got {self.lease_ms}")


ENV_NAMES = {
    "redis_url": "REDIS_URL",
    "model": "MEMNET_MODEL",
    "snapshot_dir": "MEMNET_SNAPSHOT_DIR",
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
    "log_level": "MEMNET_LOG_LEVEL",
    "worker_id": "MEMNET_WORKER_ID",
}
_POSITIVE = {
    "partitions",
    "batch_size",
    "block_ms",
    "lease_ms",
    "snapshot_every_entries",
    "snapshots_kept",
    "max_message_bytes",
}


def _parse(name: str, key: str, raw: str) -> object:
    if key in ("model", "snapshot_dir"):
        return Path(raw)
    if key in ("redis_url", "prefix", "log_level", "worker_id"):
        return raw
    try:
        value: float = float(raw) if key in ("snapshot_every_s", "stop_snapshot_s") else int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if (key in _POSITIVE and value < 1) or value < 0 or (key == "metrics_port" and value > 65535):
        raise SettingsError(f"{name} is out of range: {raw!r}")
    return value


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def redact(url: str) -> str:
    """The URL with any password replaced by ***, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
