"""memnet: Memory Networks (y = R(O(G(I(x), m), q))), searched exactly or with hnswlib graphs.

The library knows nothing of Redis: the streaming worker lives in the ``worker`` package.
"""

from memnet.config import IndexConfig, ModelConfig
from memnet.engine import Answer, Engine, Query, Rejected, Write
from memnet.errors import InvalidInput, MemnetError, ModelFileError, SnapshotError
from memnet.memory import Memory
from memnet.model import Model, load_model, random_model, save_model

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
