"""Registered components. Importing this package registers every built-in form."""

from memnet.components import (  # noqa: F401  (imported to register)
    gated_nearest,
    mlp_encoder,
    mlp_response,
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
