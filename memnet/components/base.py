"""The four component kinds of a memory network and the registry that picks them by name.

Shape letters used across memnet:
  B  events in a batch            D  input_dim (encoder input)     H  hidden
  M  memory_dim                   S  slots                         K  retrieved slots (k)
  Y  output_dim

Every component is bound to a model config and declares its parameters (name -> shape and
initialiser). The pure functions that run inside ``jax.jit`` take the whole parameter dict
and read their own entries; host-side work (input checks, the memory write) uses numpy.
A new form of a component is one new module with one registered class.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from memnet.config import ConfigValueError, ModelConfig

if TYPE_CHECKING:
    import jax

    from memnet.dense import Arena
    from memnet.exact import Hint
    from memnet.memory import Memory

Params = dict[str, Any]  # name -> array (numpy on the host, jax inside jit)


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    init: str = "normal"  # "normal": N(0, 1) as in the reference design; "zeros"

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        if self.init == "zeros":
            return np.zeros(self.shape, np.float32)
        return rng.standard_normal(self.shape, dtype=np.float32)


class Component:
    kind: ClassVar[str]
    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # the config options it reads (option())

    def __init__(self, config: ModelConfig) -> None:
        self.config = config

    def params(self) -> dict[str, ParamSpec]:
        return {}


class Encoder(Component):
    """I: turns an event's raw input into a vector in memory space."""

    kind = "encoder"

    def prepare(self, value: Any) -> np.ndarray:
        """Check one raw input and return its fixed-shape row; raises InvalidInput."""
        raise NotImplementedError

    def encode(self, p: Params, rows: jax.Array) -> jax.Array:
        """[B, ...] prepared rows -> [B, M]; pure, runs inside jit."""
        raise NotImplementedError

    def example(self) -> np.ndarray:
        """A valid prepared row (for compiling ahead of time)."""
        raise NotImplementedError


class Generalizer(Component):
    """G: writes an encoded input into a memory."""

    kind = "generalizer"
    # True: every slot starts filled with memory_init; False: slots start empty.
    starts_filled: ClassVar[bool] = True
    # Whether write() looks up the nearest slot (the engine then scans for it ahead).
    searches: ClassVar[bool] = False
    # Whether write_many() exists: writes to many small memories at once (memnet/dense.py).
    batched: ClassVar[bool] = False
    # Whether ages_many() tells the writes apart (multi-hop's latest option needs it).
    records_ages: ClassVar[bool] = False

    def write(self, p: Params, memory: Memory, i: np.ndarray, hint: Hint | None = None) -> bool:
        """Apply one write of the encoded input i [M] to memory (numpy, host side); False,
        changing nothing, where the vector it would store is not finite (the engine rejects
        that write). hint: the engine's batched scan of the memory's base for i, if it made
        one (a G that searches passes it on to memory.nearest; it makes the search faster,
        never different)."""
        raise NotImplementedError

    def write_many(
        self, p: Params, arena: Arena, rows: np.ndarray, i: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One write to each of N distinct small memories at once: the arena rows [N] that
        hold them (their slots arena.vectors[rows], filled flags and write counts likewise),
        inputs i [N, M] -> (slot written [N], its new vector [N, M]); bit for bit what
        write() does to each memory alone. Nothing is written here: the engine scatters the
        finite rows and rejects the others, as write() does."""
        raise NotImplementedError

    def ages(self, memory: Memory, slots: np.ndarray) -> np.ndarray:
        """How many writes ago each slot was written (0 = the latest); 0 where unknown."""
        return self.ages_many(np.asarray(memory.writes), slots, memory.slots)

    def ages_many(self, writes: np.ndarray, slots: np.ndarray, size: int) -> np.ndarray:
        """ages() of slots [N, K] in N memories of ``size`` slots with write counts [N]
        (or of any slots of one memory, its write count a 0-d array)."""
        return np.zeros(slots.shape, np.int32)


class Output(Component):
    """O: reads the retrieved slots for a query vector and produces the output feature."""

    kind = "output"

    def attend(
        self, p: Params, v: jax.Array, cand: jax.Array, mask: jax.Array, age: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        """v [B, M], cand [B, K, M], mask [B, K] (False = padding), age [B, K] ->
        (o [B, M], weights [B, K]); pure, runs inside jit."""
        raise NotImplementedError


class Response(Component):
    """R: maps the output feature to the response."""

    kind = "response"

    def respond(self, p: Params, o: jax.Array) -> jax.Array:
        """o [B, M] -> y [B, Y]; pure, runs inside jit."""
        raise NotImplementedError

    def describe(self, y: np.ndarray) -> dict[str, Any]:
        """Extra response fields for one y [Y] (e.g. the answer word); none by default."""
        return {}


REGISTRY: dict[str, dict[str, type[Component]]] = {
    "encoder": {},
    "generalizer": {},
    "output": {},
    "response": {},
}


def register(cls: type[Component]) -> type[Component]:
    """Class decorator: make a component available under (cls.kind, cls.name)."""
    table = REGISTRY[cls.kind]
    if cls.name in table:
        raise ValueError(f"{cls.kind} {cls.name!r} is registered twice")
    table[cls.name] = cls
    return cls


_MISSING = object()


# The option keys read while a model's components are built: Components.build checks them
# against the options the components declare (``Component.options``), which are what a
# model file may carry (a misspelt option must not fall back to its default unnoticed).
OPTIONS_READ: ContextVar[set[str] | None] = ContextVar("memnet_options_read", default=None)


def option(
    config: ModelConfig, key: str, kind: type, default: Any = _MISSING, most: int | None = None
) -> Any:
    """A component setting from the config's ``options``; ConfigValueError names a bad one.
    ``most``: the largest value an int option may take."""
    read = OPTIONS_READ.get()
    if read is not None:
        read.add(key)
    if key not in config.options:
        if default is _MISSING:
            raise ConfigValueError(f"model config options need {key!r}")
        return default
    value = config.options[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigValueError(f"model config option {key!r} must be a positive integer")
    if most is not None and value > most:
        raise ConfigValueError(f"model config option {key!r} must be at most {most}, got {value}")
    if kind is bool and not isinstance(value, bool):
        raise ConfigValueError(f"model config option {key!r} must be true or false")
    if kind is list and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise ConfigValueError(f"model config option {key!r} must be a list of strings")
    return value
