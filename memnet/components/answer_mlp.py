"""R = "answer-mlp": the answer classifier plus a hidden ReLU layer beside it,

    y = o·W + b + relu(o·W1 + b1)·W2          (W [M, Y], W1 [M, H], W2 [H, Y]; H = hidden)

y holds the logits; the response fields are those of "answer". A linear classifier over
concat(u, o) scores the question's words and the read memory's words separately, while
yes/no and "maybe" answers (bAbI tasks 6, 9, 10) depend on whether they agree: the hidden
layer can form that product. The linear path beside it learns as "answer" does from the
first step (a hidden layer alone sat on the yes/no plateau of task 6 for every seed tried).
"""

from __future__ import annotations

import jax

from memnet.components.answer_response import AnswerResponse
from memnet.components.base import Params, ParamSpec, register


@register
class AnswerMlp(AnswerResponse):
    name = "answer-mlp"

    def params(self) -> dict[str, ParamSpec]:
        c = self.config
        return {
            **super().params(),  # answer_w [M, Y], answer_b [Y]
            "answer_w1": ParamSpec((c.memory_dim, c.hidden)),
            "answer_b1": ParamSpec((c.hidden,), "zeros"),
            "answer_w2": ParamSpec((c.hidden, c.output_dim)),
        }

    def respond(self, p: Params, o: jax.Array) -> jax.Array:
        h = jax.nn.relu(o @ p["answer_w1"] + p["answer_b1"])  # [B, H]
        return super().respond(p, o) + h @ p["answer_w2"]  # [B, Y]
