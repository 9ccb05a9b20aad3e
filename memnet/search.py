"""Search structures over a memory's slot vectors: nearest slot, top-k, update.

The slot vectors are the truth; a search structure only finds slots. Both structures order
results by (squared L2 distance, slot number), computed by ``sqdist`` on current vectors, so
they agree wherever the graph finds the right candidates and the answer never depends on
how events were batched.

- ``ExactSlots`` (memories of at most ``exact_max_slots``; memnet/exact.py): exact, a shared
  base matrix scanned for whole batches at once plus an overlay of changed slots.
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
from memnet.distance import estimate_candidates, rank, sqdist
from memnet.exact import ExactSlots, Hint
from memnet.graph import GraphBase
from memnet.overlay import Overlay

__all__ = ["ExactSlots", "GraphSlots"]


class GraphSlots:
    """hnswlib candidates re-ranked exactly, plus an exactly searched overlay of changed slots."""

    def __init__(self, base: GraphBase, cfg: IndexConfig) -> None:
        self.base = base
        base.users.add(self)
        self.cfg = cfg
        self._overlay = Overlay(*base.vectors.shape)
        self._filled = int(base.filled.sum())

    @property
    def slots(self) -> int:
        return len(self.base.vectors)

    def filled_count(self) -> int:
        return self._filled

    def overlay(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots [n], vectors [n, M]) changed since the base graph was built."""
        return self._overlay.items()

    def vector(self, slot: int) -> np.ndarray:
        row = self._overlay.vector(slot)
        return self.base.vectors[slot] if row is None else row

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        out = self.base.vectors[slots]
        self._overlay.fill(slots, out)
        return out

    def nearest(self, v: np.ndarray, hints: list[Hint | None] | None = None) -> int:
        return int(self.topk(v[None], 1)[0, 0])

    def topk(self, V: np.ndarray, k: int, hints: list[Hint | None] | None = None) -> np.ndarray:
        """[Q, M] queries -> [Q, k] slots, nearest first, -1 where fewer slots are filled.

        Per query, the cheapest way that still finds the true nearest slots:
          - "overlay": every graph row is at least (|v| - R)^2 away (R bounds their norms);
            if the overlay already has k slots closer than that, the graph is not searched;
          - "exact": a query far outside the graph's rows (|v| > 2R), where graph navigation
            goes astray, is checked against every graph row with one matrix product;
          - "graph": otherwise hnswlib's candidates (stale overlay rows dropped).
        Overlay slots are always scored from their current vectors. (Hints are for
        ExactSlots; a graph search needs none.)
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
        return {q: row[~self._overlay.has(row)] for q, row in zip(todo, labels, strict=True)}

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
        if self._overlay.set(slot, vector) and not self.base.filled[slot]:
            self._filled += 1
        if len(self._overlay) >= self.cfg.overlay_max:
            self.reindex()

    def reindex(self) -> None:
        """Fold the overlay into the graph (copying the graph first if it is shared)."""
        slots, vectors = self.overlay()
        if not len(slots):
            return
        self._own_base()
        order = np.argsort(slots)
        self.base.update(slots[order], vectors[order])
        self._overlay.clear()

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
