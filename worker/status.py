"""``memnet status``: per partition, who owns it, how far behind it is, its last snapshot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import redis

from memnet.snapshot import SnapshotStore
from worker.connection import connect, text
from worker.protocol import GROUP, Keys
from worker.settings import Settings


def gather(settings: Settings) -> dict[str, Any]:
    client = connect(settings.redis_url)
    keys = Keys(settings.prefix)
    meta = {text(k): text(v) for k, v in client.hgetall(keys.meta).items()}
    partitions = int(meta.get("partitions", settings.partitions))
    workers = [text(w) for w in client.zrange(keys.workers, 0, -1)]
    rows = []
    for p in range(partitions):
        row: dict[str, Any] = {"partition": p}
        for name in ("lease", "epoch", "offset", "trimmed"):
            value = client.get(keys.part(p, name))
            row[name] = text(value) if value is not None else None
        row["owner"] = row.pop("lease")
        row["length"] = client.xlen(keys.inp(p))
        try:
            group = next(
                (g for g in client.xinfo_groups(keys.inp(p)) if text(g["name"]) == GROUP), None
            )
        except redis.ResponseError:
            group = None
        row["lag"] = group.get("lag") if group else None
        row["pending"] = group.get("pending") if group else None
        row["snapshot"] = _snapshot(Path(settings.snapshot_dir) / f"p{p}")
        rows.append(row)
    return {
        "partitions": partitions,
        "protocol": meta.get("protocol"),
        "workers": workers,
        "rows": rows,
    }


def _snapshot(directory: Path) -> dict[str, Any] | None:
    found = SnapshotStore(directory, None).manifests()
    if not found:
        return None
    info, body = found[0]
    return {
        "name": info.name,
        "position": body["position"],
        "epoch": body["epoch"],
        "age_s": round(time.time() - body["created"], 1),
    }


def print_status(settings: Settings, as_json: bool = False) -> int:
    status = gather(settings)
    if as_json:
        print(json.dumps(status, indent=1))
        return 0
    print(
        f"{status['partitions']} partitions, protocol {status['protocol']}, "
        f"{len(status['workers'])} live workers"
    )
    header = (
        f"{'part':>4}  {'owner':<28} {'epoch':>5} {'lag':>7} {'pend':>5} {'length':>8}  "
        "last snapshot"
    )
    print(header)
    for r in status["rows"]:
        snap = r["snapshot"]
        last = f"{snap['position']} ({snap['age_s']} s ago)" if snap else "-"
        print(
            f"{r['partition']:>4}  {r['owner'] or '-':<28} {r['epoch'] or '-':>5} "
            f"{'?' if r['lag'] is None else r['lag']:>7} {r['pending'] or 0:>5} "
            f"{r['length']:>8}  {last}"
        )
    return 0
