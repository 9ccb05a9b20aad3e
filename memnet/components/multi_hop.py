"""O = "multi-hop": several rounds of attention over the retrieved slots (End-To-End Memory
Networks, Sukhbaatar et al. 2015), with the slot's age as a learned time encoding.

A slot holds a key half and a value half (M = 2d, as position-bow writes them). With
u_1 = the key half of the query vector v, for hop h = 1..hops:

    a_h = softmax over retrieved slots j of (key_j + T_key[age_j]) . u_h
    o_h = sum_j a_hj (value_j + T_value[age_j]);      u_{h+1} = u_h . H + o_h

The output feature is concat(u_{hops+1}, o_hops) [M]; the weights returned are a_hops.
Options: ``hops`` (default 3); ``relative_time`` (default false): from the second hop on,
each slot's score also gets a learned bias for its age relative to the slots the hop before
attended,

    + sum_j a_{h-1,j} T_rel[h, age_k - age_j]        (a table of 2S - 1 biases per hop)

so a hop can ask for "the latest fact before the one just found" (where was John *when*
he dropped the football: MemNN's time features, Weston et al. 2014 §3.4, in soft form).
Set ``top_k`` to ``slots`` to attend over the whole memory, as the paper does and as
``memnet train`` trains it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from memnet.components.base import Output, Params, ParamSpec, option, register
from memnet.components.topk_attention import masked_softmax
from memnet.config import ConfigValueError

# Each hop is unrolled in the compiled functions (compile time and code grow with it);
# MemN2N uses 3, and no bAbI task needs more than 3 supporting facts.
MAX_HOPS = 32


@register
class MultiHop(Output):
    name = "multi-hop"
    options = ("hops", "relative_time")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.memory_dim % 2:
            raise ConfigValueError("multi-hop needs an even memory_dim (key and value halves)")
        self.d = config.memory_dim // 2
        self.hops = option(config, "hops", int, 3, most=MAX_HOPS)
        self.relative = option(config, "relative_time", bool, False)

    def params(self) -> dict[str, ParamSpec]:
        s, d = self.config.slots, self.d
        return {
            "time_key": ParamSpec((s, d)),
            "time_value": ParamSpec((s, d)),
            "hop_h": ParamSpec((d, d)),
        } | ({"time_rel": ParamSpec((self.hops, 2 * s - 1), "zeros")} if self.relative else {})

    def attend(
        self, p: Params, v: jax.Array, cand: jax.Array, mask: jax.Array, age: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        feature, attention = self.hop_attention(p, v, cand, mask, age)
        return feature, attention[-1]

    def hop_attention(
        self, p: Params, v: jax.Array, cand: jax.Array, mask: jax.Array, age: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """-> (feature [B, M], attention of every hop [hops, B, K]); training reads them all."""
        d = self.d
        keys = cand[..., :d] + p["time_key"][age]  # [B, K, d]
        values = cand[..., d:] + p["time_value"][age]
        u = v[:, :d]  # [B, d]
        attention: list[jax.Array] = []
        if self.relative:  # [B, K, K]: age of slot k relative to slot j, as a table index
            relative = age[:, :, None] - age[:, None, :] + self.config.slots - 1
        for h in range(self.hops):
            score = jnp.einsum("bkd,bd->bk", keys, u)
            if self.relative and attention:
                score += jnp.einsum("bkj,bj->bk", p["time_rel"][h][relative], attention[-1])
            a = masked_softmax(score, mask)  # [B, K]
            o = jnp.einsum("bk,bkd->bd", a, values)
            u = u @ p["hop_h"] + o
            attention.append(a)
        return jnp.concatenate([u, o], axis=-1), jnp.stack(attention)
