"""I = "mlp": I(x) = relu(x·W1 + b1)·W2 + b2, the reference design's input map."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from memnet.components.base import Encoder, Params, ParamSpec, register
from memnet.vectors import as_vector


@register
class MlpEncoder(Encoder):
    name = "mlp"

    def params(self) -> dict[str, ParamSpec]:
        c = self.config
        return {
            "input_mlp_w1": ParamSpec((c.input_dim, c.hidden)),
            "input_mlp_b1": ParamSpec((c.hidden,), "zeros"),
            "input_mlp_w2": ParamSpec((c.hidden, c.memory_dim)),
            "input_mlp_b2": ParamSpec((c.memory_dim,), "zeros"),
        }

    def prepare(self, value: Any) -> np.ndarray:
        return as_vector(value, self.config.input_dim, "x")  # [D]

    def example(self) -> np.ndarray:
        return np.zeros(self.config.input_dim, np.float32)

    def encode(self, p: Params, rows: jax.Array) -> jax.Array:
        h = jax.nn.relu(rows @ p["input_mlp_w1"] + p["input_mlp_b1"])  # [B, H]
        return h @ p["input_mlp_w2"] + p["input_mlp_b2"]  # [B, M]
