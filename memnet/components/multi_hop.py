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
``latest`` (default false): from the second hop on, attention is not a softmax but the
latest fact that matches, read backwards (stick-breaking) from what the hop before found or
from the present: each slot matches with m_k = sigmoid(score_k + b_h), and

    a_hk = m_k [ g_h sum_{j newer than k} a_{h-1,j} prod_{i between j and k} (1 - m_i)
                 + (1 - g_h) prod_{i newer than k} (1 - m_i) ],     g_h = sigmoid(gate_h)

(learned b_h and gate_h per hop). "Where was the apple before the kitchen?" needs the latest
move of its carrier before the move into the kitchen: with a softmax over content plus a
bias per relative age, that bias (learned from a few hundred stories) has to rank the latest
match above every older one at every gap, and on qa3 it did not (12 of the 15 held-out
errors were the third hop on an older move of the right person; scripts/babi_errors.py);
here recency among the matches is the rule itself, as in MemNN's hard "latest"
comparisons, in soft form. The weights sum to at most 1 (the rest is
"no match"). Slots are ordered by age, and equal ages by position (_newer). It needs a G
that records when each slot was written (append-only); one that gives every slot age 0 is
refused.
Set ``top_k`` to ``slots`` to attend over the whole memory, as the paper does and as
``memnet train`` trains it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from memnet.components.base import REGISTRY, Output, Params, ParamSpec, option, register
from memnet.components.topk_attention import masked_softmax
from memnet.config import ConfigValueError

# Each hop is unrolled in the compiled functions (compile time and code grow with it);
# MemN2N uses 3, and no bAbI task needs more than 3 supporting facts.
MAX_HOPS = 32
LATEST_CLIP = 60.0  # |logit| at most this in a latest hop (_latest)


@register
class MultiHop(Output):
    name = "multi-hop"
    options = ("hops", "relative_time", "latest")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        if config.memory_dim % 2:
            raise ConfigValueError("multi-hop needs an even memory_dim (key and value halves)")
        self.d = config.memory_dim // 2
        self.hops = option(config, "hops", int, 3, most=MAX_HOPS)
        self.relative = option(config, "relative_time", bool, False)
        self.latest = option(config, "latest", bool, False)
        g = REGISTRY["generalizer"].get(config.generalizer) if self.latest else None
        if g is not None and not g.records_ages:  # type: ignore[attr-defined]
            raise ConfigValueError(
                f"option 'latest' needs a G that records when each slot was written "
                f"(append-only); {config.generalizer!r} gives every slot age 0"
            )

    def params(self) -> dict[str, ParamSpec]:
        s, d = self.config.slots, self.d
        return (
            {
                "time_key": ParamSpec((s, d)),
                "time_value": ParamSpec((s, d)),
                "hop_h": ParamSpec((d, d)),
            }
            | ({"time_rel": ParamSpec((self.hops, 2 * s - 1), "zeros")} if self.relative else {})
            | (
                {
                    "latest_bias": ParamSpec((self.hops,), "zeros"),
                    "latest_gate": ParamSpec((self.hops,), "zeros"),
                }
                if self.latest
                else {}
            )
        )

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
            if self.latest and attention:
                a = self._latest(p, h, score, mask, age, attention[-1])
            else:
                a = masked_softmax(score, mask)  # [B, K]
            o = jnp.einsum("bk,bkd->bd", a, values)
            u = u @ p["hop_h"] + o
            attention.append(a)
        return jnp.concatenate([u, o], axis=-1), jnp.stack(attention)

    @staticmethod
    def _latest(
        p: Params, h: int, score: jax.Array, mask: jax.Array, age: jax.Array, before: jax.Array
    ) -> jax.Array:
        """Hop h's weights [B, K] under the ``latest`` option (the module's docstring).

        Slots are in a strict order of writes (_newer), so "between" is well defined and
        the weights sum to at most 1 even where ages tie. With log_not_i = log(1 - m_i) and
        c_k = sum of log_not_i over the slots i newer than k (log of "no slot newer than k
        matched"), the slots between an anchor j and an older k give c_k - c_j - log_not_j,
        never above 0 (a sum of logs of probabilities), so every exp below is of a number
        <= 0 and never overflows. The logits are clipped to +-LATEST_CLIP: m and 1 - m stay
        above e^-60, each c_k is finite (at least -60 K) and no inf - inf can make a NaN,
        whatever the norms of the slots; the gradient is lost only where a slot's match is
        already certain."""
        logit = jnp.clip(score + p["latest_bias"][h], -LATEST_CLIP, LATEST_CLIP)
        log_m = jax.nn.log_sigmoid(logit)  # [B, K]
        log_not = jnp.where(mask, jax.nn.log_sigmoid(-logit), 0.0)  # empty slots never match
        newer = _newer(age)  # [B, k, i]: slot i newer than slot k
        c = jnp.einsum("bki,bi->bk", newer.astype(score.dtype), log_not)  # [B, K]
        older = jnp.swapaxes(newer, 1, 2) & mask[:, :, None] & mask[:, None, :]  # [B, j, k]
        between = c[:, None, :] - c[:, :, None] - log_not[:, :, None]  # [B, j, k]
        reach = jnp.where(older, jnp.exp(jnp.minimum(between, 0.0)), 0.0)  # [B, j, k]
        from_anchor = jnp.einsum("bj,bjk->bk", before, reach)
        g = jax.nn.sigmoid(p["latest_gate"][h])
        return jnp.where(mask, jnp.exp(log_m) * (g * from_anchor + (1 - g) * jnp.exp(c)), 0.0)


def _newer(age: jax.Array) -> jax.Array:
    """[B, k, i]: whether slot i comes after slot k in a strict order of writes: a smaller
    age, or the same age and a later position. Served memories of an append-only G have
    distinct ages; training's age noise clamps the oldest to slots - 1, where the later
    position is the later write (training lays memories out oldest first)."""
    k = age.shape[-1]
    later = jnp.arange(k)[None, :] > jnp.arange(k)[:, None]  # [k, i]: i after k
    a_k, a_i = age[:, :, None], age[:, None, :]
    return (a_i < a_k) | ((a_i == a_k) & later[None])
