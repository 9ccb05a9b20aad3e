"""Jitted functions whose per-row results do not depend on the batch they ran in.

XLA on the CPU picks different matmul kernels for different batch sizes, so I(x) computed in a
batch of 7 can differ in the last bit from I(x) computed alone. That would let batching change
which slot is nearest, and make a replay after a crash answer differently. ``rowwise`` runs the
function over fixed-shape chunks of ``CHUNK`` rows with ``lax.map``: every row always goes
through the same compiled computation, so results are bitwise identical however events are
grouped (tests/test_engine.py checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

CHUNK = 64


def rowwise(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn(params, *rows) with rows [B, ...] -> jitted, batch-invariant, numpy-returning call."""

    @jax.jit
    def mapped(params: Any, *chunks: jax.Array) -> Any:
        return jax.lax.map(lambda xs: fn(params, *xs), chunks)  # chunks: [N, CHUNK, ...]

    def call(params: Any, *arrays: np.ndarray) -> Any:
        n = len(arrays[0])
        chunks = max(1, -(-n // CHUNK))
        chunks = 1 << (chunks - 1).bit_length()  # powers of two: few distinct compilations
        total = chunks * CHUNK
        padded = []
        for a in arrays:
            full = np.zeros((total, *a.shape[1:]), a.dtype)
            full[:n] = a
            padded.append(full.reshape(chunks, CHUNK, *a.shape[1:]))
        out = mapped(params, *padded)
        return jax.tree.map(lambda o: np.asarray(o).reshape(total, *o.shape[2:])[:n], out)

    return call
