"""The overlay: the slots a memory changed since its base (a shared read-only slot matrix,
or a graph built over one) was made, with their current vectors, searched exactly."""

from __future__ import annotations

import numpy as np

from memnet.distance import sqdist, underflow


class Overlay:
    """slot -> current vector [M] for the changed slots, in order of first change."""

    def __init__(self, slots: int, dim: int) -> None:
        # [S] slot -> its overlay row + 1, 0 if not here: zeros, so a new memory's map costs
        # no writes (the pages stay unmapped until a slot in them changes).
        self.at = np.zeros(slots, np.int32)
        self._slots = np.zeros(16, np.int64)  # [n] (buffer) overlay slots
        self._vectors = np.zeros((16, dim), np.float32)  # [n, M] (buffer) their vectors
        self._n = 0

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self.at.nbytes + self._slots.nbytes + self._vectors.nbytes

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots [n], vectors [n, M]): views, valid until the next change."""
        return self._slots[: self._n], self._vectors[: self._n]

    def has(self, slots: np.ndarray) -> np.ndarray:
        """[N] bool: which of the given slots are in the overlay."""
        return self.at[slots] > 0

    def current(self, base: np.ndarray, slot: int) -> np.ndarray:
        """Slot's current vector [M]: the overlay's, else the base matrix's row (a view)."""
        at = self.at[slot]
        return self._vectors[at - 1] if at else base[slot]

    def current_rows(self, base: np.ndarray, slots: np.ndarray) -> np.ndarray:
        """Current vectors [N, M] of slots (a copy): the base's rows, overlaid."""
        out = base[slots]
        at = self.at[slots]
        hit = at > 0
        if hit.any():
            out[hit] = self._vectors[at[hit] - 1]
        return out

    def set(self, slot: int, vector: np.ndarray) -> bool:
        """Record slot's current vector; True if the slot is new to the overlay."""
        row = int(self.at[slot]) - 1
        new = row < 0
        if new:
            row = self._n
            if row == len(self._slots):  # grow the buffers geometrically
                self._slots = np.concatenate((self._slots, np.zeros_like(self._slots)))
                self._vectors = np.concatenate((self._vectors, np.zeros_like(self._vectors)))
            self.at[slot] = row + 1
            self._slots[row] = slot
            self._n += 1
        self._vectors[row] = vector
        return new

    def rules_out_base(
        self, d_ov: np.ndarray | None, v: np.ndarray, max_norm: float, k: int
    ) -> bool:
        """True if k overlay slots (at distances d_ov from v: computed here when None) are
        closer than any base row can be: every row of norm at most max_norm is at least
        (|v| - max_norm)^2 away."""
        if self._n < k:
            return False
        # |v| rounded down and max_norm up: both are float64 sums of float32 squares (in
        # different orders: np.dot here, squared_norms' pairwise sum there), each within
        # M 2^-53 of the exact norm; 1e-12 covers that up to 10^3 dims with room. Without it
        # a base row equal to v (distance 0, as an overlay slot holding v) could be ruled out
        # when the two sums round apart: the tie would go to the higher slot.
        v_norm = float(np.sqrt(np.dot(v.astype(np.float64), v))) * (1 - 1e-12)
        if v_norm <= max_norm * (1 + 1e-12):
            return False
        if d_ov is None:
            d_ov = sqdist(self.items()[1], v)
        floor = (v_norm - max_norm * (1 + 1e-12)) ** 2
        # A base row's float32 sqdist sums M positive terms, each within 3u of its exact
        # (m_i - v_i)^2 (u = 2^-24), and their sum within (M - 1) u more: at least
        # (1 - (M + 2) u) |m - v|^2 - underflow(3 M) >= (1 - (M + 2) u) floor - underflow(3 M)
        # (underflow: distance.underflow, for tiny vectors). 1e-4 covers (M + 2) u up to
        # 1,600 dims, twice over at 800; larger dims take (M + 2) eps.
        tol = max(1e-4, (len(v) + 2) * float(np.finfo(np.float32).eps))
        least = floor * (1 - tol) - underflow(3 * len(v) + 2)
        return bool(np.partition(d_ov, k - 1)[k - 1] < least)

    def clear(self) -> None:
        self.at[self._slots[: self._n]] = 0
        self._n = 0
        self._slots = np.zeros(16, np.int64)
        self._vectors = np.zeros((16, self._vectors.shape[1]), np.float32)
