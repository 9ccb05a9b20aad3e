"""Squared L2 distances: the one formula every search ranks by, and the exact pruning
that lets a matrix product stand in for a full pass."""

from __future__ import annotations

import numpy as np


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


def slack(V: np.ndarray, max_norm: float) -> np.ndarray:
    """[Q] bound on |(|m|^2 - 2 m·v) in float32 - its exact value| for any row m of norm at
    most max_norm (worst-case float32 rounding, times 4)."""
    v_norm = np.sqrt((V.astype(np.float64) ** 2).sum(axis=1))
    scale = max_norm**2 + 2 * max_norm * v_norm
    return 4 * (V.shape[1] + 2) * float(np.finfo(np.float32).eps) * scale


def estimate_candidates(
    vectors: np.ndarray, norms: np.ndarray, max_norm: float, V: np.ndarray, k: int
) -> list[np.ndarray | None]:
    """Per query, the rows that can be among its k nearest: one matrix product estimates
    every distance (up to the constant |v|^2) as |m|^2 - 2 m·v from cached squared norms
    (+inf excludes a row); rows within twice the rounding bound of the k-th best survive.
    None where overflow made the estimate useless."""
    with np.errstate(over="ignore", invalid="ignore"):
        estimate = norms[None, :] - 2 * (V @ vectors.T)  # [Q, S]
    bound = slack(V, max_norm)
    return [_within(row, k, 2 * bound[q]) for q, row in enumerate(estimate)]


def squared_norms(vectors: np.ndarray, filled: np.ndarray | None) -> tuple[np.ndarray, float]:
    """([S] float32 squared norms, +inf for empty slots; the largest norm among the rest)."""
    norms = np.empty(len(vectors), np.float64)
    for start in range(0, len(vectors), 65536):  # in slices: no full float64 copy at 1M rows
        x = vectors[start : start + 65536].astype(np.float64)
        norms[start : start + 65536] = (x * x).sum(axis=1)
    if filled is not None:
        norms[~filled] = np.inf
    finite = norms[np.isfinite(norms)]
    return norms.astype(np.float32), float(np.sqrt(finite.max())) if len(finite) else 0.0
