"""G = "gated-nearest": blend the input into its nearest slot through a learned gate.

s = argmin_j |m_j - i|^2;  g = sigmoid(concat(i, m_s)·gate_w + gate_b);  m_s <- (1-g)·m_s + g·i
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from memnet.components.base import Generalizer, Params, ParamSpec, register

if TYPE_CHECKING:
    from memnet.memory import Memory


def sigmoid(z: np.float32) -> np.float32:
    """Overflow-free logistic function of one float32."""
    if z >= 0:
        return np.float32(1) / (np.float32(1) + np.exp(-z))
    e = np.exp(z)
    return e / (np.float32(1) + e)


@register
class GatedNearest(Generalizer):
    name = "gated-nearest"
    starts_filled = True
    searches = True

    def params(self) -> dict[str, ParamSpec]:
        m = self.config.memory_dim
        return {"gate_w": ParamSpec((2 * m, 1)), "gate_b": ParamSpec((1,), "zeros")}

    def write(self, p: Params, memory: Memory, i: np.ndarray) -> None:
        s = memory.nearest(i)
        m_s = memory.vector(s)  # [M]
        z = np.dot(np.concatenate((i, m_s)), p["gate_w"][:, 0]) + p["gate_b"][0]
        g = sigmoid(z)
        memory.set(s, (np.float32(1) - g) * m_s + g * i)
