"""Exact search: a read-only base matrix shared by every memory that started from it, plus
each memory's overlay of changed slots.

Every memory starts as a copy of ``memory_init``, and a write changes one slot, so a memory
is kept as the shared matrix (``ScanBase``: never copied, never changed) plus an overlay of
the slots it has changed. Because the base never changes, the engine can search it for every
event of a batch at once, whatever memory and whatever order they belong to: ``scan`` is one
blocked matrix product for all of them, the only way a scan over 100k slots runs at the
speed of the hardware (a product for one vector at a time is ~6x slower per vector here).
The order-dependent part, the overlay, is small and searched per event, in order.

``scan`` estimates each distance as |m|^2 - 2 m·v from cached squared norms; ``slack``
bounds the float32 error of both that estimate and of ``sqdist``, so keeping every row whose
estimate is within 2·slack of the ``want``-th best keeps every row that brute-force
``sqdist`` search could rank among the first ``want``. The survivors are re-ranked with
``sqdist``: results are exactly brute force's, ties going to the lower slot number.

A hint from a batched scan stays valid while the memory's base is the one it was computed
on: rows overwritten since (now in the overlay) are dropped from it, and if fewer than k of
its ``want`` best rows are left, the memory scans again with those rows excluded. When the
overlay reaches ``fold_at`` slots it is folded into a private copy of the base.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from memnet import quantized
from memnet.distance import rank, sqdist, squared_norms, underflow
from memnet.overlay import Overlay
from memnet.quantized import Quantized

QUERY_CHUNK = 256  # vectors per matrix product
SLOT_CHUNK = 1024  # base rows per matrix product: [256, 1024] float32 = 1 MiB, cache-sized
GROUP = 16  # rows per group: a scan keeps each group's smallest estimate
_EPS = float(np.finfo(np.float32).eps)
_EMPTY = np.zeros(0, np.int64)
# Above this error bound the estimates |m|^2 - 2 m·v (~ margin / eps) may overflow float32.
_SAFE = 1e30


@dataclass(eq=False)
class ScanBase:
    """A read-only slot matrix with its squared norms (+inf for empty slots)."""

    vectors: np.ndarray  # [S, M], read-only
    norms: np.ndarray  # [S] float32
    max_norm: float  # an upper bound of every filled row's norm
    filled: np.ndarray | None  # [S] bool, None when every slot is filled
    count: int  # filled rows
    codes: Quantized | None = field(default=None, repr=False)  # made by the first scan

    @classmethod
    def over(
        cls,
        vectors: np.ndarray,
        filled: np.ndarray | None = None,
        norms: tuple[np.ndarray, float] | None = None,
    ) -> ScanBase:
        view = vectors.view()
        view.flags.writeable = False
        squared, top = norms if norms is not None else squared_norms(vectors, filled)
        count = len(vectors) if filled is None else int(filled.sum())
        return cls(view, squared, top, None if filled is None else filled.copy(), count)

    def is_filled(self, slot: int) -> bool:
        return self.filled is None or bool(self.filled[slot])

    def quantized(self) -> Quantized:
        """The rows' int8 codes for the candidate pass (memnet/quantized.py), made once."""
        if self.codes is None:
            self.codes = Quantized.of(self.vectors, self.norms)
        return self.codes

    def with_rows(self, slots: np.ndarray, rows: np.ndarray) -> ScanBase:
        """A private copy with rows [n, M] written into slots [n]."""
        vectors = self.vectors.copy()
        vectors[slots] = rows
        filled = None if self.filled is None else self.filled.copy()
        if filled is not None:
            filled[slots] = True
        norms = self.norms.copy()
        squared, top = squared_norms(rows, None)
        norms[slots] = squared
        out = ScanBase.over(vectors, filled, (norms, max(self.max_norm, top)))
        if self.codes is not None:  # the codes of the rows left as they were are kept
            out.codes = self.codes.with_rows(slots, rows, squared)
        return out


@dataclass(frozen=True, slots=True)
class Hint:
    """The base rows that can be among one vector's ``want`` nearest, from a scan: every row
    whose distance can be at most ``kth`` (up to a constant per vector), a bound of the
    want-th smallest, with bounds ``upper`` of their own distances."""

    base: ScanBase
    slots: np.ndarray  # [c] int64
    upper: np.ndarray  # [c] an upper bound of each row's distance (less a constant)
    kth: float  # at least the want-th smallest (less the same); +inf: every filled row

    def candidates(self, overlay: Overlay, k: int) -> np.ndarray | None:
        """The hinted rows not overwritten since, if they surely hold the k nearest of the
        base rows left; None if too many of the best were overwritten.

        If k live rows have upper <= kth, the k-th nearest live row is within kth, and
        every row within kth is hinted."""
        live = ~overlay.has(self.slots)
        if np.isfinite(self.kth) and np.count_nonzero(live & (self.upper <= self.kth)) < k:
            return None
        return self.slots[live]


def slack(V: np.ndarray, max_norm: float) -> np.ndarray:
    """[Q] a bound on the float32 error of |m|^2 - 2 m·v and of sqdist(m, v), together, for
    any row m of norm at most max_norm: 4 (M + 2) eps (|m| + |v|)^2.

    Why (u = eps / 2, the unit roundoff): sqdist rounds each m_i - v_i and its square (2u)
    and sums M positive terms in any order (at most (M - 1) u more), so it is within
    (M + 2) u |m - v|^2 <= (M + 2) u (|m| + |v|)^2 of |m - v|^2. The estimate takes |m|^2
    from float64 rounded once (u |m|^2), m·v from a float32 product summed in any order
    (M u |m| |v|, Cauchy-Schwarz), -2 exactly, and one rounding for the sum (u (|m|^2 +
    2 |m| |v|)): within (M + 2) u (|m| + |v|)^2 too. Together (M + 2) eps (|m| + |v|)^2,
    first order; the factor 4 is headroom for the second-order terms (gamma_n = n u /
    (1 - n u), under 1.01 n u while n u < 0.01) and for the float arithmetic that applies the
    margin (2 slack) to estimates, which itself rounds. quantized.py's bound reuses it.

    Plus underflow's absolute part (distance.underflow): sqdist's 3M roundings and the
    estimate's 2M + 3, each within half a subnormal spacing whatever the magnitudes: it
    decides only for vectors of norm ~1e-20 and less."""
    v_norm = np.sqrt((V.astype(np.float64) ** 2).sum(axis=1))
    M = V.shape[1]
    return 4 * (M + 2) * _EPS * (max_norm + v_norm) ** 2 + underflow(6 * M + 8)


def scan(base: ScanBase, V: np.ndarray, want: int, exclude: np.ndarray | None = None) -> list[Hint]:
    """Per vector of V [Q, M], the base rows that can be among its ``want`` nearest (rows in
    ``exclude`` left out).

    Pass 1, the candidate pass: the groups of 16 rows that can hold a row within the margin
    of the want-th best, from int8 estimates with a proven error bound (memnet/quantized.py;
    on the "blas" path, and for more than quantized.MAX_DIM dims, from float32 matrix
    products). Pass 2, per vector: those groups' rows estimated in float32, and the rows
    within the margin of the want-th best kept.
    """
    skip = None
    if exclude is not None and len(exclude):
        skip = np.zeros(len(base.vectors), bool)
        skip[exclude] = True
    margin = 2 * slack(V, base.max_norm)
    if not np.all(margin < _SAFE):  # estimates could overflow float32: no pruning
        return _every_row(base, V, want, exclude, margin)
    if quantized.path() != "blas" and V.shape[1] <= quantized.MAX_DIM:
        qi, rows, upper, cuts = base.quantized().candidates(V, want, base.max_norm, skip)
        starts = np.searchsorted(qi, np.arange(len(V) + 1))
        return [
            Hint(base, rows[a:b], upper[a:b], float(cuts[i]))
            for i, (a, b) in enumerate(itertools.pairwise(starts))
        ]
    hints: list[Hint] = []
    for q0 in range(0, len(V), QUERY_CHUNK):
        chunk, m = V[q0 : q0 + QUERY_CHUNK], margin[q0 : q0 + QUERY_CHUNK]
        minima, first, stride = _group_minima(base, chunk, skip)
        qi, gi = _groups(minima, want, m)
        rows = first[gi, None] + stride[gi, None] * np.arange(GROUP)  # [c, GROUP]
        hints += _hints(base, chunk, want, m, qi, rows, skip)
    return hints


def _every_row(
    base: ScanBase, V: np.ndarray, want: int, exclude: np.ndarray | None, margin: np.ndarray
) -> list[Hint]:
    """Hints for vectors too far out to estimate safely: every live row of the base for
    those, an ordinary scan for the rest."""
    live = np.flatnonzero(np.isfinite(base.norms))
    if exclude is not None and len(exclude):
        live = np.setdiff1d(live, exclude)
    everything = Hint(base, live, np.zeros(len(live), np.float32), float("inf"))
    safe = np.flatnonzero(margin < _SAFE)
    found = dict(zip(safe, scan(base, V[safe], want, exclude), strict=True)) if len(safe) else {}
    return [found.get(q, everything) for q in range(len(V))]


def _group_minima(
    base: ScanBase, V: np.ndarray, skip: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """([Q, n] smallest estimate of each group, [n] each group's first row, [n] its stride)."""
    scaled = V * np.float32(-2)  # exact: a power of two
    slots = len(base.vectors)
    step = SLOT_CHUNK * max(1, QUERY_CHUNK // len(V))  # estimates per product stay ~1 MiB
    minima, first, stride = [], [], []
    for s0 in range(0, slots, step):
        rows = min(step, slots - s0)
        est = scaled @ base.vectors[s0 : s0 + rows].T  # [Q, rows]
        est += base.norms[s0 : s0 + rows]
        if skip is not None:
            est[:, skip[s0 : s0 + rows]] = np.inf
        width = -(-rows // GROUP)  # groups in this chunk
        if rows % GROUP:  # the last chunk: pad with +inf to whole groups
            est = np.concatenate((est, np.full((len(V), GROUP * width - rows), np.inf)), 1)
        minima.append(est.reshape(len(V), GROUP, width).min(axis=1))  # [Q, width]
        first.append(s0 + np.arange(width))
        stride.append(np.full(width, width))
    return np.concatenate(minima, axis=1), np.concatenate(first), np.concatenate(stride)


def _groups(minima: np.ndarray, want: int, margin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The "blas" path's (query, group) pairs whose float32 minimum is within the margin of
    a bound on the want-th smallest estimate."""
    q, n = minima.shape
    # Any `want` disjoint sets of groups give, through their minima, `want` distinct rows
    # with estimates at most the largest of those minima: it bounds the want-th smallest.
    # Sets of at least two groups (n >= 2 want) make it a minimum worth taking; with fewer
    # groups every group goes on, and _within_kth finds the want-th smallest minimum itself.
    if n >= 2 * want:
        bound = minima[:, : n // want * want].reshape(q, want, -1).min(axis=2).max(axis=1)
    else:
        bound = np.full(q, np.inf, np.float32)
    with np.errstate(invalid="ignore"):  # inf - inf where a whole block is empty
        qi, gi = np.nonzero(minima <= (bound + margin)[:, None])
    # Tighten: the want-th smallest minimum among those groups bounds the want-th row.
    return _within_kth(qi, gi, minima[qi, gi], want, margin, q)


def _hints(
    base: ScanBase,
    V: np.ndarray,
    want: int,
    margin: np.ndarray,
    qi: np.ndarray,
    rows: np.ndarray,
    skip: np.ndarray | None,
) -> list[Hint]:
    """Per vector, the rows of its candidate groups (qi [c] sorted, rows [c, 16]) whose
    float32 estimate is within the margin of the want-th smallest among them."""
    q = len(V)
    inside = rows < len(base.vectors)
    rows = np.where(inside, rows, 0)
    est = np.einsum("cgm,cm->cg", base.vectors[rows], V[qi] * np.float32(-2)) + base.norms[rows]
    est[~inside] = np.inf
    if skip is not None:
        est[skip[rows]] = np.inf
    qr, est, rows = np.repeat(qi, rows.shape[1]), est.ravel(), rows.ravel()
    finite = np.isfinite(est)
    qr, est, rows = qr[finite], est[finite], rows[finite].astype(np.int64)
    kth = _kth(qr, est, want, q)
    keep = est <= (kth + margin)[qr]
    qr, est, rows = qr[keep], est[keep], rows[keep]
    starts = np.searchsorted(qr, np.arange(q + 1))
    return [
        Hint(base, rows[a:b], est[a:b], float(kth[i]))
        for i, (a, b) in enumerate(itertools.pairwise(starts))
    ]


def _kth(qi: np.ndarray, values: np.ndarray, want: int, q: int) -> np.ndarray:
    """[q] the want-th smallest value of each query's entries (qi sorted), +inf where a
    query has fewer than want."""
    starts = np.searchsorted(qi, np.arange(q + 1))
    counts = np.diff(starts)
    width = int(counts.max(initial=0))
    if width < want:
        return np.full(q, np.inf)
    table = np.full((q, width), np.inf, values.dtype)  # each query's values in a row
    table[qi, np.arange(len(qi)) - starts[qi]] = values
    return np.partition(table, want - 1, axis=1)[:, want - 1].astype(np.float64)


def _within_kth(
    qi: np.ndarray, gi: np.ndarray, minima: np.ndarray, want: int, margin: np.ndarray, q: int
) -> tuple[np.ndarray, np.ndarray]:
    """The (query, group) pairs whose minimum is within the margin of the query's want-th
    smallest group minimum (all of a query's pairs if it has fewer than want finite ones)."""
    finite = np.isfinite(minima)
    kth = _kth(qi[finite], minima[finite], want, q)
    keep = minima <= (kth + margin)[qi]
    return qi[keep], gi[keep]


class ExactSlots:
    """Exact search over a shared base plus this memory's overlay of changed slots."""

    def __init__(self, base: ScanBase, fold_at: int) -> None:
        self.base = base
        self.fold_at = fold_at
        slots, dim = base.vectors.shape
        self.overlay = Overlay(slots, dim)
        self.changed = np.zeros(slots, bool)  # slots changed since memory_init (snapshots)
        self._filled = base.count

    @classmethod
    def over(
        cls, vectors: np.ndarray, filled: np.ndarray | None = None, fold_at: int = 1024
    ) -> ExactSlots:
        return cls(ScanBase.over(vectors, filled), fold_at)

    @property
    def slots(self) -> int:
        return len(self.base.vectors)

    def filled_count(self) -> int:
        return self._filled

    def overlay_bytes(self) -> int:
        return self.overlay.nbytes

    def vector(self, slot: int) -> np.ndarray:
        return self.overlay.current(self.base.vectors, slot)

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        return self.overlay.current_rows(self.base.vectors, slots)

    def nearest(self, v: np.ndarray, hints: list[Hint | None] | None = None) -> int:
        return int(self.topk(v[None], 1, hints)[0, 0])

    def topk(self, V: np.ndarray, k: int, hints: list[Hint | None] | None = None) -> np.ndarray:
        """[Q, M] -> [Q, k] slots, nearest first, -1 where fewer slots are filled; hints
        (one per row, or None) are scans of the base done for a whole batch."""
        out = np.full((len(V), k), -1, np.int64)
        k = min(k, self._filled)
        if k == 0:
            return out
        ov_slots, ov = self.overlay.items()
        if hints is not None and len(hints) != len(V):
            raise ValueError(f"{len(hints)} hints for {len(V)} vectors")
        if hints is not None and not len(ov_slots) and len(V) > 1:
            ranked = self._hinted(V, k, hints)
            if ranked is not None:
                out[:, :k] = ranked
                return out
        for q, v in enumerate(V):
            d_ov = sqdist(ov, v)
            cand = self._base_candidates(v, d_ov, k, hints[q] if hints else None)
            dist = np.concatenate((sqdist(self.base.vectors[cand], v), d_ov))
            best = rank(np.concatenate((cand, ov_slots)), dist, k)
            out[q, : len(best)] = best
        return out

    def _hinted(self, V: np.ndarray, k: int, hints: list[Hint | None]) -> np.ndarray | None:
        """[Q, k] for a memory with no overlay whose hints all hold: every vector's hinted
        rows ranked at once (the same float32 row sums as sqdist, the same order as rank);
        None if a hint is missing or from another base."""
        if any(h is None or h.base is not self.base for h in hints):
            return None
        cand = np.concatenate([h.slots for h in hints])  # type: ignore[union-attr]
        counts = np.fromiter((len(h.slots) for h in hints), np.int64, len(hints))  # type: ignore[union-attr]
        if counts.min() < k:
            return None
        qi = np.repeat(np.arange(len(V)), counts)
        with np.errstate(over="ignore"):
            d = self.base.vectors[cand] - V[qi]
            dist = (d * d).sum(axis=1)
        ranked = cand[np.lexsort((cand, dist, qi))]
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        return ranked[starts[:, None] + np.arange(k)]

    def wants_base(self, V: np.ndarray, k: int) -> np.ndarray:
        """[Q] bool: whether searching V needs the base now (the overlay does not rule it
        out); the engine scans the base ahead, in one batch, for those."""
        if self.base.count == 0:
            return np.zeros(len(V), bool)
        return np.array([not self._overlay_suffices(v, None, k) for v in V])

    def _base_candidates(
        self, v: np.ndarray, d_ov: np.ndarray, k: int, hint: Hint | None
    ) -> np.ndarray:
        if self.base.count == 0:
            return _EMPTY
        if hint is not None and hint.base is self.base:
            cand = hint.candidates(self.overlay, k)
            if cand is not None:
                return cand
        if self._overlay_suffices(v, d_ov, k):
            return _EMPTY
        ov_slots, _ = self.overlay.items()
        return scan(self.base, v[None], k, exclude=ov_slots)[0].slots

    def _overlay_suffices(self, v: np.ndarray, d_ov: np.ndarray | None, k: int) -> bool:
        return self.overlay.rules_out_base(d_ov, v, self.base.max_norm, k)

    def set(self, slot: int, vector: np.ndarray) -> None:
        if self.overlay.set(slot, vector) and not self.base.is_filled(slot):
            self._filled += 1
        self.changed[slot] = True
        if len(self.overlay) >= self.fold_at:
            self.fold()

    def set_many(self, slots: np.ndarray, rows: np.ndarray) -> None:
        """set() for many distinct slots at once (restoring a snapshot)."""
        if len(slots) < self.fold_at:
            for slot, row in zip(slots, rows, strict=True):
                self.set(int(slot), row)
            return
        self.fold()
        self.base = self.base.with_rows(slots, rows)
        self._filled = self.base.count
        self.changed[slots] = True

    def fold(self) -> None:
        """Fold the overlay into a private copy of the base."""
        slots, rows = self.overlay.items()
        if len(slots):
            self.base = self.base.with_rows(slots, rows)
            self.overlay.clear()
