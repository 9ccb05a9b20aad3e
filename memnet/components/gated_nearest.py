"""G = "gated-nearest": blend the input into its nearest slot through a learned gate.

s = argmin_j |m_j - i|^2;  g = sigmoid(concat(i, m_s)·gate_w + gate_b);  m_s <- (1-g)·m_s + g·i
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from memnet.components.base import Generalizer, Params, ParamSpec, register
from memnet.dense import nearest

if TYPE_CHECKING:
    from memnet.dense import Arena
    from memnet.exact import Hint
    from memnet.memory import Memory


def sigmoid(z: np.float32) -> np.float32:
    """Overflow-free logistic function of one float32."""
    if z >= 0:
        return np.float32(1) / (np.float32(1) + np.exp(-z))
    e = np.exp(z)
    return e / (np.float32(1) + e)


def sigmoid_many(z: np.ndarray) -> np.ndarray:
    """sigmoid() of each float32 of z [N], the same values (the same float32 operations)."""
    with np.errstate(over="ignore", invalid="ignore"):  # in the branch not taken
        up = np.float32(1) / (np.float32(1) + np.exp(-z))
        e = np.exp(z)
        down = e / (np.float32(1) + e)
    return np.where(z >= 0, up, down)


@register
class GatedNearest(Generalizer):
    name = "gated-nearest"
    starts_filled = True
    searches = True
    batched = True

    def params(self) -> dict[str, ParamSpec]:
        m = self.config.memory_dim
        return {"gate_w": ParamSpec((2 * m, 1)), "gate_b": ParamSpec((1,), "zeros")}

    def write(self, p: Params, memory: Memory, i: np.ndarray, hint: Hint | None = None) -> bool:
        s = memory.nearest(i, hint)
        m_s = memory.vector(s)  # [M]
        with np.errstate(over="ignore", invalid="ignore"):  # (huge weights: refused below)
            z = np.dot(np.concatenate((i, m_s)), p["gate_w"][:, 0]) + p["gate_b"][0]
            g = sigmoid(z)
            new = (np.float32(1) - g) * m_s + g * i
        if not np.isfinite(new).all():
            return False
        memory.set(s, new)
        return True

    def write_many(
        self, p: Params, arena: Arena, rows: np.ndarray, i: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        s = nearest(arena.vectors, arena.filled, i, rows)  # [N]
        m_s = arena.vectors[rows, s]  # [N, M]
        # np.vecdot takes each row's dot product with the same BLAS call as np.dot above,
        # so z is bit for bit write()'s (a matrix product would sum in another order).
        with np.errstate(over="ignore", invalid="ignore"):  # (as write())
            z = np.vecdot(np.concatenate((i, m_s), axis=1), p["gate_w"][:, 0]) + p["gate_b"][0]
            g = sigmoid_many(z)[:, None]  # [N, 1]
            return s, (np.float32(1) - g) * m_s + g * i
