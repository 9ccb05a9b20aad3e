"""The wire protocol, version 1 (docs/protocol.md is the contract for producers).

Keys (``{p}`` is the partition number in a Redis Cluster hash tag):
  <prefix>:meta          hash: partitions, protocol, model, deploying, previous, dims,
                         components (worker/meta.py)
  <prefix>:{p}:in        input stream (writes, queries, deletes), consumer group "memnet"
  <prefix>:{p}:out       responses, each at the stream id of its query (or delete with an id)
  <prefix>:{p}:dead      dead letters, each at the stream id of its input entry
  <prefix>:{p}:lease|epoch|taker|offset|trimmed    ownership and bookkeeping
  <prefix>:{p}:unarchived                     the last trim point of a worker with
                         MEMNET_ARCHIVE=0 (memnet rebuild refuses the history before it)
  <prefix>:{p}:model|switch|deploying|serve   the model serving it, where it switched last,
                         the model being deployed, the only model that may take it once
                         deployed (worker/upgrade.py)
  <prefix>:deploy        held by the one memnet deploy or rebuild running
A memory named ``name`` lives in partition ``crc32(utf8(name)) mod partitions``.
"""

from __future__ import annotations

import contextlib
import threading
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack
import numpy as np

PROTOCOL = 1
GROUP = "memnet"
MAX_NAME_BYTES = 256
MAX_KEYS = 64  # keys of a message map at most (decoding refuses more)
OPS = ("write", "query", "delete")
_LE_F4, _F32 = np.dtype("<f4"), np.dtype(np.float32)  # (dtype objects: no parsing per call)


@dataclass(frozen=True)
class Keys:
    prefix: str

    @property
    def meta(self) -> str:
        return f"{self.prefix}:meta"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def deploy(self) -> str:
        return f"{self.prefix}:deploy"

    def part(self, p: int, name: str) -> str:
        return f"{self.prefix}:{{{p}}}:{name}"

    def inp(self, p: int) -> str:
        return self.part(p, "in")

    def out(self, p: int) -> str:
        return self.part(p, "out")

    def dead(self, p: int) -> str:
        return self.part(p, "dead")


def partition_of(name: str, partitions: int) -> int:
    """crc32(utf8(name)) mod partitions: the same in every language's standard CRC-32."""
    return zlib.crc32(name.encode("utf-8")) % partitions


def parse_id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class BadMessage(Exception):
    """An entry that cannot be applied; becomes a dead letter (and an error response)."""

    def __init__(self, reason: str, query_id: str | None = None, memory: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.query_id = query_id
        self.memory = memory


class Message(NamedTuple):  # (one per entry: a tuple is made in 1/3 of a dataclass's time)
    op: str  # "write", "query" or "delete"
    memory: str
    query_id: str | None  # a query's id; a delete's when it asks for a response
    x: Any = None  # input-space vector (numbers, or float32 from bin); text is in ``text``
    q: np.ndarray | None = None  # memory-space query vector
    text: str | None = None


def _reject_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not allowed")


def unpack(raw: bytes, max_bytes: int) -> Any:
    """The message's map (or whatever it holds); BadMessage if it is over max_bytes, not
    msgpack, or a map of more than MAX_KEYS keys. Those are refused before the message is
    decoded, so its id (for the error response) and memory are read from it by _peek."""
    if len(raw) > max_bytes:
        keys, query_id, memory = _peek(raw)
        raise BadMessage(
            f"message is {len(raw)} bytes, over the limit of {max_bytes}", query_id, memory
        )
    try:
        return msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            ext_hook=_reject_ext,
            timestamp=0,
            max_map_len=MAX_KEYS,
            max_ext_len=0,
        )
    except Exception as e:  # msgpack raises many kinds; each means a bad message
        keys, query_id, memory = _peek(raw)
        if keys is not None and keys > MAX_KEYS:
            reason = f"message map has {keys} keys, over the limit of {MAX_KEYS}"
        else:
            reason = f"not valid msgpack ({type(e).__name__})"
        raise BadMessage(reason, query_id, memory) from None


_STR_TYPES = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}  # fixstr, str 8/16/32


_PEEK_BYTES, _PEEK_KEYS = 1 << 16, 256  # what _peek reads of a message at most


def _peek(raw: bytes) -> tuple[int | None, str | None, str | None]:
    """(keys, id, memory) of a message refused before decoding, read without decoding
    anything else: values are skipped, and only keys and those two values that are strings
    are decoded (a string costs no more than its bytes). None where it cannot tell. Only
    the first _PEEK_BYTES and _PEEK_KEYS are looked at, so a huge message costs no more
    than a small one (producers put id and memory first, as the clients do)."""
    keys, found = None, {}
    head = raw[:_PEEK_BYTES]
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(head), 1))
    with contextlib.suppress(Exception):  # (not a map, or cut short: what was found so far)
        unpacker.feed(head)
        keys = unpacker.read_map_header()
        for _ in range(min(keys, _PEEK_KEYS)):
            if head[unpacker.tell()] not in _STR_TYPES:
                unpacker.skip()  # (a key that is not a string)
                unpacker.skip()
                continue
            key = unpacker.unpack()
            if key in ("id", "memory") and head[unpacker.tell()] in _STR_TYPES:
                found.setdefault(key, unpacker.unpack())
            else:
                unpacker.skip()
    query_id, memory = found.get("id"), found.get("memory")
    return keys, query_id or None, memory or None


def vector(value: Any, field: str) -> Any:
    """A wire vector: a msgpack array of numbers (checked by memnet) or bin of float32 LE."""
    if isinstance(value, bytes):
        if len(value) % 4:
            raise BadMessage(
                f"'{field}' bin must hold little-endian float32 "
                f"(a multiple of 4 bytes), got {len(value)} bytes"
            )
        if _LE_F4 == _F32:  # (a little-endian host: read in place, read-only over bytes)
            return np.frombuffer(value, _F32)
        return np.frombuffer(value, _LE_F4).astype(_F32)
    if isinstance(value, list):
        if not all(type(v) in (int, float) for v in value):
            raise BadMessage(f"'{field}' must be an array of numbers")
        return value
    raise BadMessage(
        f"'{field}' must be an array of numbers or float32 bin, got {type(value).__name__}"
    )


def decode(
    raw: bytes | None, partition: int, partitions: int, max_bytes: int, queries: bool = True
) -> Message | None:
    """Check one entry's ``msg`` field; raises BadMessage with the reason. queries=False:
    None for a query, unchecked (a rebuild, which changes memories and answers nothing)."""
    if raw is None:
        raise BadMessage("entry has no 'msg' field")
    data = unpack(raw, max_bytes)
    if not isinstance(data, dict):
        raise BadMessage(f"message must be a msgpack map, got {type(data).__name__}")
    if not queries and data.get("op") == "query":
        return None
    query_id = data.get("id")
    memory = data.get("memory")
    if not isinstance(query_id, str):
        query_id = None
    if not isinstance(memory, str):
        memory = None
    try:
        return _check(data, memory, query_id, partition, partitions)
    except BadMessage as e:
        raise BadMessage(e.reason, query_id, memory) from None


def _check(
    data: dict[str, Any], memory: str | None, query_id: str | None, partition: int, partitions: int
) -> Message:
    op = data.get("op")
    if op not in OPS:
        raise BadMessage(f"unknown op {op!r} (expected 'write', 'query' or 'delete')")
    name = _name(memory)
    home = zlib.crc32(name) % partitions  # partition_of(memory, partitions)
    if home != partition:
        raise BadMessage(f"memory {memory!r} routes to partition {home}, not {partition}")
    inputs: list[str] = [k for k in ("x", "q", "text") if k in data]
    if op == "delete":
        return _delete(data, memory, inputs)
    if op == "write":
        if inputs not in (["x"], ["text"]):
            raise BadMessage("a write needs exactly one of 'x' and 'text'")
        return _payload(data, "write", memory, None, inputs[0])
    if query_id is None or not query_id:
        raise BadMessage("a query needs a non-empty string 'id'")
    if len(inputs) != 1:
        raise BadMessage("a query needs exactly one of 'x', 'q' and 'text'")
    return _payload(data, "query", memory, query_id, inputs[0])


def _name(memory: str | None) -> bytes:
    """A memory name's UTF-8 bytes, checked."""
    if memory is None or not memory:
        raise BadMessage("'memory' must be a non-empty string")
    name = memory.encode("utf-8")
    if len(name) > MAX_NAME_BYTES:
        raise BadMessage(f"'memory' is longer than {MAX_NAME_BYTES} bytes")
    if "\x00" in memory:  # (SQLite's JSON functions end a string there: "a\0b" read as "a")
        raise BadMessage("'memory' cannot contain the character U+0000")
    return name


def _delete(data: dict[str, Any], memory: str, inputs: list[str]) -> Message:
    """A delete: a memory name, no input, and an optional id asking for a response."""
    if inputs:
        raise BadMessage(f"a delete carries no {inputs[0]!r}")
    query_id = data.get("id")
    if "id" in data and not (isinstance(query_id, str) and query_id):
        raise BadMessage("a delete's 'id', when given, must be a non-empty string")
    return Message("delete", memory, query_id)


def _payload(
    data: dict[str, Any], op: str, memory: str, query_id: str | None, field: str
) -> Message:
    if field == "text":
        if not isinstance(data["text"], str):
            raise BadMessage("'text' must be a string")
        return Message(op, memory, query_id, None, None, data["text"])
    if field == "q":
        return Message(op, memory, query_id, None, vector(data["q"], "q"))
    return Message(op, memory, query_id, vector(data["x"], "x"))


_packers = threading.local()  # one msgpack.Packer per thread, made once


def pack(obj: Any) -> bytes:
    """msgpack.packb(obj, use_bin_type=True, use_single_float=True): the same bytes, without
    making a Packer (and its 256 KiB buffer) per message. The thread's packer is taken out
    while it packs, so a nested call (never expected) gets a fresh one."""
    packer = _packers.__dict__.pop("packer", None)
    if packer is None:
        packer = msgpack.Packer(use_bin_type=True, use_single_float=True)
    try:
        return packer.pack(obj)  # (autoreset: returns the bytes, empties the buffer)
    finally:
        _packers.packer = packer


def answer_message(
    query_id: str,
    memory: str,
    y: np.ndarray,
    slots: np.ndarray,
    weights: np.ndarray,
    extra: dict[str, Any],
) -> bytes:
    return pack(
        {
            "id": query_id,
            "memory": memory,
            "y": y.tolist(),
            "slots": slots.tolist(),
            "weights": weights.tolist(),
            **extra,
        }
    )


def deleted_message(query_id: str, memory: str) -> bytes:
    """The response to a delete that carried an id, published once it is applied."""
    return pack({"id": query_id, "memory": memory, "deleted": True})


def error_message(query_id: str, memory: str | None, error: str) -> bytes:
    return pack({"id": query_id, "memory": memory, "error": error})


def dead_letter(entry_id: str, error: str, raw: bytes | None) -> bytes:
    return pack({"entry": entry_id, "error": error, "raw": raw})
