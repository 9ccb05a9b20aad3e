"""Checks for vectors that arrive from outside (events, CLI)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memnet._scan import finite_f32
from memnet.errors import InvalidInput


def as_vector(value: Any, length: int, what: str) -> np.ndarray:
    """Return value as a float32 vector [length]; raises InvalidInput naming ``what``.

    Accepts a sequence of numbers or a numeric numpy array; values that overflow float32
    count as non-finite. The vector returned is the event's own: a copy of a caller's array
    (which the caller may change before the event is applied), except an array over
    immutable bytes (the wire's, read in place), which nothing can change.
    """
    if _checked_float32(value, length):  # (_immutable inlined: this runs once per event)
        return value if type(value.base) is bytes and not value.flags.writeable else value.copy()
    if isinstance(value, np.ndarray):
        array = value
    elif isinstance(value, (list, tuple)):
        array = np.array(value)
    else:
        raise InvalidInput(f"{what} must be a vector of numbers, got {type(value).__name__}")
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        raise InvalidInput(f"{what} must be a flat vector of numbers")
    if array.shape[0] != length:
        raise InvalidInput(f"{what} must have {length} values, got {array.shape[0]}")
    with np.errstate(over="ignore", invalid="ignore"):
        vector = np.array(array, np.float32, order="C", copy=None if _immutable(array) else True)
    if not np.isfinite(vector).all():
        raise InvalidInput(f"{what} has non-finite values (NaN, inf or beyond float32)")
    with np.errstate(over="ignore"):
        if not np.isfinite(np.dot(vector, vector)):
            raise InvalidInput(f"{what} is too large (its squared norm overflows float32)")
    return vector


def _checked_float32(value: Any, length: int) -> bool:
    """The fast path for what the wire mostly brings (a float32 vector from bin): True if
    value is a contiguous float32 numpy vector [length] that passes every check.

    Its squared norm is finite exactly when every value is finite and the sum does not
    overflow (the squares are never negative, so an inf never cancels), which are the two
    checks of the full path. ``_scan.finite_f32`` sums it in double (each square exact) and
    says True only below 1e38, where float32's sum, in any order, cannot overflow; near the
    limit it says False and the full path decides with numpy's float32 product, as before,
    so both paths reach the same verdict for every vector."""
    return type(value) is np.ndarray and finite_f32(value, length)


def _immutable(array: np.ndarray) -> bool:
    """Whether nothing can change the array's values: a read-only view of a bytes object."""
    return not array.flags.writeable and type(array.base) is bytes
