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
from memnet.distance import rank, sqdist
from memnet.exact import ExactSlots, Hint, ScanBase, scan
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

    def overlay_bytes(self) -> int:
        return self._overlay.nbytes

    def overlay(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots [n], vectors [n, M]) changed since the base graph was built."""
        return self._overlay.items()

    def vector(self, slot: int) -> np.ndarray:
        return self._overlay.current(self.base.vectors, slot)

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        return self._overlay.current_rows(self.base.vectors, slots)

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
        base.norms()  # (also sets max_norm)
        ov_slots, ov = self.overlay()
        ov_dist = [sqdist(ov, v) for v in V]
        plan = [self._route(d, v, k) for d, v in zip(ov_dist, V, strict=True)]
        base_cand = self._graph_candidates(V, plan, k)
        base_cand.update(self._exact_candidates(V, plan, k))
        for q, v in enumerate(V):
            cand = base_cand.get(q, np.zeros(0, np.int64))
            dist = np.concatenate((sqdist(base.vectors[cand], v), ov_dist[q]))
            best = rank(np.concatenate((cand, ov_slots)), dist, k)
            out[q, : len(best)] = best
        return out

    def _route(self, ov_dist: np.ndarray, v: np.ndarray, k: int) -> str:
        if self._overlay.rules_out_base(ov_dist, v, self.base.max_norm, k):
            return "overlay"
        v_norm = float(np.sqrt(np.dot(v.astype(np.float64), v)))
        far = v_norm > 2 * self.base.max_norm and self.slots <= self.cfg.far_exact_max_slots
        return "exact" if far else "graph"

    def _graph_candidates(self, V: np.ndarray, plan: list[str], k: int) -> dict:
        todo = [q for q, how in enumerate(plan) if how == "graph"]
        n_graph = self.base.count
        if not todo or not n_graph:
            return {}
        want = min(max(k, self.cfg.candidates), n_graph)
        labels = self.base.index.knn_query(V[todo], k=want, num_threads=1)[0].astype(np.int64)
        out = {q: row[~self._overlay.has(row)] for q, row in zip(todo, labels, strict=True)}
        # Rows rewritten since the graph was built are dropped (scored from the overlay); if
        # fewer than k live rows are left, ask the graph for more, until it offers as many
        # as asked (else a query whose nearest rows all moved away found none of its true
        # neighbours). The same index, the same answer: deterministic.
        short = [q for q in todo if len(out[q]) < k]  # (fewer than k: surely incomplete)
        if short:
            stale = int(self.base.filled[self.overlay()[0]].sum())  # graph rows rewritten
            enough = min(want, n_graph - stale)
            for q in short:
                asked = want
                while len(out[q]) < enough and asked < n_graph:
                    asked = min(n_graph, 2 * asked)
                    try:
                        found = self.base.index.knn_query(V[q : q + 1], k=asked, num_threads=1)
                    except RuntimeError:  # (hnswlib: fewer rows reachable than asked)
                        break
                    row = found[0][0].astype(np.int64)
                    out[q] = row[~self._overlay.has(row)]
        return out

    def _exact_candidates(self, V: np.ndarray, plan: list[str], k: int) -> dict:
        todo = [q for q, how in enumerate(plan) if how == "exact"]
        if not todo:
            return {}
        base = self.base
        rows = ScanBase(base.vectors, base.norms(), base.max_norm, base.filled, base.count)
        ov_slots, _ = self.overlay()  # stale rows: their slots are scored from the overlay
        found = scan(rows, V[todo], k, exclude=ov_slots)
        return {q: hint.slots for q, hint in zip(todo, found, strict=True)}

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
