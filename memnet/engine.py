"""The engine: applies writes and answers queries on memories, in order, in batches.

``process`` takes a sequence of (memory, event) pairs and returns exactly what applying them
one at a time in that order returns. I runs once for the whole batch (one jitted call), and
all queries of the batch share one jitted O+R call. In between, two paths:

- Small memories (at most ``dense_max_floats`` floats, slots x memory_dim; 4,096 by
  default) are rows of one arena (memnet/dense.py) and go many memories at once: the n-th
  event of each memory in wave n, each wave one batched G (nearest slot, gate, update) for
  its writes and one batched top-k for its queries, both reading the arena's rows in place
  (memnet/_scan.c: rank), then one scatter. Per-event
  Python is what costs at these sizes, not arithmetic.
- Larger memories go one memory at a time: the shared base matrix of exactly searched
  memories is scanned once for every vector of the batch that needs it (memnet/exact.py),
  writes go through G one by one in order (numpy plus the search structure), and each run
  of consecutive queries on a memory is answered with one batched search.

A model whose index asks for a graph (slots above ``exact_max_slots``) always gets one.
hnswlib and Python control flow stay outside jit.
"""

from __future__ import annotations

import os
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from threadpoolctl import threadpool_limits

from memnet import _rows, quantized
from memnet.batching import CHUNK, rowwise
from memnet.dense import Arena, DenseMemory, DenseSlots
from memnet.dense import topk as dense_topk
from memnet.errors import InvalidInput
from memnet.exact import Hint, ScanBase, scan
from memnet.graph import GraphBase, InitGraphCache
from memnet.memory import Memory
from memnet.model import Model
from memnet.search import ExactSlots, GraphSlots
from memnet.vectors import as_vector

# Events and answers are made once per event, as objects of types made in C
# (memnet/_rows.c) that Python's cyclic collector does not track: as objects of classes
# defined here, each batch's survived into the old generation and triggered full
# collections, each walking every object of the process (scripts/bench_small.py's
# in-process run: docs/performance.md). Their fields are read-only.
Write = _rows.Write  # Write(row): row, the encoder's prepared input
Query = _rows.Query  # Query(row=None, q=None): input space (v = I(x)) or memory space (v = q)
# Answer(y, slots, weights, extra=None): y [Y]; slots [k], the retrieved slots, nearest
# first; weights [k], their attention weights; extra, response fields such as "answer" (a
# fresh dict when not given)
Answer = _rows.Answer


def _complete(cls: type, doc: str) -> None:
    """A record type's docstring, and a frozen dataclass's repr, equality and hash (by its
    fields in order, as a tuple of them compares: the same arrays are equal)."""
    fields = tuple(name for name, value in vars(cls).items() if _is_field(value))

    def values(self: Any) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in fields)

    def __repr__(self: Any) -> str:
        inner = ", ".join(
            f"{name}={value!r}" for name, value in zip(fields, values(self), strict=True)
        )
        return f"{type(self).__name__}({inner})"

    def __eq__(self: Any, other: Any) -> Any:
        return values(self) == values(other) if type(other) is type(self) else NotImplemented

    cls.__doc__ = doc
    cls.__repr__ = __repr__  # type: ignore[method-assign]
    cls.__eq__ = __eq__  # type: ignore[method-assign,assignment]
    cls.__hash__ = lambda self: hash(values(self))  # type: ignore[method-assign,assignment]
    cls.__match_args__ = fields  # type: ignore[attr-defined]
    cls.__reduce__ = lambda self: (type(self), values(self))  # (copy.copy, copy.deepcopy)


def _is_field(value: Any) -> bool:
    return isinstance(value, types.MemberDescriptorType)


_complete(Write, "A checked write event (Engine.write).")
_complete(Query, "A checked query (Engine.query), in input space (row) or memory space (q).")
_complete(
    Answer,
    "What a query returns: y, the retrieved slots and their weights, extra (response fields;"
    " an object there that refers back to the answer makes a cycle Python cannot free).",
)


@dataclass(frozen=True, slots=True)
class Rejected:
    """An event that passed its checks but cannot be applied; nothing was changed."""

    reason: str


Event = Write | Query
Result = Answer | Rejected | None

# A write whose G computed a vector that is not finite (huge weights): it changes nothing.
NOT_FINITE_WRITE = "the write would store non-finite values in memory"


MAX_BATCH = 1024  # events per jitted call at most
MEMORY_OVERHEAD_BYTES = 1200  # Python objects of one memory (measured: ~2.3 KB in all, 64 x 8)
SCAN_MARGIN = 8  # a batched scan keeps k + this many nearest base rows per vector
DENSE_OVERHEAD_BYTES = 400  # Python objects of one small memory (measured: tests/test_dense.py)
DENSE_MAX_FLOATS = 4096  # small memories: slots x memory_dim at most this (16 KiB)


class Engine:
    def __init__(
        self,
        model: Model,
        cache_dir: str | os.PathLike[str] | None = None,
        dense_max_floats: int | None = None,
    ) -> None:
        """cache_dir: where the initial graph of a large memory is published and shared
        (workers pass one directory); without it the graph is built on one thread.
        dense_max_floats: memories of at most this many floats (slots x memory_dim) are
        small: kept as rows of one arena and processed across memories at once
        (DENSE_MAX_FLOATS by default; 0 keeps every memory on the per-memory path)."""
        self.model = model
        self.dense_max_floats = DENSE_MAX_FLOATS if dense_max_floats is None else dense_max_floats
        cfg = model.config
        # Whether this engine's memories (new or loaded) are arena rows (memnet/dense.py),
        # whose memory_bytes never changes.
        self.small_memories = (
            cfg.slots <= cfg.index.exact_max_slots
            and cfg.slots * cfg.memory_dim <= self.dense_max_floats
        )
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        one_blas_thread()
        self.config = model.config
        parts = model.components
        self.encoder, self.generalizer = parts.encoder, parts.generalizer
        self.output, self.response = parts.output, parts.response
        self._np = dict(model.params)
        self._jax = {  # memory_init never enters jitted code: no device copy of it
            name: jnp.asarray(value)
            for name, value in model.params.items()
            if name != "memory_init"
        }
        self._encode = rowwise(self.encoder.encode)
        self._answer = rowwise(self._o_then_r)
        self._init_base: GraphBase | None = None
        self._scan_base: ScanBase | None = None
        self._arena: Arena | None = None

    # ---- events --------------------------------------------------------------------------
    def write(self, x: Any) -> Write:
        """A checked write event; raises InvalidInput before anything changes."""
        return Write(self.encoder.prepare(x))

    def query(self, x: Any = None, q: Any = None) -> Query:
        """A checked query, given in input space (x) or memory space (q), not both."""
        if (x is None) == (q is None):
            raise InvalidInput("a query needs exactly one of x (input space) and q (memory space)")
        if q is not None:
            return Query(None, as_vector(q, self.config.memory_dim, "q"))  # (row, q)
        return Query(self.encoder.prepare(x))

    # ---- memories ------------------------------------------------------------------------
    def new_memory(self) -> Memory:
        """A memory holding a copy of memory_init (slots start empty for appending G)."""
        cfg = self.config
        if self.small_memories:
            return DenseMemory(self.arena())
        if cfg.slots <= cfg.index.exact_max_slots:
            return Memory(ExactSlots(self.scan_base(), cfg.index.overlay_max))
        return Memory(GraphSlots(self.init_base(), cfg.index))

    def memory_bytes(self, memory: Memory) -> int:
        """About how much RAM a memory holds of its own (shared bases not counted): its
        arrays plus MEMORY_OVERHEAD_BYTES of Python objects."""
        search = memory.search
        if isinstance(search, DenseSlots):
            return DENSE_OVERHEAD_BYTES + search.overlay_bytes()
        n = MEMORY_OVERHEAD_BYTES + search.overlay_bytes()
        if isinstance(search, ExactSlots):
            n += search.changed.nbytes
            base = search.base
            if base is not self._scan_base:  # folded into a private copy, with its codes
                n += base.vectors.nbytes + base.norms.nbytes
                n += 0 if base.filled is None else base.filled.nbytes
                n += quantized.Quantized.nbytes_of(*base.vectors.shape)  # (made by its
                # first scan: a memory fetched, then only queried, is not sized again)
        elif not search.base.shared:  # its own graph
            n += search.base.nbytes
        return n

    def arena(self) -> Arena:
        """The rows of this engine's small memories (memnet/dense.py)."""
        if self._arena is None:
            init = self.model.params["memory_init"].astype(np.float32)
            self._arena = Arena(init, self.generalizer.starts_filled)
        return self._arena

    def scan_base(self) -> ScanBase:
        """memory_init with its norms, computed once and shared read-only by every exactly
        searched memory until it folds its overlay in."""
        if self._scan_base is None:
            filled = None if self.generalizer.starts_filled else np.zeros(self.config.slots, bool)
            self._scan_base = ScanBase.over(self.model.params["memory_init"], filled)
            self._scan_base.norms.flags.writeable = False
        return self._scan_base

    def init_base(self) -> GraphBase:
        """The graph over memory_init, built once and shared by every memory until it
        re-indexes."""
        if self._init_base is None or not self._init_base.shared:  # (a memory took it over)
            cfg = self.config
            vectors = self.model.params["memory_init"]  # read-only: shared, never copied
            filled = np.full(cfg.slots, self.generalizer.starts_filled)
            if self.cache_dir is None:
                base = GraphBase.build(vectors, filled, cfg.index, "init")
            else:
                cache = InitGraphCache(self.cache_dir, self.model.fingerprint)
                base = cache.get(vectors, filled, cfg.index)
            base.shared = True
            self._init_base = base
        return self._init_base

    def warm_up(self, max_batch: int) -> None:
        """Compile the jitted I and O+R for every batch shape up to max_batch events, and
        load a large memory's shared graph or quantize the shared base (memnet/quantized.py),
        so the first real batches do not wait."""
        c = self.config
        if c.slots > c.index.exact_max_slots:
            self.init_base().norms()  # load (or build) the shared graph now, not mid-stream
        else:
            base = self.scan_base()
            if quantized.path() != "blas":
                base.quantized().warm()
        sizes = [CHUNK]
        while sizes[-1] < min(max_batch, MAX_BATCH):
            sizes.append(sizes[-1] * 2)
        row = self.encoder.example()
        for n in sizes:
            self._encode(self._jax, np.stack([row] * n))
            self._answer(
                self._jax,
                np.zeros((n, c.memory_dim), np.float32),
                np.zeros((n, c.k, c.memory_dim), np.float32),
                np.zeros((n, c.k), bool),
                np.zeros((n, c.k), np.int32),
            )

    # ---- processing ----------------------------------------------------------------------
    def apply(self, memory: Memory, event: Event) -> Result:
        """One event on its own: the reference for what ``process`` must return."""
        return self.process([(memory, event)])[0]

    def process(self, items: Sequence[tuple[Memory, Event]]) -> list[Result]:
        """Apply events in order: an Answer for each query, None for each write, Rejected
        for an event whose encoding is not finite (it changes nothing). Long sequences go
        through in slices of MAX_BATCH (the same results: batching never changes them),
        which bounds memory and the number of compiled shapes."""
        results: list[Result] = []
        for start in range(0, len(items), MAX_BATCH):
            results += self._process(items[start : start + MAX_BATCH])
        return results

    def _process(self, items: Sequence[tuple[Memory, Event]]) -> list[Result]:
        results: list[Result] = [None] * len(items)
        E = self._encode_all([event for _, event in items])  # [B, M]
        ok = _finite_in_memory_space(E)
        for j in np.flatnonzero(~ok):
            results[j] = Rejected("the input maps to non-finite values in memory space")
        dense, live = [], []
        for j in np.flatnonzero(ok).tolist():
            (dense if isinstance(items[j][0], DenseMemory) else live).append(j)
        if dense and not self.generalizer.batched:
            live, dense = sorted(live + dense), []
        answers = _Pending()
        if dense:
            self._dense(items, np.array(dense), E, answers, results)
        if live:
            self._per_memory(items, live, E, answers, results)
        if answers.at:
            self._answer_all(answers, results)
        return results

    def _per_memory(
        self,
        items: Sequence[tuple[Memory, Event]],
        live: list[int],
        E: np.ndarray,
        out: _Pending,
        results: list[Result],
    ) -> None:
        """Memories one at a time: writes through G in order, each run of queries on a
        memory searched at once."""
        hints = self._scan_ahead(items, E, live)
        for memory, order in _by_memory(items, live).values():
            for run in _runs(items, order):
                if isinstance(items[run[0]][1], Write):
                    for j in run:
                        if self.generalizer.write(self._np, memory, E[j], hints.get(j)) is False:
                            results[j] = Rejected(NOT_FINITE_WRITE)
                    continue
                V = E[run]  # [R, M]
                slots = memory.topk(V, self.config.k, [hints.get(j) for j in run])  # [R, K]
                cand = memory.vectors(np.maximum(slots, 0).ravel()).reshape(*slots.shape, -1)
                out.add(np.array(run), V, slots, cand, self.generalizer.ages(memory, slots))

    def _dense(
        self,
        items: Sequence[tuple[Memory, Event]],
        js: np.ndarray,
        E: np.ndarray,
        out: _Pending,
        results: list[Result],
    ) -> None:
        """Small memories many at a time (memnet/dense.py): the events go in waves, the
        n-th event of each memory in wave n, so a wave touches each memory once and the
        waves keep every memory's order; each wave applies its writes with one write_many
        and searches for its queries with one topk, on the arena's rows in place."""
        arena, k, g = self.arena(), self.config.k, self.generalizer
        at = js.tolist()  # (a list is indexed by Python ints much faster than by numpy's)
        rows = np.array([m.row if (m := items[j][0]).arena is arena else -1 for j in at], np.int64)
        if len(rows) and rows.min() < 0:  # (its row number means another memory here)
            raise ValueError("a small memory of another Engine: each engine applies its own")
        writes = np.array([isinstance(items[j][1], Write) for j in at], bool)
        for wave in _waves(rows):
            r, w = rows[wave], writes[wave]
            if w.any():
                rw, at = r[w], js[wave[w]]
                slot, new = g.write_many(self._np, arena, rw, E[at])
                ok = np.isfinite(new).all(axis=1)
                if not ok.all():  # (a G whose arithmetic overflowed: those rows refused)
                    for j in at[~ok].tolist():
                        results[j] = Rejected(NOT_FINITE_WRITE)
                    rw, slot, new = rw[ok], slot[ok], new[ok]
                arena.vectors[rw, slot] = new
                arena.filled[rw, slot] = True
                arena.changed[rw, slot] = True
                arena.writes[rw] += 1
            if not w.all():
                rq, at = r[~w], js[wave[~w]]
                slots = dense_topk(arena.vectors, arena.filled, E[at], k, rq)  # [n, K]
                cand = arena.vectors[rq[:, None], np.maximum(slots, 0)]  # [n, K, M]
                out.add(at, E[at], slots, cand, g.ages_many(arena.writes[rq], slots, arena.slots))

    def _answer_all(self, p: _Pending, results: list[Result]) -> None:
        """O then R for every query of the batch in one jitted call, and their results."""
        at, V, S = np.concatenate(p.at), np.concatenate(p.V), np.concatenate(p.slots)
        y, w = self._answer(self._jax, V, np.concatenate(p.cand), S >= 0, np.concatenate(p.ages))
        finite = np.isfinite(y).all(axis=1).tolist()
        full = (S >= 0).all(axis=1).tolist()
        describe = self.response.describe
        # (list(array) makes every row's view in one call: cheaper than indexing row by row)
        for j, yr, Sr, wr, ok, all_kept in zip(
            at.tolist(), list(y), list(S), list(w), finite, full, strict=True
        ):
            if not ok:
                results[j] = Rejected("the response is not finite")
            elif all_kept:
                results[j] = Answer(yr, Sr, wr, describe(yr))
            else:
                keep = Sr >= 0
                results[j] = Answer(yr, Sr[keep], wr[keep], describe(yr))

    def _scan_ahead(
        self, items: Sequence[tuple[Memory, Event]], E: np.ndarray, live: list[int]
    ) -> dict[int, Hint]:
        """Scan each shared base once for every vector of the batch that will search it:
        every query, and the writes of a searching G whose memory's overlay does not
        already rule the base out. Hints only speed searches up; results never change."""
        groups: dict[int, tuple[ScanBase, list[int]]] = {}
        for j in live:
            memory, event = items[j]
            search = memory.search
            if not isinstance(search, ExactSlots) or search.base.count == 0:
                continue
            if isinstance(event, Write) and not self._write_scans(search, E[j]):
                continue
            groups.setdefault(id(search.base), (search.base, []))[1].append(j)
        hints: dict[int, Hint] = {}
        for base, todo in groups.values():
            found = scan(base, E[todo], self.config.k + SCAN_MARGIN)
            hints.update(zip(todo, found, strict=True))
        return hints

    def _write_scans(self, search: ExactSlots, i: np.ndarray) -> bool:
        return self.generalizer.searches and bool(search.wants_base(i[None], 1)[0])

    def _encode_all(self, events: list[Event]) -> np.ndarray:
        """[B, M] every event in memory space: I over those that carry encoder input, in
        one jitted call, and the memory-space queries as given."""
        out = np.zeros((len(events), self.config.memory_dim), np.float32)
        todo = [j for j, e in enumerate(events) if e.row is not None]
        given = [j for j, e in enumerate(events) if e.row is None]
        # (np.array of a list of equal rows: np.stack's result, in a third of its time)
        if todo:
            out[todo] = self._encode(self._jax, np.array([events[j].row for j in todo]))
        if given:
            out[given] = np.array([events[j].q for j in given])  # type: ignore[union-attr]
        return out

    def _o_then_r(self, p: dict[str, Any], v: Any, cand: Any, mask: Any, age: Any) -> Any:
        o, weights = self.output.attend(p, v, cand, mask, age)
        return self.response.respond(p, o), weights


def one_blas_thread() -> None:
    """Run BLAS on one thread in this process. memnet's matrix products are small (one
    query against a slot matrix); OpenBLAS's worker threads spin against each other and
    against other processes on a busy machine: a 1x64 by 64x10,000 product took 8 ms instead
    of 48 us here with another process busy. Set MEMNET_BLAS_THREADS to keep more."""
    threadpool_limits(int(os.environ.get("MEMNET_BLAS_THREADS", "1")), user_api="blas")


def _finite_in_memory_space(E: np.ndarray) -> np.ndarray:
    """[B] bool: all values finite, and the squared norm too (so every distance stays
    finite). np.vecdot is np.dot row by row: the same sums as one vector at a time."""
    wide = E.astype(np.float64)  # float64 cannot overflow here, so no warning to silence
    return np.vecdot(wide, wide) <= _FLOAT32_MAX  # False for inf and NaN too


_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class _Pending:
    """The queries of a batch waiting for O and R, in chunks: item positions [n], vectors
    [n, M], retrieved slots [n, K] (-1 pads), their vectors [n, K, M] and ages [n, K]."""

    at: list[np.ndarray] = field(default_factory=list)
    V: list[np.ndarray] = field(default_factory=list)
    slots: list[np.ndarray] = field(default_factory=list)
    cand: list[np.ndarray] = field(default_factory=list)
    ages: list[np.ndarray] = field(default_factory=list)

    def add(self, *chunk: np.ndarray) -> None:
        lists = (self.at, self.V, self.slots, self.cand, self.ages)
        for parts, a in zip(lists, chunk, strict=True):
            parts.append(a)


def _waves(rows: np.ndarray) -> list[np.ndarray]:
    """Positions of rows [n] in waves: wave w holds each row's (w+1)-th occurrence, in
    position order."""
    n = len(rows)
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]
    first = np.ones(n, bool)
    first[1:] = sorted_rows[1:] != sorted_rows[:-1]
    index = np.arange(n)
    rank = np.empty(n, np.int64)
    rank[order] = index - np.maximum.accumulate(np.where(first, index, 0))
    by_wave = np.argsort(rank, kind="stable")
    bounds = np.cumsum(np.bincount(rank))
    return np.split(by_wave, bounds[:-1])


def _by_memory(
    items: Sequence[tuple[Memory, Event]], positions: list[int]
) -> dict[int, tuple[Memory, list[int]]]:
    """Positions grouped by memory, each group in the original order."""
    groups: dict[int, tuple[Memory, list[int]]] = {}
    for j in positions:
        memory = items[j][0]
        groups.setdefault(id(memory), (memory, []))[1].append(j)
    return groups


def _runs(items: Sequence[tuple[Memory, Event]], order: list[int]) -> list[list[int]]:
    """Split positions into maximal runs of consecutive writes or consecutive queries."""
    runs: list[list[int]] = []
    for j in order:
        kind = isinstance(items[j][1], Write)
        if runs and isinstance(items[runs[-1][0]][1], Write) == kind:
            runs[-1].append(j)
        else:
            runs.append([j])
    return runs
