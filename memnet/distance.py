"""Squared L2 distances: the one formula every search ranks by (the batched exact pruning
that lets a matrix product stand in for a full pass lives in memnet/exact.py)."""

from __future__ import annotations

import numpy as np


def sqdist(vectors: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Squared L2 distances [N] from each row of vectors [N, M] to v [M].

    Each entry depends only on its own row and v, never on N. A distance beyond float32's
    range is +inf (such slots rank by slot number among themselves), not an error.
    """
    with np.errstate(over="ignore"):
        d = vectors - v
        return (d * d).sum(axis=1)


def rank(cand: np.ndarray, dist: np.ndarray, k: int) -> np.ndarray:
    """The first k of cand ordered by (distance, slot number)."""
    return cand[np.lexsort((cand, dist))[:k]]


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


# The spacing of float32's subnormals, 2^-149: below 2^-126 a float32 result's rounding
# error is absolute, up to half of it, however small the result (gradual underflow), so
# relative error bounds alone fail for vectors of tiny norm (|v| ~ 1e-21: squares ~ 1e-42).
SUBNORMAL = 2.0**-149


def underflow(operations: float) -> float:
    """An absolute bound on what underflow adds to a float32 computation of that many
    roundings (each within SUBNORMAL / 2; counted generously by the callers)."""
    return operations * SUBNORMAL
