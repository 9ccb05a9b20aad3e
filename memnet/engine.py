"""The engine: applies writes and answers queries on memories, in order, in batches.

``process`` takes a sequence of (memory, event) pairs and returns exactly what applying them
one at a time in that order returns: I runs once for the whole batch (one jitted call), the
shared base matrix of exactly searched memories is scanned once for every vector of the
batch that needs it (memnet/exact.py), writes go through G one by one in order (numpy plus
the search structure), each run of consecutive queries on a memory is answered with one
batched search, and all queries of the batch share one jitted O+R call. hnswlib and Python
control flow stay outside jit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from threadpoolctl import threadpool_limits

from memnet.batching import CHUNK, rowwise
from memnet.errors import InvalidInput
from memnet.exact import Hint, ScanBase, scan
from memnet.graph import GraphBase, InitGraphCache
from memnet.memory import Memory
from memnet.model import Model
from memnet.search import ExactSlots, GraphSlots
from memnet.vectors import as_vector


@dataclass(frozen=True, slots=True)
class Write:
    row: np.ndarray  # the encoder's prepared input


@dataclass(frozen=True, slots=True)
class Query:
    row: np.ndarray | None = None  # input space: v = I(x)
    q: np.ndarray | None = None  # memory space: v = q


@dataclass(frozen=True, slots=True)
class Answer:
    y: np.ndarray  # [Y]
    slots: np.ndarray  # [k] retrieved slots, nearest first
    weights: np.ndarray  # [k] attention weights
    extra: dict[str, Any] = field(default_factory=dict)  # response fields such as "answer"


@dataclass(frozen=True, slots=True)
class Rejected:
    """An event that passed its checks but cannot be applied; nothing was changed."""

    reason: str


Event = Write | Query
Result = Answer | Rejected | None


MAX_BATCH = 1024  # events per jitted call at most
MEMORY_OVERHEAD_BYTES = 1200  # Python objects of one memory (measured: ~2.3 KB in all, 64 x 8)
SCAN_MARGIN = 8  # a batched scan keeps k + this many nearest base rows per vector
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

    # ---- events --------------------------------------------------------------------------
    def write(self, x: Any) -> Write:
        """A checked write event; raises InvalidInput before anything changes."""
        return Write(self.encoder.prepare(x))

    def query(self, x: Any = None, q: Any = None) -> Query:
        """A checked query, given in input space (x) or memory space (q), not both."""
        if (x is None) == (q is None):
            raise InvalidInput("a query needs exactly one of x (input space) and q (memory space)")
        if q is not None:
            return Query(q=as_vector(q, self.config.memory_dim, "q"))
        return Query(row=self.encoder.prepare(x))

    # ---- memories ------------------------------------------------------------------------
    def new_memory(self) -> Memory:
        """A memory holding a copy of memory_init (slots start empty for appending G)."""
        cfg = self.config
        if cfg.slots <= cfg.index.exact_max_slots:
            return Memory(ExactSlots(self.scan_base(), cfg.index.overlay_max))
        return Memory(GraphSlots(self.init_base(), cfg.index))

    def memory_bytes(self, memory: Memory) -> int:
        """About how much RAM a memory holds of its own (shared bases not counted): its
        arrays plus MEMORY_OVERHEAD_BYTES of Python objects."""
        search = memory.search
        n = MEMORY_OVERHEAD_BYTES + search.overlay_bytes()
        if isinstance(search, ExactSlots):
            n += search.changed.nbytes
            if search.base is not self._scan_base:  # folded into a private copy
                n += search.base.vectors.nbytes + search.base.norms.nbytes
        elif not search.base.shared:  # its own graph: vectors, and about as much of links
            n += 3 * search.base.vectors.nbytes
        return n

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
        load a large memory's shared graph, so the first real batches do not wait."""
        c = self.config
        if c.slots > c.index.exact_max_slots:
            self.init_base().norms()  # load (or build) the shared graph now, not mid-stream
        else:
            self.scan_base()
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
        encoded = self._encode_all([event for _, event in items])
        for j, v in encoded.items():
            if not _finite_in_memory_space(v):
                results[j] = Rejected("the input maps to non-finite values in memory space")
        live = [j for j in range(len(items)) if results[j] is None]
        hints = self._scan_ahead(items, encoded, live)
        pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (item, v [M], slots [K])
        cand: list[np.ndarray] = []
        ages: list[np.ndarray] = []
        for memory, order in _by_memory(items, live).values():
            for run in _runs(items, order):
                first = items[run[0]][1]
                if isinstance(first, Write):
                    for j in run:
                        memory.use_hints([hints.get(j)])
                        self.generalizer.write(self._np, memory, encoded[j])
                    memory.use_hints(None)  # a G that does not search leaves them unused
                    continue
                V = np.stack([encoded[j] for j in run])  # [R, M]
                memory.use_hints([hints.get(j) for j in run])
                slots = memory.topk(V, self.config.k)  # [R, K]
                cand.append(
                    memory.vectors(np.maximum(slots, 0).ravel()).reshape(*slots.shape, -1)
                )  # [R, K, M]
                ages.append(self.generalizer.ages(memory, slots))
                pending.extend(zip(run, V, slots, strict=True))
        if pending:
            V = np.stack([v for _, v, _ in pending])
            S = np.stack([s for _, _, s in pending])
            y, w = self._answer(self._jax, V, np.concatenate(cand), S >= 0, np.concatenate(ages))
            for r, (j, _, slots) in enumerate(pending):
                keep = slots >= 0
                if not np.isfinite(y[r]).all():
                    results[j] = Rejected("the response is not finite")
                    continue
                results[j] = Answer(y[r], slots[keep], w[r][keep], self.response.describe(y[r]))
        return results

    def _scan_ahead(
        self, items: Sequence[tuple[Memory, Event]], encoded: dict[int, np.ndarray], live: list[int]
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
            if isinstance(event, Write) and not self._write_scans(search, encoded[j]):
                continue
            groups.setdefault(id(search.base), (search.base, []))[1].append(j)
        hints: dict[int, Hint] = {}
        for base, todo in groups.values():
            found = scan(base, np.stack([encoded[j] for j in todo]), self.config.k + SCAN_MARGIN)
            hints.update(zip(todo, found, strict=True))
        return hints

    def _write_scans(self, search: ExactSlots, i: np.ndarray) -> bool:
        return self.generalizer.searches and bool(search.wants_base(i[None], 1)[0])

    def _encode_all(self, events: list[Event]) -> dict[int, np.ndarray]:
        """I over every event that carries encoder input, in one jitted call."""
        todo = [j for j, e in enumerate(events) if e.row is not None]
        out = {j: e.q for j, e in enumerate(events) if isinstance(e, Query) and e.q is not None}
        if todo:
            encoded = self._encode(self._jax, np.stack([events[j].row for j in todo]))
            out.update(zip(todo, encoded, strict=True))
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


def _finite_in_memory_space(v: np.ndarray) -> bool:
    """All values finite, and the squared norm too (so every distance stays finite)."""
    wide = v.astype(np.float64)  # float64 cannot overflow here, so no warning to silence
    return bool(np.dot(wide, wide) <= _FLOAT32_MAX)  # False for inf and NaN too


_FLOAT32_MAX = float(np.finfo(np.float32).max)


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
