"""``memnet status``: per partition, who owns it, how far behind it is, its dead letters and
last snapshot; ``memnet status --check``: a yes/no for readiness probes.

Live workers are the members of ``PREFIX:workers`` whose score (expiry, Redis ms) is above
Redis's TIME now: a worker that died stays in the set until a peer's next heartbeat removes
it, and is not shown (only counted). A partition's owner is its lease's holder; an owner
not in the live set is marked "not live" (its lease runs out within the lease period).

``--check`` exits 0 when every partition has a live owner, a lag (XINFO GROUPS) of at
most ``--max-lag`` (default 10000) and no entry delivered and left uncommitted for longer
than a step may take (the worker's stall limit, max(30 s, 10 leases)), else 1 printing one
line per problem. Redis reports no
lag when it cannot count it (entries trimmed or deleted past the group's position, a group
recreated at an id, no group yet). Then: nothing after the group's last delivered id means
a lag of 0; otherwise the lag is unknown but at most the stream's length, which passes only
if that bound is within ``--max-lag`` ("unknown" never passes for "caught up"). Redis counts
again once the group has read to the end of the stream.

The snapshot column reads the snapshot store (MEMNET_SNAPSHOT_URL, else MEMNET_SNAPSHOT_DIR)
the way a worker does: an S3 bucket from anywhere, a directory from *this* machine (relative
paths are relative to the current directory); the store read is printed, and a missing
directory or an unreachable store said so. Importing this module (the CLI does, to register
the commands) loads neither redis nor numpy nor JAX; JAX (memnet) loads only to read
snapshot manifests, never for ``--check``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from worker.dead import add_commands as add_dead_command
from worker.dead import as_text as text
from worker.dead import at_least_zero, quiet_stdout
from worker.settings import Settings, redact

if TYPE_CHECKING:
    from worker.connection import Client
    from worker.protocol import Keys

MAX_LAG = 10_000
# (model: serving it; serve: the only model that may take it, set by memnet deploy)
_PER_PARTITION = ("lease", "epoch", "offset", "trimmed", "model", "serve")


def redis_ms(client: Client) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def gather(settings: Settings, *, snapshots: bool = True, client: Client | None = None) -> dict:
    """Everything ``memnet status`` shows, as JSON-ready data (``deployment`` is False when
    PREFIX:meta is missing)."""
    from worker.connection import connect
    from worker.protocol import Keys

    client = client or connect(settings.redis_url)
    keys = Keys(settings.prefix)
    meta = {text(k): text(v) for k, v in client.hgetall(keys.meta).items()}
    now = redis_ms(client)
    members = [(text(w), score) for w, score in client.zrange(keys.workers, 0, -1, withscores=True)]
    live = sorted(w for w, score in members if score > now)
    partitions = int(meta.get("partitions", settings.partitions))
    rows = _rows(client, keys, partitions, set(live))
    store, found, error = _snapshots(settings, rows, snapshots, meta.get("model"))
    return {
        "deployment": bool(meta),
        "prefix": settings.prefix,
        "meta_key": keys.meta,
        "redis_url": redact(settings.redis_url),
        "partitions": partitions,
        "protocol": meta.get("protocol"),
        "model": meta.get("model"),
        "deploying": meta.get("deploying"),
        "deploy_running": text(client.get(keys.deploy)),  # (who holds PREFIX:deploy)
        "previous_model": meta.get("previous") or None,
        "stall_s": settings.stall_s,  # (a step longer than this is stuck: /healthz's limit)
        "dims": {k: int(meta[k]) for k in ("input_dim", "memory_dim", "output_dim") if k in meta},
        "components": meta.get("components"),
        "workers": live,
        "expired_workers": sorted(w for w, score in members if score <= now),
        "snapshot_store": store,
        "snapshot_store_found": found,
        "snapshot_store_error": error,
        "rows": rows,
    }


def _rows(client: Client, keys: Keys, partitions: int, live: set[str]) -> list[dict[str, Any]]:
    """One pipelined round trip for every partition (a second for lags Redis cannot count)."""
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        for name in _PER_PARTITION:
            pipe.get(keys.part(p, name))
        pipe.xlen(keys.inp(p))
        pipe.xinfo_groups(keys.inp(p))
        pipe.xlen(keys.dead(p))
        pipe.hgetall(keys.part(p, "switch"))
    replies = pipe.execute(raise_on_error=False)
    width = len(_PER_PARTITION) + 4
    rows = []
    for p in range(partitions):
        *values, length, groups, dead, switch = replies[p * width : (p + 1) * width]
        row: dict[str, Any] = {"partition": p}
        row.update({n: _value(v) for n, v in zip(_PER_PARTITION, values, strict=True)})
        row["owner"] = row.pop("lease")
        row["owner_alive"] = row["owner"] in live
        group = _group(groups)
        row["length"] = _number(length)
        row["lag"] = group.get("lag") if group else None
        row["pending"] = group.get("pending") if group else None
        row["dead"] = _number(dead)
        row["switch"] = {text(k): text(v) for k, v in switch.items()} if switch else None
        row["last_delivered"] = text(group.get("last-delivered-id")) if group else None
        if group is None:
            row["lag_note"] = "no consumer group yet (no worker has read this partition)"
        rows.append(row)
    _count_unknown_lags(client, keys, rows)
    _oldest_pending(client, keys, rows)
    return rows


def _oldest_pending(client: Client, keys: Keys, rows: list[dict[str, Any]]) -> None:
    """For partitions with entries delivered and not committed: the oldest one and how
    long ago it was delivered (a worker stuck on it, or gone without its lease lapsing,
    holds its partition without answering: the lag alone does not show it)."""
    from worker.protocol import GROUP

    waiting = [r for r in rows if r["pending"]]
    if not waiting:
        return
    pipe = client.pipeline(transaction=False)
    for row in waiting:
        pipe.xpending_range(keys.inp(row["partition"]), GROUP, min="-", max="+", count=1)
    for row, oldest in zip(waiting, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(oldest, Exception) or not oldest:
            continue
        row["oldest_pending"] = text(oldest[0]["message_id"])
        row["oldest_pending_s"] = round(oldest[0]["time_since_delivered"] / 1000, 1)


def _value(reply: Any) -> str | None:
    return None if reply is None or isinstance(reply, Exception) else text(reply)


def _number(reply: Any) -> int:
    return 0 if isinstance(reply, Exception) else int(reply)


def _group(reply: Any) -> dict[str, Any] | None:
    from worker.protocol import GROUP

    if isinstance(reply, Exception):  # no such key: the stream was never created
        return None
    return next((g for g in reply if text(g["name"]) == GROUP), None)


def _count_unknown_lags(client: Client, keys: Keys, rows: list[dict[str, Any]]) -> None:
    """Redis reports no lag when it cannot count it (entries deleted, a recreated group);
    when nothing follows the group's last delivered id the lag is 0 all the same."""
    from worker.protocol import parse_id

    unknown = [r for r in rows if r["lag"] is None and r["last_delivered"] is not None]
    if not unknown:
        return
    pipe = client.pipeline(transaction=False)
    for row in unknown:
        pipe.xrevrange(keys.inp(row["partition"]), count=1)
    for row, newest in zip(unknown, pipe.execute(raise_on_error=False), strict=True):
        if isinstance(newest, Exception):
            continue
        if not newest or parse_id(text(newest[0][0])) <= parse_id(row["last_delivered"]):
            row["lag"] = 0
        else:
            row["lag_note"] = (
                f"Redis cannot count it (entries deleted or the group recreated); entries "
                f"remain after the group's last delivered id {row['last_delivered']}"
            )


def _snapshots(
    settings: Settings, rows: list[dict[str, Any]], wanted: bool, model: str | None
) -> tuple[str, bool, str | None]:
    """Fill each row's "snapshot" (the serving model's) from the store; (store read,
    found, error if any)."""
    url = settings.store_url
    local = "://" not in url or url.startswith("file://")
    if local:
        url = str(Path(url.removeprefix("file://")).absolute())
    for row in rows:
        row["snapshot"] = None
    if not wanted or model is None or (local and not Path(url).is_dir()):
        return url, False, None
    from memnet.store import StoreError  # (no JAX: the snapshot modules load it)
    from worker.ownership import open_store

    try:
        for row in rows:
            row["snapshot"] = _newest(open_store(settings, row["partition"], None, model))
    except StoreError as e:
        return url, False, str(e)
    return url, True, None


def _newest(store: Any) -> dict[str, Any] | None:
    found = store.manifests()
    if not found:
        return None
    info, body = found[0]
    return {
        "name": info.name,
        "position": body["position"],
        "epoch": body["epoch"],
        "memories": body["count"],
        "age_s": round(time.time() - body["created"], 1),
    }


# ---- what to print ----------------------------------------------------------------------------
def no_deployment(status: dict[str, Any]) -> str:
    where = f"under prefix {status['prefix']} at {status['redis_url']}"
    if status["workers"]:
        return (
            f"no deployment record {status['meta_key']} {where}, though "
            f"{len(status['workers'])} workers are live (they re-assert it within a lease "
            "renewal: try again)"
        )
    return f"no deployment {where} (no worker has run)"


def problems(status: dict[str, Any], max_lag: int = MAX_LAG) -> list[str]:
    """Why the deployment is not ready: no live owner, a lag over max_lag (or unknown), or
    an entry delivered longer ago than a step may take and not committed."""
    if not status["deployment"]:
        return [no_deployment(status)]
    found = [] if status["workers"] else [f"no live workers under prefix {status['prefix']}"]
    for row in status["rows"]:
        p, owner, lag = row["partition"], row["owner"], row["lag"]
        if row.get("serve") not in (None, status["model"]):
            found.append(
                f"partition {p}: only model {row['serve'][:12]} may take it (memnet deploy), "
                f"but the deployment serves model {str(status['model'])[:12]}: an interrupted "
                "deploy? Run memnet deploy --model with the file of the model to serve"
            )
        if owner is None:
            found.append(f"partition {p}: no live owner (no lease)")
        elif not row["owner_alive"]:
            found.append(f"partition {p}: no live owner (lease held by {owner}, not alive)")
        if lag is None:
            if row["length"] > max_lag:  # the lag is at most the stream's length
                note = row.get("lag_note", "not reported")
                found.append(
                    f"partition {p}: lag unknown ({note}), up to {row['length']} > {max_lag}"
                )
        elif lag > max_lag:
            found.append(f"partition {p}: lag {lag} > {max_lag}")
        waited = row.get("oldest_pending_s")
        if waited is not None and waited > status["stall_s"]:
            found.append(
                f"partition {p}: entry {row['oldest_pending']} delivered {waited} s ago and "
                f"not committed (over {status['stall_s']:.0f} s: its worker is stuck on it?)"
            )
    return found


def check(
    settings: Settings, max_lag: int = MAX_LAG, as_json: bool = False, out: IO[str] | None = None
) -> int:
    """``memnet status --check``: 0 when every partition has a live owner and a lag of at
    most max_lag, else 1 with one line per problem."""
    out = out or sys.stdout
    status = gather(settings, snapshots=False)
    found = problems(status, max_lag)
    if as_json:
        _emit(json.dumps({"ok": not found, "problems": found, "max_lag": max_lag}), out)
    elif found:
        _emit("\n".join(found), out)
    else:
        lags = [r["lag"] if r["lag"] is not None else r["length"] for r in status["rows"]]
        _emit(
            f"ok: {status['partitions']} partitions, each owned by a live worker "
            f"({len(status['workers'])} live), lag at most {max(lags, default=0)} "
            f"(limit {max_lag})",
            out,
        )
    return 1 if found else 0


def print_status(settings: Settings, as_json: bool = False, out: IO[str] | None = None) -> int:
    """``memnet status``: 0, or 1 when there is no deployment under the prefix."""
    out = out or sys.stdout
    status = gather(settings)
    if as_json:
        _emit(json.dumps(status, indent=1), out)
    elif not status["deployment"]:
        _emit(no_deployment(status), out)
    else:
        _emit("\n".join(render(status)), out)
    return 0 if status["deployment"] else 1


def _emit(text: str, out: IO[str]) -> None:
    """Print; a reader that went away (``| head``) changes nothing, the exit status included."""
    try:
        print(text, file=out, flush=True)
    except BrokenPipeError:
        if out is sys.stdout:
            quiet_stdout()


def render(status: dict[str, Any]) -> list[str]:
    lines = [_headline(status), *_waiting_line(status), _workers_line(status)]
    lines.append(_snapshots_line(status))
    lines.append(
        f"{'part':>4}  {'owner':<28} {'epoch':>5} {'lag':>7} {'pend':>5} {'length':>8} "
        f"{'dead':>6}  last snapshot"
    )
    for r in status["rows"]:
        owner = r["owner"] or "-"
        if r["owner"] is not None and not r["owner_alive"]:
            owner += " (not live)"
        snap = r["snapshot"]
        last = (
            f"{snap['position']}, {snap['memories']} memories ({snap['age_s']} s ago)"
            if snap
            else "-"
        )
        lines.append(
            f"{r['partition']:>4}  {owner:<28} {r['epoch'] or '-':>5} "
            f"{'?' if r['lag'] is None else r['lag']:>7} {r['pending'] or 0:>5} "
            f"{r['length']:>8} {r['dead']:>6}  {last}"
        )
    return lines + _switch_lines(status)


def _headline(status: dict[str, Any]) -> str:
    line = (
        f"prefix {status['prefix']} at {status['redis_url']}: {status['partitions']} "
        f"partitions, protocol {status['protocol']}"
    )
    if status["model"]:
        line += f", model {status['model'][:12]}"
    dims = status["dims"]
    if dims:
        line += " (" + ", ".join(f"{k} {v}" for k, v in dims.items()) + ")"
    if status["components"]:
        line += f", components {status['components']}"
    if status["deploying"] and status["deploying"] != status["model"]:
        line += f"; deploying model {status['deploying'][:12]} " + (
            f"(memnet deploy is catching up: {status['deploy_running']})"
            if status.get("deploy_running")
            else "(no memnet deploy runs: an interrupted one left its marks, and only that "
            "model's workers may trim; call it off by deploying the served model's file)"
        )
    return line


def _waiting_line(status: dict[str, Any]) -> list[str]:
    """After memnet deploy: the partitions no worker of the deployed model has taken yet."""
    model = status["model"]
    waiting = [r for r in status["rows"] if model and r.get("model") not in (None, model)]
    if not waiting:
        return []
    n = len(waiting)
    return [
        f"model {model[:12]} is deployed; {n} partition{'' if n == 1 else 's'} not yet taken "
        f"by a worker of it (they move as workers with MEMNET_MODEL set to it start; "
        "workers of another model hand over and take none)"
    ]


def _switch_lines(status: dict[str, Any]) -> list[str]:
    """Where each partition switched models (memnet deploy), if any did."""
    lines = []
    for r in status["rows"]:
        switch = r.get("switch")
        if switch:
            lines.append(
                f"partition {r['partition']}: model {switch['from'][:12]} answered up to entry "
                f"{switch['after']}, model {switch['to'][:12]} after it"
            )
    return lines


def _workers_line(status: dict[str, Any]) -> str:
    live = status["workers"]
    line = f"{len(live)} live worker{'' if len(live) == 1 else 's'}"
    if live:
        line += ": " + ", ".join(live)
    expired = len(status["expired_workers"])
    if expired:
        line += f" ({expired} expired member{'' if expired == 1 else 's'} of the set not shown)"
    return line


def _snapshots_line(status: dict[str, Any]) -> str:
    where = status["snapshot_store"]
    if status["snapshot_store_found"]:
        return f"snapshots read from {where}"
    if status["snapshot_store_error"]:
        return (
            f"snapshots: cannot read {where} ({status['snapshot_store_error']}); the column shows -"
        )
    return (
        f"snapshots: {where} does not exist here (MEMNET_SNAPSHOT_URL or MEMNET_SNAPSHOT_DIR, "
        "relative to the current directory): run this where the workers' snapshot "
        "directory is, or set it; the column shows -"
    )


# ---- the command ------------------------------------------------------------------------------
def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the operator commands ``memnet status`` and ``memnet dead``."""
    p = sub.add_parser(
        "status",
        help="partitions, owners, lag, dead letters and snapshots; --check for probes",
        description="Per partition: its owner (a live worker or not), epoch, lag, pending\n"
        "entries, input length, dead letters and last snapshot (read from\n"
        "MEMNET_SNAPSHOT_URL, or MEMNET_SNAPSHOT_DIR). Exit status 1 when no worker ever ran\n"
        "under the prefix.",
    )
    p.add_argument(
        "--json", action="store_true", help="as one JSON document (with --check: ok, problems)"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if every partition has a live owner and a lag of at most --max-lag, "
        "else 1 printing why (a readiness probe)",
    )
    p.add_argument(
        "--max-lag",
        type=at_least_zero,
        default=MAX_LAG,
        metavar="N",
        help="for --check: the most entries a partition may have unread (default %(default)s)",
    )
    p.set_defaults(run=cmd_status)
    add_dead_command(sub)


def cmd_status(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if args.check:
        return check(settings, args.max_lag, as_json=args.json)
    return print_status(settings, as_json=args.json)
