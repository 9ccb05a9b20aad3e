"""Redis connections: standalone or cluster (detected), with retries under our control.

redis-py retries failed commands by default; a retried read whose reply was lost would skip
entries, so the worker's connections never retry on their own: the worker resynchronises
from Redis's own state after any connection error instead.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

Client = redis.Redis | RedisCluster


def connect(url: str, *, timeout_s: float = 5.0, retries: int = 0) -> Client:
    """A client for url; a Redis Cluster is detected and served through RedisCluster."""
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": min(5.0, timeout_s),
        "retry": Retry(NoBackoff(), retries),
    }
    client = redis.Redis.from_url(url, **options)
    try:
        cluster = bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:  # a server without INFO (fakeredis): not a cluster
        cluster = False
    finally:
        client.close()
    if cluster:
        return RedisCluster.from_url(url, **options)
    return redis.Redis.from_url(url, **options)


def is_cluster(client: Client) -> bool:
    return isinstance(client, RedisCluster)


def text(value: Any) -> Any:
    """bytes -> str, recursively (replies arrive as bytes)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [text(v) for v in value]
    return value
