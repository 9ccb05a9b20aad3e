"""G = "append-only": the basic G of Memory Networks (Weston et al. 2014, section 3): each
write goes to the next free slot; once all are full, it overwrites the oldest.

Write n (counting from 0) lands in slot n mod S, so a slot's age (writes since it was
written, 0 for the latest) follows from the memory's write count alone: write order is kept
without extra state, and O can read it (bAbI's questions depend on the order of events).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from memnet.components.base import Generalizer, Params, register

if TYPE_CHECKING:
    from memnet.dense import Arena
    from memnet.exact import Hint
    from memnet.memory import Memory


@register
class AppendOnly(Generalizer):
    name = "append-only"
    starts_filled = False
    batched = True
    records_ages = True

    def write(self, p: Params, memory: Memory, i: np.ndarray, hint: Hint | None = None) -> bool:
        memory.set(memory.writes % memory.slots, i)  # (i is finite: the engine checked it)
        return True

    def write_many(
        self, p: Params, arena: Arena, rows: np.ndarray, i: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return arena.writes[rows] % arena.slots, i

    def ages_many(self, writes: np.ndarray, slots: np.ndarray, size: int) -> np.ndarray:
        ages = (np.asarray(writes)[..., None] - 1 - slots) % size  # [N, K]
        return np.where(slots >= 0, ages, 0).astype(np.int32)
