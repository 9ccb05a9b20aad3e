"""A named memory: its slots (through a search structure) and how many writes it has had."""

from __future__ import annotations

from abc import ABCMeta
from typing import TYPE_CHECKING

import numpy as np

from memnet.exact import Hint
from memnet.search import ExactSlots, GraphSlots

if TYPE_CHECKING:
    from memnet.dense import DenseSlots


class Memory(metaclass=ABCMeta):  # noqa: B024 (abstract only to register DenseMemory)
    """Slot vectors [S, M] behind a search structure, plus the count of writes applied.

    ``writes`` numbers the writes, so a generalizer that appends can tell slot ages from it.
    """

    # A partition holds up to millions of memories: no __dict__ per memory (less RAM, and
    # fewer objects for Python's collector to walk). Small memories are of another type,
    # registered as a Memory (memnet/dense.py: DenseMemory).
    __slots__ = ("search", "writes")

    def __init__(self, slots: ExactSlots | GraphSlots | DenseSlots, writes: int = 0) -> None:
        self.search = slots
        self.writes = writes

    @property
    def slots(self) -> int:
        return self.search.slots

    def filled_count(self) -> int:
        return self.search.filled_count()

    def vector(self, slot: int) -> np.ndarray:
        """Current vector [M] of one slot (a view: do not modify)."""
        return self.search.vector(slot)

    def vectors(self, slots: np.ndarray) -> np.ndarray:
        """Current vectors [N, M] of the given slots (a copy)."""
        return self.search.vectors(slots)

    def matrix(self) -> np.ndarray:
        """The whole slot matrix [S, M] (a copy)."""
        return self.search.vectors(np.arange(self.slots))

    def nearest(self, v: np.ndarray, hint: Hint | None = None) -> int:
        """The filled slot nearest to v [M] in squared L2 (lowest slot number on ties; a
        graph memory, approximate, takes the lowest of the tied slots its search found).
        hint: a batched scan of the base for v (memnet/exact.py), faster, never different."""
        return self.search.nearest(v, None if hint is None else [hint])

    def topk(self, V: np.ndarray, k: int, hints: list[Hint | None] | None = None) -> np.ndarray:
        """[Q, M] -> [Q, k] filled slots, nearest first; -1 pads when fewer are filled.
        hints: one batched scan per row of V, or None (as for nearest)."""
        return self.search.topk(V, k, hints)

    def set(self, slot: int, vector: np.ndarray) -> None:
        """Overwrite one slot and count the write."""
        self.search.set(slot, vector)
        self.writes += 1
