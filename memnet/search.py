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

import copy
import uuid
from dataclasses import dataclass

import hnswlib
import numpy as np

from memnet.config import IndexConfig


def sqdist(vectors: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Squared L2 distances [N] from each row of vectors [N, M] to v [M].

    Each entry depends only on its own row and v, never on N.
    """
    d = vectors - v
    return (d * d).sum(axis=1)


def rank(cand: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """The first k of cand ordered by (distance, slot number)."""
    return cand[np.lexsort((cand, dist))[:k]]


def _within(row: np.ndarray, k: int, slack: float) -> np.ndarray | None:
    """Indices whose value is within slack of the k-th smallest of row (None on overflow).

    The k-th smallest is first bounded from above by the largest of k block minima (one
    pass; np.partition over the whole row costs far more), then refined on the survivors.
    """
    if k == 1:
        bound = row.min()
    else:
        n = len(row) // k * k
        bound = row[:n].reshape(k, -1).min(axis=1).max()
    cand = np.flatnonzero(row <= bound + slack)
    if k > 1 and len(cand) > 4 * k:
        kth = np.partition(row[cand], k - 1)[k - 1]
        cand = cand[row[cand] <= kth + slack]
    if len(cand) < k or not np.isfinite(row[cand]).all():
        return None
    return cand


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
    ) -> None:
        self._vectors = vectors  # [S, M]; shared and read-only until the first write
        self._owned = vectors.flags.writeable
        self.filled = filled  # [S] bool, or None when every slot is filled
        self.changed = changed if changed is not None else np.zeros(len(vectors), bool)
        self._norms: np.ndarray | None = None  # [S] squared norms, +inf for empty slots
        self._max_norm = 0.0  # an upper bound of sqrt(max(norms)) over filled slots

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
        with np.errstate(over="ignore", invalid="ignore"):
            estimate = norms[None, :] - 2 * (V @ self._vectors.T)  # [Q, S]
        slack = self._slack(V)  # [Q]
        for q, row in enumerate(estimate):
            cand = _within(row, k, 2 * slack[q])
            if cand is None:  # overflow made the estimate useless: do a full pass
                cand = np.flatnonzero(np.isfinite(norms))
            best = rank(cand, sqdist(self._vectors[cand], V[q]), k)
            out[q, : len(best)] = best
        return out

    def _slack(self, V: np.ndarray) -> np.ndarray:
        """[Q] bound on |estimate - exact| per query (worst-case float32 rounding, x4)."""
        dim = V.shape[1]
        v_norm = np.sqrt((V.astype(np.float64) ** 2).sum(axis=1))
        scale = self._max_norm**2 + 2 * self._max_norm * v_norm
        return 4 * (dim + 2) * float(np.finfo(np.float32).eps) * scale

    def _cached_norms(self) -> np.ndarray:
        if self._norms is None:
            x = self._vectors.astype(np.float64)
            norms = (x * x).sum(axis=1)
            if self.filled is not None:
                norms[~self.filled] = np.inf
            finite = norms[np.isfinite(norms)]
            self._max_norm = float(np.sqrt(finite.max())) if len(finite) else 0.0
            self._norms = norms.astype(np.float32)
        return self._norms

    def set(self, slot: int, vector: np.ndarray) -> None:
        if not self._owned:
            self._vectors = self._vectors.copy()
            self._owned = True
        self._vectors[slot] = vector
        self.changed[slot] = True
        if self.filled is not None:
            self.filled[slot] = True
        if self._norms is not None:
            norm = float((vector.astype(np.float64) ** 2).sum())
            self._norms[slot] = norm
            self._max_norm = max(self._max_norm, float(np.sqrt(norm)))


@dataclass(eq=False)
class GraphBase:
    """An hnswlib graph (labels = slot numbers) and the slot vectors it was built from."""

    vectors: np.ndarray  # [S, M] slot vectors as indexed
    filled: np.ndarray  # [S] bool: slot is in the graph
    index: hnswlib.Index
    id: str  # names this exact state; a base is never changed once another memory shares it
    shared: bool = False

    @classmethod
    def build(
        cls, vectors: np.ndarray, filled: np.ndarray, cfg: IndexConfig, base_id: str
    ) -> GraphBase:
        """Build on one thread with a fixed seed: every worker gets the same graph."""
        slots, dim = vectors.shape
        index = hnswlib.Index(space="l2", dim=dim)
        index.init_index(
            max_elements=slots, ef_construction=cfg.ef_construction, M=cfg.m, random_seed=cfg.seed
        )
        labels = np.flatnonzero(filled)
        if len(labels):
            index.add_items(vectors[labels], labels, num_threads=1)
        index.set_ef(cfg.ef_search)
        return cls(np.array(vectors, np.float32), filled.copy(), index, base_id)

    def clone(self) -> GraphBase:
        index = copy.deepcopy(self.index)
        index.set_ef(self.index.ef)
        return GraphBase(self.vectors.copy(), self.filled.copy(), index, uuid.uuid4().hex)

    @property
    def count(self) -> int:
        return int(self.index.get_current_count())


class GraphSlots:
    """hnswlib candidates re-ranked exactly, plus an exactly searched overlay of changed slots."""

    def __init__(self, base: GraphBase, cfg: IndexConfig) -> None:
        self.base = base
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
        """[Q, M] queries -> [Q, k] slots, nearest first, -1 where fewer slots are filled."""
        out = np.full((len(V), k), -1, np.int64)
        n_graph = self.base.count
        if n_graph:
            want = min(max(k, self.cfg.candidates), n_graph)
            labels = self.base.index.knn_query(V, k=want, num_threads=1)[0].astype(np.int64)
        else:
            labels = np.zeros((len(V), 0), np.int64)
        ov_slots, ov = self.overlay()
        for q, v in enumerate(V):
            cand = labels[q]
            if len(ov_slots):
                cand = cand[self._row[cand] < 0]  # overlay slots are scored from the overlay
                dist = np.concatenate((sqdist(self.base.vectors[cand], v), sqdist(ov, v)))
                cand = np.concatenate((cand, ov_slots))
            else:
                dist = sqdist(self.base.vectors[cand], v)
            best = rank(cand, dist, k)
            out[q, : len(best)] = best
        return out

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
        if self.base.shared:
            self.base = self.base.clone()
        order = np.argsort(slots)
        slots, vectors = slots[order], vectors[order]
        self.base.vectors[slots] = vectors
        self.base.filled[slots] = True
        self.base.index.add_items(vectors, slots, num_threads=1)
        self.base.id = uuid.uuid4().hex
        self._row[slots] = -1
        self._ov_slots = np.zeros(0, np.int64)
        self._ov = self._ov[:0].copy()
