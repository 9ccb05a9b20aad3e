"""Prometheus metrics of a worker, served with /healthz by worker/health.py on
MEMNET_METRICS_HOST:MEMNET_METRICS_PORT (the port defaults to $PORT under honcho)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ENTRIES = Counter("memnet_entries_total", "Input entries processed, by op", ["op"])
ERRORS = Counter("memnet_errors_total", "Unexpected errors, by where they happened", ["where"])
DEAD_LETTERS = Counter("memnet_dead_letters_total", "Input entries dead-lettered")
LAG = Gauge("memnet_partition_lag", "Entries in a partition's input not yet read", ["partition"])
RESIDENT_MEMORIES = Gauge("memnet_resident_memories", "Memories held in RAM")
RESIDENT_BYTES = Gauge("memnet_resident_bytes", "Estimated RAM held by resident memories")
LOADS = Counter("memnet_memory_loads_total", "Memories fetched from the snapshot store")
EVICTIONS = Counter("memnet_memory_evictions_total", "Memories dropped from RAM (in a snapshot)")
OWNED = Gauge("memnet_partitions_owned", "Partitions this worker owns")
BATCH_SECONDS = Histogram(
    "memnet_batch_seconds",
    "Time to process and commit one batch",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
SNAPSHOT_SECONDS = Histogram(
    "memnet_snapshot_seconds",
    "Time to write one snapshot",
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30),
)
