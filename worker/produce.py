"""``memnet produce FILE``: send a JSON-lines file of events, pipelined, with a progress bar."""

from __future__ import annotations

import json
import os
from typing import Any

from tqdm import tqdm

from worker.client import MemnetClient
from worker.protocol import pack

PIPELINE = 500


def produce_file(client: MemnetClient, path: str | os.PathLike[str]) -> int:
    size = os.path.getsize(path)
    sent = 0
    pipe = client.redis.pipeline(transaction=False)
    with (
        open(path, encoding="utf-8") as f,
        tqdm(total=size, unit="B", unit_scale=True, desc="produce") as bar,
    ):
        for number, line in enumerate(f, 1):
            bar.update(len(line.encode()))
            if not line.strip():
                continue
            event = _event(line, number)
            pipe.xadd(client.keys.inp(client.partition(event["memory"])), {"msg": pack(event)})
            sent += 1
            if len(pipe) >= PIPELINE:
                pipe.execute()
        pipe.execute()
    return sent


def _event(line: str, number: int) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except json.JSONDecodeError as e:
        raise SystemExit(f"memnet produce: line {number} is not JSON: {e}") from None
    if not isinstance(event, dict) or not isinstance(event.get("memory"), str):
        raise SystemExit(f"memnet produce: line {number} needs a string 'memory'")
    return event
