"""R = "mlp": y = relu(o·Wr1 + br1)·Wr2 + br2, the reference design's response map."""

from __future__ import annotations

import jax

from memnet.components.base import Params, ParamSpec, Response, register


@register
class MlpResponse(Response):
    name = "mlp"

    def params(self) -> dict[str, ParamSpec]:
        c = self.config
        return {
            "response_mlp_w1": ParamSpec((c.memory_dim, c.hidden)),
            "response_mlp_b1": ParamSpec((c.hidden,), "zeros"),
            "response_mlp_w2": ParamSpec((c.hidden, c.output_dim)),
            "response_mlp_b2": ParamSpec((c.output_dim,), "zeros"),
        }

    def respond(self, p: Params, o: jax.Array) -> jax.Array:
        h = jax.nn.relu(o @ p["response_mlp_w1"] + p["response_mlp_b1"])  # [B, H]
        return h @ p["response_mlp_w2"] + p["response_mlp_b2"]  # [B, Y]
