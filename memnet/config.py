"""The model config: what a model file says about its sizes, components and search index.

It travels as JSON in the model file's metadata (key ``config``) and in every snapshot
manifest, so a model's hyperparameters never live only in code.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FORMAT = "memnet-model"
VERSION = 1

_SIZES = ("input_dim", "memory_dim", "output_dim", "hidden", "slots", "top_k")
_COMPONENTS = ("encoder", "generalizer", "output", "response")  # defaults: ModelConfig


class ConfigValueError(ValueError):
    """A config value is wrong; the message names the key."""


def _positive_int(where: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigValueError(f"{where} '{key}' must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class IndexConfig:
    """How a memory is searched. Part of the model so every worker searches identically.

    Memories of at most ``exact_max_slots`` slots are searched exactly: a base matrix
    shared by all memories, scanned for whole batches at once, plus each memory's overlay of
    changed slots, folded into a private base at ``overlay_max`` slots (memnet/exact.py).
    On data without structure (random 64-dim vectors) this beats hnswlib at the same recall
    up to a million slots (docs/performance.md). Larger memories use an hnswlib graph (``m``,
    ``ef_construction``, ``ef_search``, ``seed``; built once per model and shared by every
    worker through a cache file) whose ``candidates`` are re-ranked with current vectors;
    slots changed since the graph was built (at most ``overlay_max``) are searched exactly,
    then re-indexed together (memnet/search.py). Data with structure (real embeddings) is
    where a graph shines: set ``exact_max_slots`` below ``slots`` to use one.
    """

    exact_max_slots: int = 1_048_576
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 400
    candidates: int = 8
    # Queries far outside the graph's rows are checked against every row (exactly) in
    # memories up to this size; beyond it the graph serves them too (faster, less exact).
    far_exact_max_slots: int = 262_144
    overlay_max: int = 1024
    seed: int = 100

    @classmethod
    def from_json(cls, data: Any) -> IndexConfig:
        if not isinstance(data, dict):
            raise ConfigValueError(f"model config 'index' must be an object, got {data!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigValueError(f"model config 'index' has unknown keys {unknown}")
        values = {k: _positive_int("model config index", k, v) for k, v in data.items()}
        return cls(**values)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes, component names and search settings of one model (see README, "Model")."""

    input_dim: int
    memory_dim: int
    output_dim: int
    hidden: int
    slots: int
    top_k: int
    encoder: str = "mlp"
    generalizer: str = "gated-nearest"
    output: str = "topk-attention"
    response: str = "mlp"
    index: IndexConfig = field(default_factory=IndexConfig)
    # Component-specific settings (vocabulary, hops, ...), validated by the components.
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in _SIZES:
            _positive_int("model config", key, getattr(self, key))
        for key in _COMPONENTS:
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ConfigValueError(
                    f"model config '{key}' must be a component name, got {value!r}"
                )

    @property
    def k(self) -> int:
        """How many slots a query retrieves: ``min(top_k, slots)``."""
        return min(self.top_k, self.slots)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": FORMAT, "version": VERSION}
        data.update({key: getattr(self, key) for key in _SIZES})
        data.update({key: getattr(self, key) for key in _COMPONENTS})
        data["index"] = asdict(self.index)
        if self.options:
            data["options"] = self.options
        return data

    def canonical(self) -> str:
        """The config as canonical JSON text (sorted keys, no spaces): hashed into fingerprints."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: Any) -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigValueError(f"model config must be a JSON object, got {type(data).__name__}")
        if data.get("format") != FORMAT:
            raise ConfigValueError(
                f"model config 'format' must be {FORMAT!r}, got {data.get('format')!r}"
            )
        if data.get("version") != VERSION:
            raise ConfigValueError(
                f"model config 'version' {data.get('version')!r} is not "
                f"supported (this memnet reads version {VERSION})"
            )
        allowed = {"format", "version", "index", "options", *_SIZES, *_COMPONENTS}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigValueError(f"model config has unknown keys {unknown}")
        missing = [key for key in (*_SIZES, *_COMPONENTS) if key not in data]
        if missing:
            raise ConfigValueError(f"model config is missing {missing}")
        options = data.get("options", {})
        if not isinstance(options, dict):
            raise ConfigValueError(f"model config 'options' must be an object, got {options!r}")
        return cls(
            **{key: data[key] for key in (*_SIZES, *_COMPONENTS)},
            index=IndexConfig.from_json(data.get("index", {})),
            options=options,
        )
