"""R = "answer": a linear classifier over the answer vocabulary, y = o·W + b (y holds the
logits). The response names the best-scoring answer: ``"answer": word`` and ``"answers"``,
its words as a list (bAbI's multi-word answers, such as "apple,milk" or "n,w", are one class).
Options: ``answers`` (the class names, ``output_dim`` of them).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from memnet.components.base import Params, ParamSpec, Response, option, register
from memnet.config import ConfigValueError


@register
class AnswerResponse(Response):
    name = "answer"
    options = ("answers",)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.answers = option(config, "answers", list)
        if len(self.answers) != config.output_dim:
            raise ConfigValueError(
                f"'answers' lists {len(self.answers)} classes but output_dim is {config.output_dim}"
            )

    def params(self) -> dict[str, ParamSpec]:
        c = self.config
        return {
            "answer_w": ParamSpec((c.memory_dim, c.output_dim)),
            "answer_b": ParamSpec((c.output_dim,), "zeros"),
        }

    def respond(self, p: Params, o: jax.Array) -> jax.Array:
        return o @ p["answer_w"] + p["answer_b"]  # [B, Y]

    def describe(self, y: np.ndarray) -> dict[str, Any]:
        answer = self.answers[int(np.argmax(y))]
        return {"answer": answer, "answers": answer.split(",")}
