"""Small memories as rows of one arena, searched and updated many memories at a time.

A memory of at most ``dense_max_floats`` floats (slots x memory_dim; the engine's
threshold) costs more in per-event Python than in arithmetic: a 64 x 8 memory is 2 KiB, and
a nearest-slot search over it ~512 multiply-adds. Such memories live as rows of one
``Arena`` per engine: slot vectors [rows, S, M], filled and changed flags [rows, S] and
write counts [rows]. The engine runs G's nearest-slot search, gate and update and O's top-k
for all the rows a batch touches at once (``nearest`` and ``topk`` here, reading the rows in
place), and scatters the written slots back.

Results are the same, bit for bit, as searching each memory alone: distances are the
float32 ``(d * d).sum()`` over the last axis that ``memnet.distance.sqdist`` computes (numpy
reduces each row the same way whatever the leading shape; tests/test_dense.py checks it),
and slots are ranked by (distance, slot number) through integer keys: a non-negative
float32's bit pattern orders like its value, so ``bits << SHIFT | slot`` is unique per slot
and orders exactly as ``memnet.distance.rank`` does (+inf after every finite distance, the
lower slot first on ties; empty slots after every filled one).

``nearest`` and ``topk`` compute those keys and keep the smallest in C (``memnet._scan.rank``:
the same float32 roundings and numpy's pairwise summation order, one pass, no [N, S]
temporaries); ``keys`` and the ``reference_*`` functions are the numpy definition it is
tested against, bit for bit.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np

from memnet import _rows, _scan
from memnet.exact import Hint
from memnet.memory import Memory

_LAST = np.iinfo(np.int64).max  # the key of an empty slot: after every filled one


class Arena:
    """Rows of small memories; a row is taken for a new memory and given back when the
    memory is gone. Grows by doubling in place (the arrays are replaced: read through the
    arena, not views).
    Rows never taken are never touched, so only rows in use (at the most) are resident:
    fresh rows are set to memory_init BLOCK at a time as they are first taken, and a row
    given back is reset then."""

    BLOCK = 256

    def __init__(self, init: np.ndarray, starts_filled: bool, rows: int = 1024) -> None:
        self.init = init  # [S, M] memory_init
        self.starts_filled = starts_filled
        self._maps: dict[str, mmap.mmap] = {}
        self.vectors = self._mapped("vectors", (rows, *init.shape), np.float32)  # [R, S, M]
        self.filled = self._mapped("filled", (rows, len(init)), bool)
        self.changed = self._mapped("changed", (rows, len(init)), bool)  # since memory_init
        self.writes = self._mapped("writes", (rows,), np.int64)
        self._free: list[int] = []  # rows given back (reset)
        self._deferred: list[int] | None = None  # rows given back while the arrays move
        self._fresh = 0  # rows from here on were never taken
        self._populate = hasattr(mmap, "MAP_ANONYMOUS")  # (MADV_POPULATE_WRITE: _set_fresh)
        self._ready = 0  # rows below this are set (fresh ones BLOCK at a time)
        # One row: vectors, filled and changed flags, write count.
        self.row_bytes = init.size * 4 + 2 * len(init) + 8

    @property
    def slots(self) -> int:
        return len(self.init)

    def take(self) -> int:
        """A row holding memory_init, no writes."""
        if self._free:
            return self._free.pop()
        if self._fresh == len(self.writes):
            self._grow()
        row = self._fresh
        if row == self._ready:
            self._ready = min(row + self.BLOCK, len(self.writes))
            self._set_fresh(row, self._ready)
        self._fresh += 1
        return row

    def _set_fresh(self, start: int, stop: int) -> None:
        """Rows never taken hold zeros (a fresh mapping, or the part mremap added): set
        memory_init and the filled flags, leaving the zero flags and counts untouched (their
        pages are faulted in when first written). The vectors' pages are faulted in with
        one madvise(MADV_POPULATE_WRITE) (Linux 5.14) instead of a fault per page: 30 of
        ~100 ms for 100,000 new 64 x 8 memories here (a timeit outside the repository)."""
        if self._populate:
            per_row = self.vectors.strides[0]
            first = start * per_row // mmap.PAGESIZE * mmap.PAGESIZE
            try:
                self._maps["vectors"].madvise(_POPULATE_WRITE, first, stop * per_row - first)
            except (OSError, ValueError):  # an older kernel: faulted in page by page
                self._populate = False
        self.vectors[start:stop] = self.init
        if self.starts_filled:
            self.filled[start:stop] = True

    def give(self, row: int) -> None:
        if self._deferred is not None:  # (a memory collected in the middle of _grow)
            self._deferred.append(row)
            return
        self._reset(slice(row, row + 1))
        self._free.append(row)

    def in_use(self) -> int:
        return self._fresh - len(self._free)

    def _reset(self, rows: slice) -> None:
        self.vectors[rows] = self.init
        self.filled[rows] = self.starts_filled
        self.changed[rows] = False
        self.writes[rows] = 0

    def _grow(self) -> None:
        """Double every array, ``writes`` last: its length is the capacity, so if growing
        fails (no memory) part way, the arena goes on at its old capacity."""
        rows, self._deferred = 2 * len(self.writes), []
        try:
            for name in _ARRAYS:
                old = self.__dict__.pop(name)
                before, dtype = old.shape, old.dtype
                del old  # (our reference: without it the mapping could not move)
                try:
                    setattr(self, name, self._mapped(name, (rows, *before[1:]), dtype))
                except BaseException:  # the old mapping is unchanged: keep it
                    setattr(self, name, self._view(name, before, dtype))
                    raise
        finally:
            deferred, self._deferred = self._deferred, None
            for row in deferred:
                self.give(row)

    def _mapped(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The array `name` over a private anonymous mapping of this shape: zeros, and pages
        never written are never resident. Growing an existing one moves its pages (mremap)
        instead of copying them and faulting in a fresh copy, which was a fifth of a
        creation-heavy run; where a view of the old array is still alive (the mapping
        cannot move then) or mremap is missing, the rows are copied into a new mapping."""
        size = max(1, int(np.prod(shape)) * np.dtype(dtype).itemsize)
        old = self._maps.get(name)
        if old is not None:
            try:
                old.resize(size)
            except (BufferError, OSError, SystemError, ValueError):
                fresh = _anonymous(size)
                fresh[: len(old)] = old
                self._maps[name] = fresh
        else:
            self._maps[name] = _anonymous(size)
        return self._view(name, shape, dtype)

    def _view(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        return np.frombuffer(self._maps[name], dtype, int(np.prod(shape))).reshape(shape)


_ARRAYS = ("vectors", "filled", "changed", "writes")
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # (Linux's value; Python 3.13 names it)


def _anonymous(size: int) -> mmap.mmap:
    """Plain 4 KiB pages (asked for, since a kernel whose transparent huge pages are
    "always" would give huge ones unasked; the flag stays across mremap): numpy asks for
    huge pages on large arrays, and here taking 100,000 rows then cost 0.06 to 0.6 s from
    run to run (the kernel compacting memory to find them) against a steady 0.1 s without."""
    out = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        out.madvise(mmap.MADV_NOHUGEPAGE)
    return out


def keys(A: np.ndarray, filled: np.ndarray, V: np.ndarray) -> np.ndarray:
    """[N, S] int64 ranking keys of each slot of A [N, S, M] for V [N, M]."""
    slots = A.shape[1]
    with np.errstate(over="ignore"):
        d = A - V[:, None, :]
        dist = (d * d).sum(axis=-1)  # [N, S]
    out = dist.view(np.int32).astype(np.int64) << _shift(slots)
    out |= np.arange(slots)
    out[~filled] = _LAST
    return out


def nearest(
    A: np.ndarray, filled: np.ndarray, V: np.ndarray, rows: np.ndarray | None = None
) -> np.ndarray:
    """[N] each V row's nearest filled slot of memory rows[n] of A [R, S, M] (filled
    [R, S]; rows [N], by default A's rows in order); -1 where none is filled."""
    return _rank(A, filled, V, rows, 1, nearest=True)


def topk(
    A: np.ndarray, filled: np.ndarray, V: np.ndarray, k: int, rows: np.ndarray | None = None
) -> np.ndarray:
    """[N, k] each V row's k nearest filled slots of memory rows[n], nearest first; -1 pads."""
    return _rank(A, filled, V, rows, k, nearest=False)


def _rank(
    A: np.ndarray,
    filled: np.ndarray,
    V: np.ndarray,
    rows: np.ndarray | None,
    k: int,
    nearest: bool,
) -> np.ndarray:
    """The k smallest keys() of each V row's memory, as slots, in C (memnet/_scan.c: rank).
    The memories are read where they are (an arena's arrays: no gathered copy)."""
    memories, slots, dim = A.shape
    n = len(V)
    rows = np.arange(n, dtype=np.int64) if rows is None else np.ascontiguousarray(rows, np.int64)
    A = np.ascontiguousarray(A, np.float32)
    filled = np.ascontiguousarray(filled, np.bool_)
    V = np.ascontiguousarray(V, np.float32)
    out = np.empty(n if nearest else (n, k), np.int64)
    if n:
        _scan.rank(A, filled, rows, V, out, n, memories, slots, dim, k, int(nearest))
    return out


def reference_nearest(A: np.ndarray, filled: np.ndarray, V: np.ndarray) -> np.ndarray:
    """nearest() in numpy, from keys(): what the C kernel is tested against."""
    k = keys(A, filled, V)
    best = np.argmin(k, axis=1)
    return np.where(k[np.arange(len(k)), best] == _LAST, -1, best)


def reference_topk(A: np.ndarray, filled: np.ndarray, V: np.ndarray, k: int) -> np.ndarray:
    """topk() in numpy, from keys(): what the C kernel is tested against."""
    found = keys(A, filled, V)
    slots = found.shape[1]
    kept = min(k, slots)
    if kept < slots:
        found = np.partition(found, kept - 1, axis=1)[:, :kept]
    found.sort(axis=1)
    out = np.full((len(found), k), -1, np.int64)
    out[:, :kept] = np.where(found == _LAST, -1, found & ((1 << _shift(slots)) - 1))
    return out


def _shift(slots: int) -> int:
    return max(1, (slots - 1).bit_length())


class DenseSlots:
    """One memory's row of an arena, with the search structures' interface: a view, made
    by each read of ``DenseMemory.search`` (the row is the memory's: it goes back to the
    arena when the memory goes, not when a view does)."""

    __slots__ = ("arena", "row")

    def __init__(self, arena: Arena, row: int) -> None:
        self.arena = arena
        self.row = row

    @property
    def slots(self) -> int:
        return self.arena.slots

    @property
    def changed(self) -> np.ndarray:
        return self.arena.changed[self.row]

    def filled_count(self) -> int:
        return int(np.count_nonzero(self.arena.filled[self.row]))

    def overlay_bytes(self) -> int:
        return self.arena.row_bytes

    def vector(self, slot: int) -> np.ndarray:
        return self.arena.vectors[self.row, slot]

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        return self.arena.vectors[self.row][slots]

    def nearest(self, v: np.ndarray, hints: list[Hint | None] | None = None) -> int:
        a = self.arena
        return int(nearest(a.vectors, a.filled, v[None], np.array([self.row]))[0])

    def topk(self, V: np.ndarray, k: int, hints: list[Hint | None] | None = None) -> np.ndarray:
        a = self.arena
        return topk(a.vectors, a.filled, V, k, np.full(len(V), self.row))

    def set(self, slot: int, vector: np.ndarray) -> None:
        a = self.arena
        a.vectors[self.row, slot] = vector
        a.filled[self.row, slot] = True
        a.changed[self.row, slot] = True

    def set_many(self, slots: np.ndarray, rows: np.ndarray) -> None:
        a = self.arena
        a.vectors[self.row, slots] = rows
        a.filled[self.row, slots] = True
        a.changed[self.row, slots] = True


# A memory whose slots are an arena row; its write count lives in the arena too. One object
# per memory, holding its arena and row (its search structure, ``search``, is a view made on
# demand), of a type made in C (memnet/_rows.c): a partition may hold millions of memories,
# and objects of a class defined here would all be tracked by Python's cyclic collector,
# walked by each full collection, and their creation would trigger full collections
# (scripts/bench_small.py's in-process run: three, a fifth of its time). DenseMemory(arena)
# takes a row; the memory gives it back when it is freed.
DenseMemory = _rows.DenseMemory


def _search(memory: Any) -> DenseSlots:
    return DenseSlots(memory.arena, memory.row)


def _writes(memory: Any) -> int:
    return int(memory.arena.writes[memory.row])


def _set_writes(memory: Any, value: int) -> None:
    memory.arena.writes[memory.row] = value


def _complete(cls: type) -> None:
    """Give the C type Memory's interface: Memory's methods, which read ``search`` and
    ``writes``, and those two as properties of the row; isinstance(m, Memory) holds."""
    for name, value in vars(Memory).items():
        if not name.startswith("__") and name not in Memory.__slots__:
            setattr(cls, name, value)
    cls.search = property(_search)  # type: ignore[attr-defined]
    cls.writes = property(_writes, _set_writes)  # type: ignore[attr-defined]
    Memory.register(cls)


_complete(DenseMemory)
