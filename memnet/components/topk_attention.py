"""O = "topk-attention": softmax attention over the k slots nearest to the query.

a = softmax(m[r]·v);  o = sum_j a_j m[r_j]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from memnet.components.base import Output, Params, register


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis of [B, K] where mask is True; 0 elsewhere and on empty rows.

    jax.nn.softmax over the kept entries only (its ``where``): a constant standing in for
    padding (-1e30 once) took all the weight from real logits below it, which inputs that
    pass the checks can reach (norms of ~1e15). The result is bit for bit the earlier one
    otherwise. Padding entries take the row's largest kept logit, so exp never overflows in
    them (a NaN there, though masked out, would make gradients NaN); an empty row is taken
    whole, then zeroed."""
    keep = mask | ~mask.any(axis=-1, keepdims=True)
    top = jnp.max(jnp.where(keep, logits, -jnp.inf), axis=-1, keepdims=True)
    a = jax.nn.softmax(jnp.where(keep, logits, top), axis=-1, where=keep)
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
