"""An independent plain-numpy memory network, written from the README's semantics.

It shares no code with memnet: float64 throughout, brute-force search, no batching.
"""

from __future__ import annotations

import numpy as np


def relu(z):
    return np.maximum(z, 0.0)


class NumpyMemNet:
    def __init__(self, params: dict[str, np.ndarray], top_k: int) -> None:
        self.p = {k: np.asarray(v, np.float64) for k, v in params.items()}
        self.top_k = top_k

    def new_memory(self) -> np.ndarray:
        return self.p["memory_init"].copy()

    def I(self, x):
        p = self.p
        return (
            relu(np.asarray(x, np.float64) @ p["input_mlp_w1"] + p["input_mlp_b1"])
            @ p["input_mlp_w2"]
            + p["input_mlp_b2"]
        )

    def nearest(self, m, v):
        return int(np.argmin(((m - v) ** 2).sum(axis=1)))

    def topk(self, m, v):
        k = min(self.top_k, len(m))
        return np.argsort(((m - v) ** 2).sum(axis=1), kind="stable")[:k]

    def gate(self, i, m_s):
        z = np.concatenate([i, m_s]) @ self.p["gate_w"][:, 0] + self.p["gate_b"][0]
        return 1.0 / (1.0 + np.exp(-np.clip(z, -500, 500)))

    def G(self, m, x, slot=None):
        """Write x into m in place; returns the slot used (forced to ``slot`` if given)."""
        i = self.I(x)
        s = self.nearest(m, i) if slot is None else slot
        g = self.gate(i, m[s])
        m[s] = (1 - g) * m[s] + g * i
        return s

    def O(self, m, v, slots=None):
        r = self.topk(m, v) if slots is None else np.asarray(slots)
        logits = m[r] @ v
        a = np.exp(logits - logits.max())
        a /= a.sum()
        return a @ m[r], r, a

    def R(self, o):
        p = self.p
        return (
            relu(o @ p["response_mlp_w1"] + p["response_mlp_b1"]) @ p["response_mlp_w2"]
            + p["response_mlp_b2"]
        )

    def query(self, m, x=None, q=None, slots=None):
        v = self.I(x) if x is not None else np.asarray(q, np.float64)
        o, r, a = self.O(m, v, slots)
        return self.R(o), r, a
