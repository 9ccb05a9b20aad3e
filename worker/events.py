"""What a client may send: the deployment's record (``PREFIX:meta``), events checked against
it before they leave, and the errors clients raise. Shared by the blocking and the asyncio
clients (worker/client.py); imports neither JAX nor memnet.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.connection import text
from worker.protocol import MAX_KEYS, MAX_NAME_BYTES, OPS, partition_of

Response = dict[str, Any]
TEXT_ENCODERS = frozenset({"position-bow"})  # memnet's text I components (add new ones here)
# a word as memnet.text.tokenize finds it (a copy; tests/test_text.py holds them together)
_MARKS = "\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
_WORD = re.compile(rf"\w[\w{_MARKS}]*(?:'\w[\w{_MARKS}]*)*")
_APOSTROPHES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "\uff07": "'"})


def words_in(text: str) -> int:
    """How many words memnet reads in text (memnet.text.tokenize's count)."""
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
        text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    return sum(1 for _ in _WORD.finditer(text.lower()))


# ---- errors -------------------------------------------------------------------------------
class ClientError(Exception):
    """Root of every error the clients raise on purpose."""


class NoDeployment(ClientError, LookupError):
    """PREFIX:meta is missing: no worker ever ran under this prefix (live workers re-assert
    it within a second or two if it was deleted)."""


class InvalidEvent(ClientError, ValueError):
    """An event the deployment would refuse (the message says why); nothing was sent."""


class QueryTimeout(ClientError, TimeoutError):
    """No response arrived in time (is a worker running?)."""


class ResponseTrimmed(QueryTimeout):
    """The response was published and has since been trimmed from the out stream (more
    than MEMNET_RESPONSE_MAXLEN responses came after it before it was read)."""


class MemnetError(ClientError):
    """A query (or a delete sent with an id) was answered with an error response
    (docs/protocol.md, "Invalid input").

    ``response`` is that response (``{"id", "memory", "error"}``); ``error`` the reason.
    """

    def __init__(self, response: Response) -> None:
        self.response = response
        self.error = str(response.get("error"))
        super().__init__(f"query on memory {response.get('memory')!r} failed: {self.error}")


# ---- the deployment and event checks (pure, shared by both clients and produce) ---------
@dataclass(frozen=True)
class Deployment:
    """What clients need of ``PREFIX:meta``: the partition count for routing, and the
    model's dimensions and encoder for checking events. Fields an older deployment's
    record lacks are None, and their checks are skipped."""

    partitions: int
    input_dim: int | None = None
    memory_dim: int | None = None
    encoder: str | None = None  # the I component, first of the record's "components"

    @classmethod
    def from_meta(cls, values: Mapping[Any, Any], key: str) -> Deployment:
        """Parse an HGETALL reply of the record named key; raises NoDeployment if empty."""
        meta = {text(k): text(v) for k, v in values.items()}
        if "partitions" not in meta:
            raise NoDeployment(
                f"{key} does not exist: start a worker first (it records the partition count)"
            )
        components = meta.get("components")
        return cls(
            partitions=int(meta["partitions"]),
            input_dim=_maybe_int(meta.get("input_dim")),
            memory_dim=_maybe_int(meta.get("memory_dim")),
            encoder=components.split(",")[0] if components else None,
        )

    @property
    def reads_text(self) -> bool | None:
        """Whether the model reads text (True) or vectors (False); None if unknown."""
        return None if self.encoder is None else self.encoder in TEXT_ENCODERS

    def partition(self, memory: str) -> int:
        """The partition a memory lives in."""
        return partition_of(memory, self.partitions)

    def prepare(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The event checked and ready to pack (vectors as float32 little-endian bytes);
        raises InvalidEvent saying what is wrong."""
        op = event.get("op")
        if op not in OPS:
            raise InvalidEvent(f"unknown op {op!r} (expected 'write', 'query' or 'delete')")
        _check_maps(event, None)
        _check_name(event.get("memory"))
        if op == "delete":
            return _delete(event)
        if op == "query" and not (isinstance(event.get("id"), str) and event["id"]):
            raise InvalidEvent("a query needs a non-empty string 'id'")
        field = _input_field(op, event)
        return {**event, field: self._input(field, event[field])}

    def _input(self, field: str, value: Any) -> Any:
        if field == "text":
            return self._text(value)
        if field == "q":
            return _wire_vector(value, self.memory_dim, "q", "memory_dim")
        if self.reads_text:
            raise InvalidEvent(
                f"this deployment's model reads text (encoder {self.encoder!r}): send text, "
                "not a vector 'x' (or a memory-space 'q')"
            )
        return _wire_vector(value, self.input_dim, "x", "input_dim")

    def _text(self, value: Any) -> str:
        if not isinstance(value, str):
            raise InvalidEvent(f"'text' must be a string, got {type(value).__name__}")
        if self.reads_text is False:
            raise InvalidEvent(
                f"this deployment's model reads vectors (encoder {self.encoder!r}), not text: "
                f"send 'x' ({self.input_dim or 'input_dim'} numbers)"
            )
        words = words_in(value)
        if not words:
            raise InvalidEvent("'text' has no words")
        if self.reads_text and self.input_dim is not None and words > self.input_dim:
            raise InvalidEvent(
                f"'text' has {words} words; this model reads at most {self.input_dim}"
            )
        return value


def _maybe_int(value: str | None) -> int | None:
    return None if value is None else int(value)


def _utf8(value: str, field: str) -> bytes:
    """The string as UTF-8; InvalidEvent if it cannot be (a lone surrogate, as Python reads
    some invalid input): msgpack could not send it."""
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidEvent(
            f"'{field}' is not valid Unicode (a lone surrogate at {e.start})"
        ) from None


def _check_maps(value: Any, field: str | None) -> None:
    """What a worker's decoding refuses, refused before sending: a map (the event, field
    None, or one nested in a field's value) of more than MAX_KEYS keys or with a key that
    is not a string, and a string that is not valid Unicode."""
    where = "the event" if field is None else f"'{field}'"
    if isinstance(value, str):
        _utf8(value, str(field))
    elif isinstance(value, Mapping):
        if len(value) > MAX_KEYS:
            raise InvalidEvent(f"{where} has {len(value)} keys: a map holds at most {MAX_KEYS}")
        for key, item in value.items():
            if isinstance(key, bytes):  # (msgpack bin: a worker's decoding takes it)
                _check_maps(item, field)
                continue
            if not isinstance(key, str):
                raise InvalidEvent(f"{where} has a key that is not a string: {key!r}")
            _utf8(key, key)
            _check_maps(item, key if field is None else field)
    elif isinstance(value, list | tuple):
        for item in value:
            if not isinstance(item, int | float):  # (a vector's numbers: no call each)
                _check_maps(item, field)


def _check_name(memory: Any) -> None:
    if not isinstance(memory, str) or not memory:
        raise InvalidEvent("'memory' must be a non-empty string")
    if len(_utf8(memory, "memory")) > MAX_NAME_BYTES:
        raise InvalidEvent(f"'memory' is longer than {MAX_NAME_BYTES} bytes")
    if "\x00" in memory:
        raise InvalidEvent("'memory' cannot contain the character U+0000")


def _delete(event: Mapping[str, Any]) -> dict[str, Any]:
    """A delete checked: no input, and an id (asking for a response) only if a string."""
    given = [k for k in ("x", "q", "text") if k in event]
    if given:
        raise InvalidEvent(f"a delete carries no {given[0]!r}")
    if "id" in event and not (isinstance(event["id"], str) and event["id"]):
        raise InvalidEvent("a delete's 'id', when given, must be a non-empty string")
    return dict(event)


def _input_field(op: str, event: Mapping[str, Any]) -> str:
    """The one input an event carries: 'x' or 'text', or for a query also 'q'."""
    allowed = ("x", "text") if op == "write" else ("x", "q", "text")
    given = [k for k in ("x", "q", "text") if k in event]
    if len(given) != 1 or given[0] not in allowed:
        names = " and ".join(repr(k) for k in allowed)
        raise InvalidEvent(f"a {op} needs exactly one of {names}, got {given or 'none'}")
    return given[0]


def _wire_vector(value: Any, length: int | None, field: str, dim: str) -> bytes:
    """A vector as float32 little-endian bytes, checked: numbers, ``length`` of them (the
    model's ``dim``; any when None), all finite in float32. Raises InvalidEvent."""
    array = _numbers(value, field)
    if length is not None and array.shape[0] != length:
        raise InvalidEvent(
            f"'{field}' must have {length} numbers (the model's {dim}), got {array.shape[0]}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        vector = np.ascontiguousarray(array, "<f4")
    if not np.isfinite(vector).all():
        raise InvalidEvent(f"'{field}' has non-finite values (NaN, inf or beyond float32)")
    return vector.tobytes()


def _numbers(value: Any, field: str) -> np.ndarray:
    if isinstance(value, bytes):
        if len(value) % 4:
            raise InvalidEvent(f"'{field}' bytes must hold float32 values, got {len(value)} bytes")
        return np.frombuffer(value, "<f4")
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf":
        return value
    if isinstance(value, list | tuple) and all(_is_number(v) for v in value):
        try:
            return np.asarray(value, np.float64)
        except OverflowError:  # (an int beyond float64)
            raise InvalidEvent(
                f"'{field}' has non-finite values (NaN, inf or beyond float32)"
            ) from None
    raise InvalidEvent(
        f"'{field}' must be a flat sequence of numbers or float32 bytes, got {type(value).__name__}"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def write_event(memory: str, x: Any = None, text_input: str | None = None) -> dict[str, Any]:
    """A write event, unchecked (``Deployment.prepare`` checks it)."""
    return _with_inputs({"op": "write", "memory": memory}, x=x, text=text_input)


def query_event(
    memory: str, x: Any = None, q: Any = None, text_input: str | None = None
) -> dict[str, Any]:
    """A query event with a fresh id, unchecked (``Deployment.prepare`` checks it)."""
    event = {"op": "query", "memory": memory, "id": uuid.uuid4().hex}
    return _with_inputs(event, x=x, q=q, text=text_input)


def delete_event(memory: str, id: str | None = None) -> dict[str, Any]:
    """A delete event, unchecked (``Deployment.prepare`` checks it). With an id, the worker
    publishes ``{"id", "memory", "deleted": True}`` at its entry id once it is applied."""
    event = {"op": "delete", "memory": memory}
    return event if id is None else {**event, "id": id}


def _with_inputs(event: dict[str, Any], **inputs: Any) -> dict[str, Any]:
    return {**event, **{k: v for k, v in inputs.items() if v is not None}}


# ---- reading responses (pure, shared) -----------------------------------------------------
