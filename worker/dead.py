"""Dead letters made visible: ``memnet dead``, and the worker's warning when it makes some.

Bad input becomes an entry of ``PREFIX:{p}:dead`` at the input entry's id, whose ``msg`` is
msgpack ``{"entry": id, "error": reason, "raw": the original msg bytes, or nil when absent or
over MEMNET_MAX_MESSAGE_BYTES}`` (``worker.protocol.dead_letter``). Here the original is
decoded best-effort, only to name its memory, op and query id: it was dead-lettered because
something in it is wrong, so anything may be missing.

Light on purpose: importing this module (and worker.status, which registers both commands
on the CLI) loads neither JAX nor redis nor numpy; they load when a command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import IO, TYPE_CHECKING, Any

import msgpack

from worker.settings import Settings, redact

if TYPE_CHECKING:
    from worker.connection import Client
    from worker.faults import Throttled
    from worker.protocol import Keys

UNREADABLE = "(unreadable dead letter)"


@dataclass(frozen=True)
class DeadLetter:
    partition: int
    entry: str  # the input entry's id (the dead letter sits at the same id)
    error: str  # why it was refused
    memory: str | None = None  # from the original message, when it could be read
    op: str | None = None
    id: str | None = None  # the query id, when it had one (it also got an error response)
    raw_bytes: int | None = None  # size of the original kept in the dead letter; None: not kept

    def line(self) -> str:
        """One line for people: entry id, partition, op, memory, reason."""
        return (
            f"{self.entry}  p{self.partition}  {self.op or '-'}  "
            f"{_printable(self.memory) if self.memory is not None else '-'}  {self.error}"
        )


def _printable(value: str) -> str:
    """A name as is, or quoted when it holds characters that would break the line."""
    return value if value.isprintable() and " " not in value and value else repr(value)


def _loads(raw: Any) -> Any:
    """msgpack, best-effort: None if it is not bytes or not readable."""
    if not isinstance(raw, bytes):
        return None
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False, timestamp=0)
    except Exception:  # any malformed input: the point is to show what can be shown
        return None


def _field(body: dict[Any, Any], name: str) -> str | None:
    value = body.get(name)
    return value if isinstance(value, str) else None


def decode(partition: int, entry_id: str, msg: bytes | None) -> DeadLetter:
    """A dead-letter stream entry's ``msg`` as a DeadLetter (never raises)."""
    body = _loads(msg)
    if not isinstance(body, dict):
        return DeadLetter(partition, entry_id, UNREADABLE)
    raw = body.get("raw")
    error = _field(body, "error") or "(no reason recorded)"
    original = _loads(raw)
    if not isinstance(original, dict):
        original = {}
    return DeadLetter(
        partition,
        entry_id,
        error,
        memory=_field(original, "memory"),
        op=_field(original, "op"),
        id=_field(original, "id"),
        raw_bytes=len(raw) if isinstance(raw, bytes) else None,
    )


def as_text(value: Any) -> Any:
    """bytes -> str (Redis replies arrive as bytes), without importing worker.connection."""
    return value.decode() if isinstance(value, bytes) else value


def _order(letter: DeadLetter) -> tuple[int, int, int]:
    ms, _, seq = letter.entry.partition("-")
    return int(ms), int(seq or 0), letter.partition


def _from_entry(partition: int, entry_id: Any, fields: dict[Any, Any]) -> DeadLetter:
    return decode(partition, as_text(entry_id), fields.get(b"msg", fields.get("msg")))


# ---- reading --------------------------------------------------------------------------------
def recent(
    client: Client, keys: Keys, partitions: Sequence[int], count: int = 20
) -> tuple[list[DeadLetter], dict[int, str]]:
    """The ``count`` newest dead letters over these partitions (0: all), oldest first, and
    each partition's newest dead-letter id ("0-0" if none: where following starts)."""
    found: list[DeadLetter] = []
    newest: dict[int, str] = {}
    for p in partitions:
        entries = client.xrevrange(keys.dead(p), count=count or None)
        newest[p] = as_text(entries[0][0]) if entries else "0-0"
        found += [_from_entry(p, entry_id, fields) for entry_id, fields in entries]
    found.sort(key=_order)
    return (found[-count:] if count else found), newest


def follow(
    client: Client,
    keys: Keys,
    after: dict[int, str],
    block_ms: int = 1000,
    stop: Callable[[], bool] | None = None,
) -> Iterator[DeadLetter]:
    """Dead letters added after ``after`` (partition -> id), as they arrive (XREAD BLOCK);
    forever, or until ``stop()`` says so (checked at least every block_ms)."""
    positions = {keys.dead(p): after_id for p, after_id in after.items()}
    partition_of = {keys.dead(p): p for p in after}
    while not (stop and stop()):
        for stream, entries in _read(client, positions, block_ms):
            key = as_text(stream)
            for entry_id, fields in entries:
                positions[key] = as_text(entry_id)
                yield _from_entry(partition_of[key], entry_id, fields)


def _read(client: Client, positions: dict[str, str], block_ms: int) -> list[Any]:
    from worker.connection import is_cluster

    if not is_cluster(client):
        return client.xread(positions, count=1000, block=block_ms) or []
    # A cluster serves one slot per command: read each partition's stream in turn.
    replies: list[Any] = []
    for key, after in positions.items():
        replies += client.xread({key: after}, count=1000) or []
    if not replies:
        time.sleep(min(block_ms, 200) / 1000)
    return replies


def partition_count(client: Client, keys: Keys, settings: Settings) -> tuple[int, bool]:
    """The deployment's partition count (PREFIX:meta), else MEMNET_PARTITIONS; and whether
    the meta record exists."""
    stored = client.hget(keys.meta, "partitions")
    return (int(stored), True) if stored is not None else (settings.partitions, False)


# ---- the command ------------------------------------------------------------------------------
def show(
    settings: Settings,
    partitions: Sequence[int] | None = None,
    *,
    count: int = 20,
    follow_new: bool = False,
    as_json: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
    block_ms: int = 1000,
    stop: Callable[[], bool] | None = None,
) -> int:
    """``memnet dead``: print the newest dead letters, then (follow_new) new ones as they
    come. Returns the exit status (2 for a partition out of range)."""
    from worker.connection import connect
    from worker.protocol import Keys

    out = out or sys.stdout
    err = err or sys.stderr
    client = connect(settings.redis_url)
    keys = Keys(settings.prefix)
    total, recorded = partition_count(client, keys, settings)
    if not recorded:
        print(
            f"note: no {keys.meta} at {redact(settings.redis_url)} (no worker has run under "
            f"prefix {settings.prefix}); reading MEMNET_PARTITIONS={total} partitions",
            file=err,
        )
    chosen = sorted(set(partitions)) if partitions else list(range(total))
    wrong = [p for p in chosen if not 0 <= p < total]
    if wrong:
        print(f"memnet dead: no partition {wrong[0]} (there are {total}: 0..{total - 1})", file=err)
        return 2
    letters, newest = recent(client, keys, chosen, count)
    for letter in letters:
        _print(letter, as_json, out)
    if not letters and not follow_new:
        print(
            f"no dead letters under prefix {settings.prefix} (partitions {_span(chosen)})", file=err
        )
    if follow_new:
        for letter in follow(client, keys, newest, block_ms, stop):
            _print(letter, as_json, out)
    return 0


def _span(partitions: list[int]) -> str:
    if partitions == list(range(partitions[0], partitions[-1] + 1)) and len(partitions) > 2:
        return f"{partitions[0]}..{partitions[-1]}"
    return ",".join(map(str, partitions))


def _print(letter: DeadLetter, as_json: bool, out: IO[str]) -> None:
    line = json.dumps(asdict(letter), ensure_ascii=False) if as_json else letter.line()
    print(line, file=out, flush=True)


def at_least_zero(value: str) -> int:
    """An argparse type: a count of 0 or more."""
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return n


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``memnet dead`` on the CLI's subparsers."""
    p = sub.add_parser(
        "dead",
        help="print dead letters (refused input) with their reasons",
        description="Dead letters of PREFIX:{p}:dead, oldest first, one a line: entry id,\n"
        "partition, op and memory (when the original message had them), and the reason\n"
        "it was refused.",
    )
    p.add_argument(
        "--partition", type=int, action="append", metavar="P", help="only these (repeatable)"
    )
    p.add_argument("--follow", "-f", action="store_true", help="then print new ones as they come")
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON lines: partition, entry, error, memory, op, id, raw_bytes",
    )
    p.add_argument(
        "--count",
        type=at_least_zero,
        default=20,
        metavar="N",
        help="the N newest (default %(default)s; 0: all)",
    )
    p.set_defaults(run=cmd_dead)


def cmd_dead(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    try:
        return show(
            settings, args.partition, count=args.count, follow_new=args.follow, as_json=args.json
        )
    except BrokenPipeError:  # piped into head: stop quietly
        quiet_stdout()
        return 0


def quiet_stdout() -> None:
    """Whoever read stdout went away (``| head``): send the rest, and Python's flush at exit,
    to /dev/null instead of a BrokenPipeError traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# ---- the worker's warning ---------------------------------------------------------------------
def log_dead_letters(
    throttled: Throttled, partition: int, dead: Sequence[tuple[str, bytes]]
) -> None:
    """Warn that a committed batch dead-lettered input: once, then at most once a minute
    (``Throttled``, one key for all partitions, with the count of lines held back); each line
    names the batch's first dead letter and how to see them all."""
    if not dead:
        return
    entry_id, msg = dead[0]
    letter = decode(partition, entry_id, msg)
    about = f" (memory {_printable(letter.memory)})" if letter.memory is not None else ""
    throttled.log(
        "dead-letters",
        logging.WARNING,
        "partition %d: %d input entr%s dead-lettered; the first, %s%s: %s "
        "(`memnet dead --partition %d` lists them)",
        partition,
        len(dead),
        "y" if len(dead) == 1 else "ies",
        letter.entry,
        about,
        letter.error,
        partition,
    )
