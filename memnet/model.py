"""Model files: safetensors tensors (float32) plus the config as JSON in metadata ``config``.

Loading checks every name, shape, dtype and value and says exactly what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from memnet.components import REGISTRY, Component, Encoder, Generalizer, Output, Response
from memnet.components.base import OPTIONS_READ, ParamSpec
from memnet.config import ConfigValueError, ModelConfig
from memnet.errors import ModelFileError


@dataclass(frozen=True)
class Components:
    encoder: Encoder
    generalizer: Generalizer
    output: Output
    response: Response

    @classmethod
    def build(cls, config: ModelConfig) -> Components:
        picked: dict[str, Component] = {}
        read: set[str] = set()
        token = OPTIONS_READ.set(read)
        try:
            for kind in ("encoder", "generalizer", "output", "response"):
                name = getattr(config, kind)
                table = REGISTRY[kind]
                if name not in table:
                    known = ", ".join(sorted(table))
                    raise ModelFileError(
                        f"unknown {kind} {name!r} in model config (known: {known})"
                    )
                try:
                    picked[kind] = table[name](config)
                except (ConfigValueError, ValueError) as e:
                    raise ModelFileError(f"{kind} {name!r}: {e}") from e
        finally:
            OPTIONS_READ.reset(token)
        undeclared = read - {o for c in picked.values() for o in type(c).options}
        assert not undeclared, f"components read options they do not declare: {undeclared}"
        known = {o for table in REGISTRY.values() for c in table.values() for o in c.options}
        unknown = sorted(set(config.options) - known)
        if unknown:  # (an option of another component is left alone: no use, no harm)
            raise ModelFileError(
                f"model config options {unknown} are not read by any component "
                f"(its components read: {', '.join(sorted(read)) or 'none'})"
            )
        return cls(**picked)  # type: ignore[arg-type]

    def param_specs(self) -> dict[str, ParamSpec]:
        """Every tensor a model file must hold, with its shape and initialiser."""
        c = self.encoder.config
        fill = "normal" if self.generalizer.starts_filled else "zeros"
        specs: dict[str, ParamSpec] = {"memory_init": ParamSpec((c.slots, c.memory_dim), fill)}
        for part in (self.encoder, self.generalizer, self.output, self.response):
            for name, spec in part.params().items():
                if name in specs:
                    raise ModelFileError(
                        f"tensor name {name!r} is claimed twice ({part.kind} {part.name!r})"
                    )
                specs[name] = spec
        return specs


@dataclass(frozen=True, eq=False)
class Model:
    """A config, its components and its float32 parameters (including ``memory_init``)."""

    config: ModelConfig
    params: Mapping[str, np.ndarray]
    components: Components = field(repr=False)

    @classmethod
    def create(cls, config: ModelConfig, params: Mapping[str, np.ndarray]) -> Model:
        components = Components.build(config)
        checked = check_params(components.param_specs(), params)
        _check_slot_norms(checked["memory_init"])
        return cls(config, checked, components)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 over the canonical config and every tensor (name, shape, bytes)."""
        h = hashlib.sha256(self.config.canonical().encode())
        for name in sorted(self.params):
            array = self.params[name]
            h.update(f"\n{name}:{array.dtype.str}:{array.shape}\n".encode())
            h.update(array.tobytes())
        return h.hexdigest()


def check_params(
    specs: Mapping[str, ParamSpec], params: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Return params as read-only float32 arrays, or raise naming every problem found."""
    problems = []
    missing = sorted(set(specs) - set(params))
    if missing:
        problems.append(f"missing tensors {missing}")
    unexpected = sorted(set(params) - set(specs))
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    checked = {}
    for name in sorted(set(specs) & set(params)):
        array = np.asarray(params[name])
        if array.dtype != np.float32:
            problems.append(f"tensor {name!r} is {array.dtype}, expected float32")
        elif array.shape != specs[name].shape:
            problems.append(
                f"tensor {name!r} has shape {array.shape}, expected {specs[name].shape}"
            )
        elif not _all_finite(array):
            bad = int(array.size - np.isfinite(array).sum())
            problems.append(f"tensor {name!r} has {bad} NaN or infinite values")
        else:
            shares = array.base is not None and np.asarray(array.base).size != array.size
            if not array.flags.c_contiguous or shares:
                array = np.array(array, dtype=np.float32, order="C")  # our own copy
            array.flags.writeable = False
            checked[name] = array
    if problems:
        raise ModelFileError("; ".join(problems))
    return checked


def _check_slot_norms(memory_init: np.ndarray) -> None:
    """Every slot's squared norm must be a finite float32, as every written vector's is
    (memnet.engine): an infinite norm marks an empty slot in the searches."""
    step = 1 << 16
    for start in range(0, len(memory_init), step):
        wide = memory_init[start : start + step].astype(np.float64)
        over = np.flatnonzero(np.einsum("ij,ij->i", wide, wide) > _FLOAT32_MAX)
        if len(over):
            raise ModelFileError(
                f"tensor 'memory_init': row {start + int(over[0])}'s squared norm is beyond "
                f"float32's range (at most {_FLOAT32_MAX:.3g})"
            )


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _all_finite(array: np.ndarray) -> bool:
    """np.isfinite(array).all() without a full boolean temporary for large tensors."""
    flat = array.reshape(-1)
    step = 1 << 22
    return all(np.isfinite(flat[i : i + step]).all() for i in range(0, flat.size, step))


def random_model(config: ModelConfig, seed: int = 0) -> Model:
    """Weights N(0, 1) and biases 0 as in the reference design; memory_init N(0, 1)."""
    components = Components.build(config)
    rng = np.random.default_rng(seed)
    params = {name: spec.sample(rng) for name, spec in components.param_specs().items()}
    return Model.create(config, params)


def load_model(path: str | os.PathLike[str]) -> Model:
    """Read and fully check a model file; ModelFileError names the file and the problem."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            names = list(f.keys())
            stored = {name: f.get_slice(name).get_dtype() for name in names}
            other = {name: dtype for name, dtype in stored.items() if dtype != "F32"}
            if other:  # (before reading: numpy has no type for some, e.g. F8_E4M3)
                raise ModelFileError(
                    f"{path}: tensors must be float32 (F32); found "
                    + ", ".join(f"{name!r} {dtype}" for name, dtype in sorted(other.items()))
                )
            params = {name: f.get_tensor(name) for name in names}
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a readable safetensors file ({e})") from None
    if "config" not in metadata:
        raise ModelFileError(f"{path}: metadata has no 'config' entry (not a memnet model)")
    try:
        data = json.loads(metadata["config"])
    except (ValueError, RecursionError) as e:  # (JSONDecodeError; a number too long, too deep)
        raise ModelFileError(f"{path}: metadata 'config' is not valid JSON ({e})") from None
    try:
        config = ModelConfig.from_json(data)
    except (ConfigValueError, TypeError) as e:
        raise ModelFileError(f"{path}: {e}") from None
    try:
        return Model.create(config, params)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from None


def save_model(model: Model, path: str | os.PathLike[str]) -> None:
    """Write the model atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(model.params), tmp, metadata={"config": model.config.canonical()})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
