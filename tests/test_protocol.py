"""The wire protocol's decoding and routing (unit level, no Redis)."""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import msgpack
import numpy as np
import pytest

from worker.protocol import (
    BadMessage,
    Keys,
    answer_message,
    decode,
    deleted_message,
    pack,
    partition_of,
)


def test_routing_is_standard_crc32_mod_partitions():
    # The CRC-32 check value (zlib, gzip, Java's CRC32, Node's zlib.crc32 all agree).
    assert partition_of("123456789", 1 << 30) == 0xCBF43926 % (1 << 30)
    assert partition_of("alpha", 8) == 0xD0E0396A % 8 == zlib.crc32(b"alpha") % 8
    assert partition_of("γάμμα", 7) == zlib.crc32("γάμμα".encode()) % 7


def test_keys_carry_the_partition_in_a_hash_tag():
    keys = Keys("memnet")
    assert keys.inp(3) == "memnet:{3}:in" and keys.out(3) == "memnet:{3}:out"
    assert keys.dead(12) == "memnet:{12}:dead" and keys.meta == "memnet:meta"


def ok(message, partitions=8):
    raw = pack(message)
    return decode(raw, partition_of(message["memory"], partitions), partitions, 1 << 20)


def test_valid_messages_decode():
    w = ok({"op": "write", "memory": "m", "x": [1, 2.5]})
    assert w.op == "write" and w.x == [1, 2.5] and w.query_id is None
    q = ok({"op": "query", "memory": "m", "id": "a", "q": np.ones(3, "<f4").tobytes()})
    assert q.query_id == "a" and q.q.dtype == np.float32 and list(q.q) == [1, 1, 1]
    t = ok({"op": "query", "memory": "m", "id": "a", "text": "where is mary?", "extra": 1})
    assert t.text == "where is mary?"


BAD = [
    (b"\xc1", "not valid msgpack"),
    (pack([1, 2]), "must be a msgpack map"),
    (pack({"op": "erase", "memory": "m"}), "unknown op 'erase'"),
    (pack({"op": "write", "x": [1]}), "'memory' must be a non-empty string"),
    (pack({"op": "write", "memory": "", "x": [1]}), "'memory' must be a non-empty string"),
    (pack({"op": "write", "memory": "m" * 257, "x": [1]}), "longer than 256 bytes"),
    (pack({"op": "write", "memory": "a\x00b", "x": [1]}), "cannot contain the character U+0000"),
    (pack({"op": "write", "memory": "m", "x": [1, "2"]}), "array of numbers"),
    (pack({"op": "write", "memory": "m", "x": [True]}), "array of numbers"),
    (pack({"op": "write", "memory": "m", "x": b"abc"}), "multiple of 4 bytes"),
    (pack({"op": "write", "memory": "m", "x": {"a": 1}}), "array of numbers or float32 bin"),
    (pack({"op": "write", "memory": "m"}), "exactly one of 'x' and 'text'"),
    (pack({"op": "query", "memory": "m", "x": [1]}), "non-empty string 'id'"),
    (pack({"op": "query", "memory": "m", "id": 5, "x": [1]}), "non-empty string 'id'"),
    (pack({"op": "query", "memory": "m", "id": "a"}), "exactly one of 'x', 'q' and 'text'"),
    (pack({"op": "query", "memory": "m", "id": "a", "x": [1], "q": [1]}), "exactly one of"),
    (pack({"op": "delete"}), "'memory' must be a non-empty string"),
    (pack({"op": "delete", "memory": ""}), "'memory' must be a non-empty string"),
    (pack({"op": "delete", "memory": "m", "x": [1]}), "a delete carries no 'x'"),
    (pack({"op": "delete", "memory": "m", "q": [1]}), "a delete carries no 'q'"),
    (pack({"op": "delete", "memory": "m", "text": "mary"}), "a delete carries no 'text'"),
    (pack({"op": "delete", "memory": "m", "id": 5}), "'id', when given, must be a non-empty"),
    (pack({"op": "delete", "memory": "m", "id": ""}), "'id', when given, must be a non-empty"),
    (pack({"op": "delete", "memory": "m", "id": None}), "'id', when given, must be a non-empty"),
    (
        msgpack.packb({"op": "write", "memory": "m", "x": msgpack.ExtType(1, b"z")}),
        "not valid msgpack",
    ),
    (msgpack.packb({1: 2}), "not valid msgpack"),
    (None, "no 'msg' field"),
]


@pytest.mark.parametrize("raw, reason", BAD)
def test_bad_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(BadMessage) as e:
        decode(raw, partition_of("m", 8), 8, 1 << 20)
    assert reason in e.value.reason


def test_deletes_decode_with_and_without_an_id():
    d = ok({"op": "delete", "memory": "m"})
    assert (d.op, d.memory, d.query_id) == ("delete", "m", None)
    assert d.x is None and d.q is None and d.text is None
    d = ok({"op": "delete", "memory": "γάμμα", "id": "d1", "extra": 1})
    assert (d.op, d.memory, d.query_id) == ("delete", "γάμμα", "d1")
    raw = pack({"op": "delete", "memory": "m"})
    home = partition_of("m", 8)
    with pytest.raises(BadMessage, match=f"routes to partition {home}"):
        decode(raw, (home + 1) % 8, 8, 1 << 20)


def test_a_bad_delete_with_an_id_keeps_it_for_the_error_response():
    with pytest.raises(BadMessage) as e:
        ok({"op": "delete", "memory": "m", "id": "d2", "x": [1]})
    assert (e.value.query_id, e.value.memory) == ("d2", "m")


def test_wrong_partition_and_size_limit():
    raw = pack({"op": "write", "memory": "m", "x": [1.0]})
    home = partition_of("m", 8)
    with pytest.raises(BadMessage, match=f"routes to partition {home}, not {(home + 1) % 8}"):
        decode(raw, (home + 1) % 8, 8, 1 << 20)
    with pytest.raises(BadMessage, match="over the limit of 10"):
        decode(raw, home, 8, 10)


def test_bad_message_keeps_its_id_and_memory_for_the_error_response():
    with pytest.raises(BadMessage) as e:
        decode(
            pack({"op": "query", "memory": "m", "id": "abc", "x": "no"}),
            partition_of("m", 8),
            8,
            1 << 20,
        )
    assert (e.value.query_id, e.value.memory) == ("abc", "m")


def test_answers_carry_float32_values_exactly():
    y = np.array([1 / 3, -2.5e-7], np.float32)
    back = msgpack.unpackb(answer_message("i", "m", y, np.array([3, 1]), y, {}), raw=False)
    assert np.array_equal(np.array(back["y"], np.float32), y) and back["slots"] == [3, 1]


def test_the_deleted_response_round_trips():
    back = msgpack.unpackb(deleted_message("d1", "γάμμα"), raw=False)
    assert back == {"id": "d1", "memory": "γάμμα", "deleted": True}


def packb(obj):
    return msgpack.packb(obj, use_bin_type=True, use_single_float=True)


TINY = float(np.finfo(np.float32).tiny)
VALUES = [
    {"id": "a", "memory": "γάμμα", "deleted": True},
    {"entry": "1-2", "error": "bad", "raw": b"\x00\xff" * 40_000},  # grows the buffer
    {"entry": "1-3", "error": "e", "raw": None},  # and the next one is not polluted by it
    {"f": [0.0, -0.0, TINY, -TINY / 2, 5e-45, 3.4e38, float("nan"), float("inf")]},
    {"i": [0, 127, 128, -1, -32, -33, 2**31, 2**63 - 1, -(2**63), 2**64 - 1]},
    {"s": "x" * 31, "t": "y" * 32, "u": "z" * 70_000, "n": None, "b": False, "l": [[], {}]},
    {f"k{j}": j for j in range(20)},
    [1, 2.5, "three"],
    "text",
]


def test_pack_is_msgpack_packb_with_the_protocol_options():
    for value in VALUES + VALUES:  # twice: a reused packer keeps giving the same bytes
        assert pack(value) == packb(value)
    with pytest.raises(TypeError):
        pack({"bad": object()})
    with pytest.raises(OverflowError):  # as packb: a double beyond float32 is refused
        pack({"y": [1.0, 1e39]})
    assert pack(VALUES[0]) == packb(VALUES[0])  # (a failed pack leaves nothing behind)


def test_pack_from_many_threads_at_once():
    def work(i):
        return [pack({"id": str(i), "n": j, "y": [float(j)] * i}) for j in range(200)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(16)))
    for i, got in enumerate(results):
        assert got == [packb({"id": str(i), "n": j, "y": [float(j)] * i}) for j in range(200)]


def test_answer_messages_are_the_maps_msgpack_packs():
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2**32, (200, 13), dtype=np.uint64).astype(np.uint32)
    bits[::5, :4] &= 0x807FFFFF  # subnormals and zeros of both signs
    floats = bits.view(np.float32)
    extras = [{}, {"answer": "kitchen", "answers": ["kitchen"]}, {"n": 2**64 - 1}, {"y": 1}]
    for i, row in enumerate(floats):
        y, weights = row[:8], row[8:]
        slots = rng.integers(-(2**40), 2**40, 5) if i % 3 else rng.integers(0, 64, 5)
        extra = extras[i % len(extras)]
        expected = packb(
            {
                "id": f"q{i}",
                "memory": "m" * i,
                "y": y.tolist(),
                "slots": slots.tolist(),
                "weights": weights.tolist(),
                **extra,
            }
        )
        assert answer_message(f"q{i}", "m" * i, y, slots, weights, extra) == expected


@pytest.mark.parametrize(
    "message, limit, reason",
    [
        ({"op": "query", "memory": "m", "id": "q", "x": [1.0] * 300}, 100, "over the limit of 100"),
        (
            {"x": [1.0], **{f"k{i}": i for i in range(70)}, "id": "q", "memory": "m"},
            1 << 20,
            "message map has 73 keys, over the limit of 64",
        ),
        ({1: [2], "memory": "m", "id": "q"}, 1 << 20, "not valid msgpack"),
    ],
)
def test_a_message_refused_before_decoding_still_names_its_id_and_memory(message, limit, reason):
    """Over the size limit, over 64 keys, or a key that is not a string: refused before
    the map is decoded; the id and memory are read from it (skipping the values), so the
    query still gets its error response (it waited out its timeout before)."""
    with pytest.raises(BadMessage) as e:
        decode(msgpack.packb(message), partition_of("m", 8), 8, limit)
    assert reason in e.value.reason
    assert (e.value.query_id, e.value.memory) == ("q", "m")
    with pytest.raises(BadMessage) as e:  # an id that is not a string: none
        decode(msgpack.packb({**message, "id": 7}), partition_of("m", 8), 8, limit)
    assert (e.value.query_id, e.value.memory) == (None, "m")


def test_a_huge_refused_message_is_peeked_at_its_head_only():
    """_peek reads the first 256 keys and 64 KiB at most: a hostile 500,000-key map (or a
    message of hundreds of MB, which Redis accepts) is not walked key by key. A memory
    named past either limit is not seen; the id at the head is."""
    from worker.protocol import _peek

    def huge(fill: int, value: bytes = b"\xc0") -> bytes:
        keys = fill + 2
        head = b"\xdf" + keys.to_bytes(4, "big") + msgpack.packb("id") + msgpack.packb("q")
        body = b"".join(msgpack.packb(i) + value for i in range(fill))
        return head + body + msgpack.packb("memory") + msgpack.packb("m")

    assert _peek(huge(10)) == (12, "q", "m")
    assert _peek(huge(300)) == (302, "q", None)  # (past 256 keys)
    assert _peek(huge(20, msgpack.packb("z" * 4000))) == (22, "q", None)  # (past 64 KiB)
    assert _peek(huge(500_000))[:2] == (500_002, "q")
