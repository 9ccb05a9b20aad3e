"""The memory codec: one memory to bytes and back, exactly (nothing pickled).

A memory blob is a safetensors file in memory: ``slots`` [n] int64 and ``rows`` [n, M]
float32 are the slots changed since ``memory_init`` (exact memories, small ones as arena
rows or not) or since the memory's graph base was built (graph memories), with their
current vectors; the header's metadata
holds the memory's name, kind, write count and the snapshot that made it (so two versions
of a memory never share a blob, and dropping one never drops another). A graph memory that
re-indexed also needs its base: two more blobs, its vectors and filled flags
(safetensors) and hnswlib's index file, kept as long as the base is unchanged.

Decoding checks every shape and value against the engine's model before anything reaches
the search structures, and raises SnapshotError naming what does not fit.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from memnet.dense import DenseSlots
from memnet.engine import Engine
from memnet.errors import SnapshotError
from memnet.graph import GraphBase
from memnet.memory import Memory
from memnet.search import ExactSlots, GraphSlots


@dataclass(frozen=True)
class Decoded:
    name: str
    kind: str  # "exact" or "graph"
    writes: int
    slots: np.ndarray  # [n] int64
    rows: np.ndarray  # [n, M] float32


def encode_memory(name: str, memory: Memory, made: str) -> bytes:
    """The memory's blob; ``made`` names the snapshot writing it ("epoch-serial")."""
    search = memory.search
    if isinstance(search, ExactSlots | DenseSlots):  # the same blob for both
        kind, slots = "exact", np.flatnonzero(search.changed)
        rows = search.vectors(slots)
    else:
        kind, (slots, rows) = "graph", search.overlay()
    slots, rows = np.ascontiguousarray(slots, "<i8"), np.ascontiguousarray(rows, "<f4")
    return _memory_blob(name, kind, memory.writes, made, slots, rows)


def _memory_blob(
    name: str, kind: str, writes: int, made: str, slots: np.ndarray, rows: np.ndarray
) -> bytes:
    """The safetensors file of {"slots": slots [n] int64, "rows": rows [n, M] float32} with
    the metadata, written here: safetensors' numpy wrapper spends ~15 us a call on dtype
    names, three quarters of a small memory's encoding, and a snapshot encodes every memory
    it changed. The format (safetensors' spec): the header's length (u64 LE), the header
    (JSON: "__metadata__", then each tensor's dtype, shape and [begin, end) offsets into
    the data), padded with spaces to a multiple of 8, then the tensors' little-endian bytes
    end to end. safetensors itself reads it back (peek); tests check the two agree."""
    n, dim = rows.shape
    at, end = 8 * n, 8 * n + 4 * n * dim
    named = json.dumps(name, ensure_ascii=False)  # (raw UTF-8, as safetensors writes it)
    header = (
        f'{{"__metadata__":{{"name":{named},"kind":"{kind}","writes":"{writes}",'
        f'"made":{json.dumps(made)}}},'
        f'"slots":{{"dtype":"I64","shape":[{n}],"data_offsets":[0,{at}]}},'
        f'"rows":{{"dtype":"F32","shape":[{n},{dim}],"data_offsets":[{at},{end}]}}}}'
    ).encode()
    header += b" " * (-len(header) % 8)
    return b"".join((struct.pack("<Q", len(header)), header, slots.tobytes(), rows.tobytes()))


def peek(data: bytes, where: str) -> Decoded:
    """The blob's content, checked to be a memory blob (not yet against a model)."""
    try:
        arrays = st_load(data)
        meta = _metadata(data)
        slots, rows = arrays["slots"], arrays["rows"]
        return Decoded(meta["name"], meta["kind"], int(meta["writes"]), slots, rows)
    except (SafetensorError, KeyError, ValueError, TypeError) as e:
        raise SnapshotError(f"{where}: not a memory blob ({e})") from None


def decode_memory(data: bytes, engine: Engine, base: GraphBase | None, where: str) -> Memory:
    """The memory a blob holds; ``base`` is its own graph base (None: memory_init's)."""
    d = peek(data, where)
    cfg = engine.config
    n = len(d.slots)
    if (
        d.rows.shape != (n, cfg.memory_dim)
        or d.slots.dtype != np.int64
        or d.rows.dtype != np.float32
        or (n and (d.slots.min() < 0 or d.slots.max() >= cfg.slots))
        or len(np.unique(d.slots)) != n
    ):
        raise SnapshotError(f"{where}: arrays of memory {d.name!r} do not fit this model")
    if d.kind == "exact":
        memory = engine.new_memory()
        if not isinstance(memory.search, ExactSlots | DenseSlots):
            raise SnapshotError(f"{where}: an exact memory, but this model's are not")
        memory.search.set_many(d.slots, d.rows)
        memory.writes = d.writes
        return memory
    if d.kind != "graph" or cfg.slots <= cfg.index.exact_max_slots:
        raise SnapshotError(f"{where}: a {d.kind!r} memory does not fit this model")
    search = GraphSlots(engine.init_base() if base is None else base, cfg.index)
    for slot, row in zip(d.slots, d.rows, strict=True):
        search.set(int(slot), row)
    return Memory(search, d.writes)


def encode_base(base: GraphBase, name: str, made: str) -> tuple[bytes, bytes]:
    """A graph base as two blobs: its vectors and filled flags, and hnswlib's index file
    (as a uint8 array); both name the memory and the snapshot, like a memory blob, so no
    two memories or snapshots share one."""
    meta = {"name": name, "made": made, "base": base.id}
    arrays = st_save(
        {"vectors": base.vectors, "filled": base.filled.astype(np.uint8)}, metadata=meta
    )
    with tempfile.TemporaryDirectory() as tmp:  # hnswlib writes only to a path
        path = os.path.join(tmp, "index.hnsw")
        base.index.save_index(path)
        index = np.fromfile(path, np.uint8)
    if not len(index):
        raise SnapshotError(f"base {base.id}: hnswlib wrote no index")
    return arrays, st_save({"hnsw": index}, metadata=meta)


def decode_base(arrays: bytes, index: bytes, engine: Engine, base_id: str, where: str) -> GraphBase:
    cfg = engine.config
    try:
        loaded = st_load(arrays)
        hnsw = st_load(index).get("hnsw")
    except SafetensorError as e:
        raise SnapshotError(f"{where}: unreadable base ({e})") from None
    vectors, filled = loaded.get("vectors"), loaded.get("filled")
    if (
        vectors is None
        or filled is None
        or hnsw is None
        or vectors.shape != (cfg.slots, cfg.memory_dim)
        or vectors.dtype != np.float32
        or filled.shape != (cfg.slots,)
    ):
        raise SnapshotError(f"{where}: a graph base that does not fit this model")
    with tempfile.TemporaryDirectory() as tmp:  # hnswlib reads only from a path
        path = os.path.join(tmp, "index.hnsw")
        hnsw.tofile(path)
        return GraphBase.load(
            Path(path), np.array(vectors), filled.astype(bool), cfg.index, base_id
        )


def own_base(memory: Memory) -> GraphBase | None:
    """The memory's own graph base, if it re-indexed (None: exact, or memory_init's graph)."""
    search = memory.search
    if isinstance(search, GraphSlots) and not search.base.shared:
        return search.base
    return None


def _metadata(data: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta
