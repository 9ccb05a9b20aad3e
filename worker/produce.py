"""``memnet produce FILE``: send a JSON-lines file of events, pipelined, with a progress bar.

The whole file is checked first (each line one JSON event that the deployment accepts, as
``MemnetClient.send`` checks it), and nothing is sent if any line is bad. Blank lines are
not events. ``skip`` resumes an interrupted run: the first ``skip`` events are not sent
again (events are counted, not lines).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from worker.client import ClientError, Deployment, InvalidEvent, MemnetClient
from worker.connection import is_cluster
from worker.protocol import pack

PIPELINE = 500  # events per round trip


class BadFile(ClientError, ValueError):
    """The path is not a file produce can read twice (a pipe, a directory)."""


class BadLine(InvalidEvent):
    """A line of the file is not an event the deployment accepts; nothing was sent.

    ``line`` is its number (from 1) and ``reason`` what is wrong with it.
    """

    def __init__(self, path: str | os.PathLike[str], line: int, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}, line {line}: {reason} (nothing was sent)")
        self.line = line
        self.reason = reason


def produce_file(client: MemnetClient, path: str | os.PathLike[str], skip: int = 0) -> int:
    """Check every event of a JSON-lines file, then send all but the first ``skip``; returns
    how many were sent. Raises BadLine (before sending anything) for a bad line,
    FileNotFoundError for a missing file; a Redis error while sending carries a note
    saying how many events were sent and the ``skip`` that resumes after them."""
    if skip < 0:
        raise ValueError(f"skip must be 0 or more, got {skip}")
    if not stat.S_ISREG(os.stat(path).st_mode):  # (a missing file: before a missing deployment)
        raise BadFile(
            f"{os.fspath(path)}: not a regular file: produce reads it twice (every line "
            f"checked before the first is sent); save a pipe's output to a file first"
        )
    deployment = client.deployment
    total = sum(1 for _ in _events(path, deployment, "check"))
    sent = 0
    # A cluster's pipeline sends every command of a node whose reply was lost again, on
    # its own, whatever the client's retry policy: each event would be added twice. There
    # the events go one by one (a command alone is not sent again).
    cluster = is_cluster(client.redis)
    pipe = client.redis.pipeline(transaction=False)
    try:
        for n, event in enumerate(_events(path, deployment, "produce"), 1):
            if n <= skip:
                continue
            stream, fields = (
                client.keys.inp(deployment.partition(event["memory"])),
                {"msg": pack(event)},
            )
            if cluster:
                client.redis.xadd(stream, fields)
                sent += 1
                continue
            pipe.xadd(stream, fields)
            if len(pipe) >= PIPELINE:
                sent += len(pipe.execute())
        sent += len(pipe.execute())
    except Exception as e:
        more = 1 if cluster else PIPELINE
        e.add_note(
            f"sent {sent} of {max(0, total - skip)} events (up to {more} more may have "
            f"landed); resume with skip {skip + sent} (memnet produce --skip {skip + sent})"
        )
        raise
    return sent


def _events(
    path: str | os.PathLike[str], deployment: Deployment, desc: str
) -> Iterator[dict[str, Any]]:
    """The file's events, each checked and prepared (raises BadLine), with a progress bar."""
    with (
        open(path, "rb") as f,  # (lines decoded one by one: a bad byte names its line)
        tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=desc) as bar,
    ):
        for number, raw in enumerate(f, 1):
            bar.update(len(raw))
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise BadLine(path, number, f"not UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                yield _event(path, number, line, deployment)


def _event(
    path: str | os.PathLike[str], number: int, line: str, deployment: Deployment
) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except (ValueError, RecursionError) as e:  # (JSONDecodeError; 5,000 digits; deep nesting)
        raise BadLine(path, number, f"not JSON this reads ({e})") from None
    if not isinstance(event, dict):
        raise BadLine(path, number, f"an event is a JSON object, got {type(event).__name__}")
    try:
        prepared = deployment.prepare(event)
        pack(prepared)  # (every field, the ones prepare passes through too, can be sent)
    except InvalidEvent as e:
        raise BadLine(path, number, str(e)) from None
    except (OverflowError, ValueError, TypeError) as e:
        raise BadLine(path, number, f"cannot be sent as msgpack ({e})") from None
    return prepared
