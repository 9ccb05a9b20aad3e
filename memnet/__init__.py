"""memnet: Memory Networks (y = R(O(G(I(x), m), q))), searched exactly or with hnswlib graphs.

The library knows nothing of Redis: the streaming worker lives in the ``worker`` package.
The names below load on first use (PEP 562), so importing a light submodule (``memnet.config``,
``memnet.errors``, ``memnet.babi``) does not load JAX.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Answer": "memnet.engine",
    "Engine": "memnet.engine",
    "IndexConfig": "memnet.config",
    "InvalidInput": "memnet.errors",
    "MemnetError": "memnet.errors",
    "Memory": "memnet.memory",
    "Model": "memnet.model",
    "ModelConfig": "memnet.config",
    "ModelFileError": "memnet.errors",
    "Query": "memnet.engine",
    "Rejected": "memnet.engine",
    "SnapshotError": "memnet.errors",
    "Write": "memnet.engine",
    "load_model": "memnet.model",
    "random_model": "memnet.model",
    "save_model": "memnet.model",
}
__all__ = [
    "Answer",
    "Engine",
    "IndexConfig",
    "InvalidInput",
    "MemnetError",
    "Memory",
    "Model",
    "ModelConfig",
    "ModelFileError",
    "Query",
    "Rejected",
    "SnapshotError",
    "Write",
    "load_model",
    "random_model",
    "save_model",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'memnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:
    from memnet.config import IndexConfig, ModelConfig
    from memnet.engine import Answer, Engine, Query, Rejected, Write
    from memnet.errors import InvalidInput, MemnetError, ModelFileError, SnapshotError
    from memnet.memory import Memory
    from memnet.model import Model, load_model, random_model, save_model
