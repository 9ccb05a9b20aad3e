"""Registered components. Importing this package registers every built-in form."""

from memnet.components import (  # noqa: F401  (imported to register)
    answer_mlp,
    answer_response,
    append_only,
    gated_nearest,
    mlp_encoder,
    mlp_response,
    multi_hop,
    position_bow,
    topk_attention,
)
from memnet.components.base import (
    REGISTRY,
    Component,
    Encoder,
    Generalizer,
    Output,
    ParamSpec,
    Response,
    register,
)

__all__ = [
    "REGISTRY",
    "Component",
    "Encoder",
    "Generalizer",
    "Output",
    "ParamSpec",
    "Response",
    "register",
]
