"""``memnet memories``: the memories of each partition, as of its newest snapshot, with
their write counts (read from the snapshot store the way a worker reads it; memories
written since the newest snapshot appear after the next one)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from worker.settings import Settings


def listing(settings: Settings, partitions: list[int], model: str) -> list[dict[str, Any]]:
    """Per partition: its newest snapshot's name and position (of ``model``, a
    fingerprint), and every memory in it."""
    from worker.ownership import open_store  # (JAX: the snapshot modules load it)

    out = []
    for p in partitions:
        store = open_store(settings, p, None, model)
        loaded = store.load()
        memories = {} if loaded is None else loaded.entries
        out.append(
            {
                "partition": p,
                "snapshot": None if loaded is None else loaded.name,
                "position": None if loaded is None else loaded.position,
                "memories": {name: e.writes for name, e in sorted(memories.items())},
            }
        )
    return out


def add_command(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "memories",
        help="the memories of each partition with their write counts (newest snapshots)",
        description="Every memory of each partition as of its newest snapshot (of the model\n"
        "the deployment serves), resident in a worker or not, with its write count;\n"
        "read from MEMNET_SNAPSHOT_URL (or MEMNET_SNAPSHOT_DIR) like the workers do.",
    )
    p.add_argument("--partition", type=int, metavar="P", help="only this partition")
    p.add_argument("--json", action="store_true", help="as one JSON document")
    p.set_defaults(run=cmd_memories)


def cmd_memories(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    from worker.connection import connect, text
    from worker.events import NoDeployment
    from worker.protocol import Keys

    meta = connect(settings.redis_url).hmget(Keys(settings.prefix).meta, "model", "partitions")
    if meta[0] is None:
        raise NoDeployment(f"{Keys(settings.prefix).meta} does not exist: start a worker first")
    model, count = text(meta[0]), int(meta[1])  # (the deployment's count, not this shell's)
    if args.partition is not None and not 0 <= args.partition < count:
        print(f"memnet: --partition must be in 0..{count - 1} (the deployment's)", file=sys.stderr)
        return 2
    chosen = [args.partition] if args.partition is not None else range(count)
    found = listing(settings, list(chosen), model)
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    for part in found:
        where = f"{part['snapshot']} at {part['position']}" if part["snapshot"] else "no snapshot"
        print(f"partition {part['partition']}: {len(part['memories'])} memories ({where})")
        for name, writes in part["memories"].items():  # (repr where a name could forge lines)
            shown = name if name.isprintable() else repr(name)
            print(f"  {shown}\t{writes} writes")
    return 0
