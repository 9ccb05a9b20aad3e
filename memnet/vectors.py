"""Checks for vectors that arrive from outside (events, CLI)."""

from __future__ import annotations

from typing import Any

import numpy as np

from memnet.errors import InvalidInput


def as_vector(value: Any, length: int, what: str) -> np.ndarray:
    """Return value as a float32 vector [length]; raises InvalidInput naming ``what``.

    Accepts a sequence of numbers or a numeric numpy array; values that overflow float32
    count as non-finite.
    """
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
        vector = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(vector).all():
        raise InvalidInput(f"{what} has non-finite values (NaN, inf or beyond float32)")
    with np.errstate(over="ignore"):
        if not np.isfinite(np.dot(vector, vector)):
            raise InvalidInput(f"{what} is too large (its squared norm overflows float32)")
    return vector
