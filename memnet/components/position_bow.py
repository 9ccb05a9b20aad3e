"""I = "position-bow": a sentence as a position-encoded bag of words (End-To-End Memory
Networks, Sukhbaatar et al. 2015, section 4.1), embedded twice: a key and a value half.

    I(text) = concat(sum_j l_j * A[w_j], sum_j l_j * C[w_j])      (M = 2d)
    l_kj = (1 - j/J) - (k/d)(1 - 2j/J)   for word j = 1..J of the text, dimension k = 1..d

The key half (A) is what queries are matched against, the value half (C) what a read
returns (see multi_hop.py); a question is encoded by the same function, so its key half is
the question embedding (MemN2N's B = A tying). Options: ``vocabulary`` (from memnet.text,
travelling in the model file) and the longest text in words, which is ``input_dim``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from memnet.components.base import Encoder, Params, ParamSpec, option, register
from memnet.config import ConfigValueError
from memnet.text import Vocabulary

MAX_WORDS = 1 << 16  # input_dim: a batch holds [events, input_dim] word ids


def position_weights(mask: jax.Array, d: int) -> jax.Array:
    """mask [B, L] (True for words) -> l [B, L, d], counting each text's own length J."""
    J = jnp.maximum(mask.sum(-1, keepdims=True), 1).astype(jnp.float32)[..., None]  # [B,1,1]
    j = jnp.arange(1, mask.shape[-1] + 1, dtype=jnp.float32)[None, :, None]  # [1, L, 1]
    k = jnp.arange(1, d + 1, dtype=jnp.float32)[None, None, :] / d  # [1, 1, d]
    return ((1 - j / J) - k * (1 - 2 * j / J)) * mask[..., None]


@register
class PositionBow(Encoder):
    name = "position-bow"
    options = ("vocabulary",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.memory_dim % 2:
            raise ConfigValueError("position-bow needs an even memory_dim (key and value halves)")
        if config.input_dim > MAX_WORDS:  # (no tensor's shape bounds it: batches' do)
            raise ConfigValueError(
                f"position-bow's input_dim (the longest text in words) must be at most "
                f"{MAX_WORDS}, got {config.input_dim}"
            )
        self.vocabulary = Vocabulary(option(config, "vocabulary", list))
        self.d = config.memory_dim // 2

    def params(self) -> dict[str, ParamSpec]:
        shape = (len(self.vocabulary), self.d)
        return {"embed_key": ParamSpec(shape), "embed_value": ParamSpec(shape)}

    def prepare(self, value: Any) -> np.ndarray:
        return self.vocabulary.encode(value, self.config.input_dim)  # [L] word ids

    def example(self) -> np.ndarray:
        row = np.zeros(self.config.input_dim, np.int32)
        row[0] = 1
        return row

    def encode(self, p: Params, rows: jax.Array) -> jax.Array:
        weights = position_weights(rows > 0, self.d)  # [B, L, d]
        key = (weights * p["embed_key"][rows]).sum(1)  # [B, d]
        value = (weights * p["embed_value"][rows]).sum(1)
        return jnp.concatenate([key, value], axis=-1)  # [B, M]
