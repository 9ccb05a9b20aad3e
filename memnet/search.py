"""Search structures over a memory's slot vectors: nearest slot, top-k, update.

The slot vectors are the truth; a search structure only finds slots. Both structures order
results by (squared L2 distance, slot number), computed by ``sqdist`` on current vectors, so
they agree wherever the graph finds the right candidates and the answer never depends on
how events were batched.

- ``ExactSlots`` (memories of at most ``exact_max_slots``): brute force, exact.
- ``GraphSlots`` (larger memories): an hnswlib graph frozen at build time (``GraphBase``,
  shared by every memory that has not re-indexed yet) plus an *overlay* of the slots changed
  since. A search takes the graph's candidates, adds every overlay slot, and re-ranks all of
  them with current vectors; when the overlay reaches ``overlay_max`` slots they are re-indexed
  together, each once however often it changed. A write therefore never pays hnswlib's
  in-place update (0.6-1.4 ms) on its own.
"""

from __future__ import annotations

import numpy as np

from memnet.config import IndexConfig
from memnet.distance import estimate_candidates, rank, sqdist, squared_norms
from memnet.graph import GraphBase


class ExactSlots:
    """Exact search over a private copy of the slot matrix (copied on first write).

    Distances are first estimated for every slot with one matrix product using cached squared
    norms, |m|^2 - 2 m·v, whose float32 error is bounded (``_slack``); every slot whose
    estimate lies within twice that bound of the k-th best is then re-ranked with ``sqdist``.
    The result is exactly brute-force ``sqdist`` search, at the cost of a matrix-vector
    product instead of a pass that materialises every difference.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        filled: np.ndarray | None = None,
        changed: np.ndarray | None = None,
        norms: tuple[np.ndarray, float] | None = None,
    ) -> None:
        """norms: (squared norms, max norm) of vectors if already known (shared, read-only)."""
        self._vectors = vectors  # [S, M]; shared and read-only until the first write
        self._owned = vectors.flags.writeable
        self.filled = filled  # [S] bool, or None when every slot is filled
        self.changed = changed if changed is not None else np.zeros(len(vectors), bool)
        self._norms: np.ndarray | None = None  # [S] squared norms, +inf for empty slots
        self._max_norm = 0.0  # an upper bound of sqrt(max(norms)) over filled slots
        if norms is not None:
            self._norms, self._max_norm = norms

    @property
    def slots(self) -> int:
        return len(self._vectors)

    def filled_count(self) -> int:
        return self.slots if self.filled is None else int(self.filled.sum())

    def vector(self, slot: int) -> np.ndarray:
        return self._vectors[slot]

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        return self._vectors[slots]

    def nearest(self, v: np.ndarray) -> int:
        return int(self.topk(v[None], 1)[0, 0])

    def topk(self, V: np.ndarray, k: int) -> np.ndarray:
        """[Q, M] queries -> [Q, k] slots, nearest first, -1 where fewer slots are filled."""
        out = np.full((len(V), k), -1, np.int64)
        k = min(k, self.filled_count())
        if k == 0:
            return out
        norms = self._cached_norms()
        for q, cand in enumerate(estimate_candidates(self._vectors, norms, self._max_norm, V, k)):
            if cand is None:  # overflow made the estimate useless: do a full pass
                cand = np.flatnonzero(np.isfinite(norms))
            best = rank(cand, sqdist(self._vectors[cand], V[q]), k)
            out[q, : len(best)] = best
        return out

    def _cached_norms(self) -> np.ndarray:
        if self._norms is None:
            self._norms, self._max_norm = squared_norms(self._vectors, self.filled)
        return self._norms

    def set(self, slot: int, vector: np.ndarray) -> None:
        if not self._owned:
            self._vectors = self._vectors.copy()
            if self._norms is not None:
                self._norms = self._norms.copy()
            self._owned = True
        self._vectors[slot] = vector
        self.changed[slot] = True
        if self.filled is not None:
            self.filled[slot] = True
        if self._norms is not None:
            norm = float((vector.astype(np.float64) ** 2).sum())
            self._norms[slot] = norm
            self._max_norm = max(self._max_norm, float(np.sqrt(norm)))


class GraphSlots:
    """hnswlib candidates re-ranked exactly, plus an exactly searched overlay of changed slots."""

    def __init__(self, base: GraphBase, cfg: IndexConfig) -> None:
        self.base = base
        base.users.add(self)
        self.cfg = cfg
        slots, dim = base.vectors.shape
        self._row = np.full(slots, -1, np.int32)  # slot -> overlay row, -1 if not overlaid
        self._ov_slots = np.zeros(0, np.int64)  # [n] overlay slots in order of first change
        self._ov = np.zeros((0, dim), np.float32)  # [n, M] their current vectors
        self._filled = int(base.filled.sum())

    @property
    def slots(self) -> int:
        return len(self.base.vectors)

    def filled_count(self) -> int:
        return self._filled

    def overlay(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots [n], vectors [n, M]) changed since the base graph was built."""
        n = len(self._ov_slots)
        return self._ov_slots, self._ov[:n]

    def vector(self, slot: int) -> np.ndarray:
        row = self._row[slot]
        return self._ov[row] if row >= 0 else self.base.vectors[slot]

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        out = self.base.vectors[slots]
        rows = self._row[slots]
        hit = rows >= 0
        if hit.any():
            out[hit] = self._ov[rows[hit]]
        return out

    def nearest(self, v: np.ndarray) -> int:
        return int(self.topk(v[None], 1)[0, 0])

    def topk(self, V: np.ndarray, k: int) -> np.ndarray:
        """[Q, M] queries -> [Q, k] slots, nearest first, -1 where fewer slots are filled.

        Per query, the cheapest way that still finds the true nearest slots:
          - "overlay": every graph row is at least (|v| - R)^2 away (R bounds their norms);
            if the overlay already has k slots closer than that, the graph is not searched;
          - "exact": a query far outside the graph's rows (|v| > 2R), where graph navigation
            goes astray, is checked against every graph row with one matrix product;
          - "graph": otherwise hnswlib's candidates (stale overlay rows dropped).
        Overlay slots are always scored from their current vectors.
        """
        out = np.full((len(V), k), -1, np.int64)
        k = min(k, self._filled)
        if k == 0:
            return out
        base = self.base
        norms = base.norms()
        ov_slots, ov = self.overlay()
        ov_dist = [sqdist(ov, v) for v in V]
        v_norm = np.sqrt((V.astype(np.float64) ** 2).sum(axis=1))
        floor = np.where(v_norm > base.max_norm, (v_norm - base.max_norm) ** 2, 0.0)
        plan = [self._route(d, f, n, k) for d, f, n in zip(ov_dist, floor, v_norm, strict=True)]
        base_cand = self._graph_candidates(V, plan, k)
        base_cand.update(self._exact_candidates(V, plan, norms, k))
        for q, v in enumerate(V):
            cand = base_cand.get(q, np.zeros(0, np.int64))
            dist = np.concatenate((sqdist(base.vectors[cand], v), ov_dist[q]))
            best = rank(np.concatenate((cand, ov_slots)), dist, k)
            out[q, : len(best)] = best
        return out

    def _route(self, ov_dist: np.ndarray, floor: float, v_norm: float, k: int) -> str:
        if len(ov_dist) >= k and np.partition(ov_dist, k - 1)[k - 1] < floor * (1 - 1e-4):
            return "overlay"
        far = v_norm > 2 * self.base.max_norm and self.slots <= self.cfg.far_exact_max_slots
        return "exact" if far else "graph"

    def _graph_candidates(self, V: np.ndarray, plan: list[str], k: int) -> dict:
        todo = [q for q, how in enumerate(plan) if how == "graph"]
        n_graph = self.base.count
        if not todo or not n_graph:
            return {}
        want = min(max(k, self.cfg.candidates), n_graph)
        labels = self.base.index.knn_query(V[todo], k=want, num_threads=1)[0].astype(np.int64)
        return {q: row[self._row[row] < 0] for q, row in zip(todo, labels, strict=True)}

    def _exact_candidates(self, V: np.ndarray, plan: list[str], norms: np.ndarray, k: int) -> dict:
        todo = [q for q, how in enumerate(plan) if how == "exact"]
        if not todo:
            return {}
        ov_slots, _ = self.overlay()
        if len(ov_slots):
            norms = norms.copy()
            norms[ov_slots] = np.inf  # stale rows: their slots are scored from the overlay
        found = estimate_candidates(self.base.vectors, norms, self.base.max_norm, V[todo], k)
        live = np.flatnonzero(np.isfinite(norms))
        return {q: live if c is None else c for q, c in zip(todo, found, strict=True)}

    def set(self, slot: int, vector: np.ndarray) -> None:
        row = self._row[slot]
        if row < 0:
            row = len(self._ov_slots)
            if row == len(self._ov):  # grow the buffer geometrically
                grown = np.zeros((max(16, 2 * row), self._ov.shape[1]), np.float32)
                grown[:row] = self._ov
                self._ov = grown
            self._row[slot] = row
            self._ov_slots = np.append(self._ov_slots, slot)
            if not self.base.filled[slot]:
                self._filled += 1
        self._ov[row] = vector
        if len(self._ov_slots) >= self.cfg.overlay_max:
            self.reindex()

    def reindex(self) -> None:
        """Fold the overlay into the graph (copying the graph first if it is shared)."""
        slots, vectors = self.overlay()
        if not len(slots):
            return
        self._own_base()
        order = np.argsort(slots)
        slots, vectors = slots[order], vectors[order]
        self.base.update(slots, vectors)
        self._row[slots] = -1
        self._ov_slots = np.zeros(0, np.int64)
        self._ov = self._ov[:0].copy()

    def _own_base(self) -> None:
        """Make the graph this memory's own before changing it: copy it if another memory
        uses it, else take it over (the engine loads a fresh shared one when next needed)."""
        base = self.base
        if base.shared and any(user is not self for user in base.users):
            self.base = base.clone()
            self.base.users.add(self)
            base.users.discard(self)
            return
        base.take_over()
