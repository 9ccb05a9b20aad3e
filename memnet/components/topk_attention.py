"""O = "topk-attention": softmax attention over the k slots nearest to the query.

a = softmax(m[r]·v);  o = sum_j a_j m[r_j]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memnet.components.base import Output, Params, register

# Added to the logits of padding entries: exp() of it is exactly 0 next to any real logit.
_MASKED = -1e30


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis of [B, K] where mask is True; 0 elsewhere and on empty rows."""
    a = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
    return jnp.where(mask, a, 0.0)


@register
class TopkAttention(Output):
    name = "topk-attention"

    def attend(
        self, p: Params, v: jax.Array, cand: jax.Array, mask: jax.Array, age: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        logits = jnp.einsum("bkm,bm->bk", cand, v)  # [B, K]
        a = masked_softmax(logits, mask)  # [B, K]
        o = jnp.einsum("bk,bkm->bm", a, cand)  # [B, M]
        return o, a
