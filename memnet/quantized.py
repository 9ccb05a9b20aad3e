"""The exact search's candidate pass on int8 codes (memnet/_scan.c), and the bound that keeps
the search exact.

Each row m of a base is kept, beside its float32 truth, as int8 codes c_m with a scale s_m
(m^ = s_m c_m, the row's largest |component| maps to 127); each query v likewise
(v^ = s_v c_v, to 127 or, on the AVX2 path, 63). The kernel estimates, for every row,

    est(m, v) = fl(n_m + fl(fl(-2 s_m s_v) * c_m·c_v))        (n_m: |m|^2 in float32)

with an exact integer dot product, and keeps the smallest estimate of each block of 16 rows.

**The bound.** Let D(m) be what the search ranks by, float32 ``sqdist(m, v)``, and
Δ(m) = D(m) - |v|^2 (|v|^2 is the same for every row, so it never needs computing). Then

    |est(m, v) - Δ(m)| <= 2 (|m| e_v + e_m |v^|) + F,     e_m = |m - m^|, e_v = |v - v^|.

Quantization: m·v - m^·v^ = m·(v - v^) + (m - m^)·v^, so by Cauchy-Schwarz
|2 m·v - 2 m^·v^| <= 2 (|m| e_v + e_m |v^|). Rounding (u = eps / 2): D is within
(M + 2) u |m - v|^2 of |m - v|^2 (``exact.slack``); n_m is within u |m|^2 of |m|^2; the three
roundings of est are within 3 u (n_m + 2 |m^| |v^|); c_m·c_v is exact in int32
(|c_m·c_v| <= 127^2 M, below 2^31; MAX_DIM bounds M, wider vectors never come here), and
so is its conversion to float while it is below 2^24
(M < 1040; above, one more u). With |m^| <= |m| + e_m and |v^| <= |v| + e_v these sum to at
most (M + 7) u X^2 (first order), X = N + E + |v| + e_v, N >= every |m| and E >= every e_m;
the bound takes ``exact.slack``'s form for it,

    F = 4 (M + 2) eps X^2 = (8 M + 16) u X^2,

more than enough for every M, the rest being headroom for second-order terms.

Every norm and error here is computed in float64 and rounded up (``_UP``), so each is an
upper bound; the float64 arithmetic of the selection (``_scan.select``; each operation
relative 2^-53) is far inside F's headroom.

**Underflow.** Below 2^-126 float32 rounds with an absolute error (up to half the subnormal
spacing 2^-149), not a relative one: for rows and queries of norm ~1e-21 and less the
relative terms above are smaller than that, and rows that tie with the kept ones were
pruned. F adds the absolute part: D's 3M roundings, n_m's and est's three, and fl(-2 s_m
s_v), whose absolute error is multiplied by c_m·c_v (at most 127^2 M):
(127^2 M + 6 M + 16) 2^-149, about 1e-39 at M = 64: it decides only for such tiny vectors.

**The selection** (``_scan.select``, per query). Blocks: with U(g) = min est + B_g and
L(g) = min est - B_g over a block g of 16 rows (B_g the bound with the block's largest |m|
and e_m), the block's smallest-estimate row has Δ <= U(g); ``want`` distinct blocks with
U <= T give ``want`` rows with Δ <= T, so T_g, the want-th smallest U(g), is at least the
want-th smallest Δ. A row with Δ <= T_g has L(its block) <= est - B <= Δ <= T_g: the blocks
with L <= T_g hold every such row. Rows: each row of those blocks is estimated again (the
same bits) with its own bound, U(m) and L(m); T, the want-th smallest U(m) among them, is at
most T_g (the blocks that set T_g are among them) and still at least the want-th smallest
Δ, and the rows with L(m) <= T are every row that can be among the want nearest. They go to
``exact.Hint`` with U(m) and T, and the search ranks them by D, exactly.

The worse the quantization (a row or query with one huge component and the rest tiny), the
larger the bound and the more groups survive; the answer never changes, only the cost.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from memnet import _scan
from memnet.distance import underflow

LANES = 16  # rows per block (one AVX-512 register of int32 lanes), the unit of selection
PAD = 256  # rows are padded to a multiple: the selection tests 16 blocks at a time
# The kernel's paths by speed; "blas" is the candidate pass before the kernel (float32 matrix
# products, memnet/exact.py), kept as an independent cross-check and a benchmark baseline.
PATHS = {"vnni": 3, "avx2": 2, "c": 1, "blas": 0}
BEST = _scan.best_isa()
_EPS = float(np.finfo(np.float32).eps)
_UP = 1 + 1e-9  # float64 norms and errors rounded up (their relative error is < M 2^-53)
_SLICE = 65536  # rows quantized at a time: no float64 copy of a whole large base
# The kernel sums c_m·(c_v + offset) in int32, each term up to 127 * 255: no int32 ever
# overflows while 127 * 255 * dims (rounded up to 4) < 2^31. Wider vectors take the float32
# candidate pass (exact.scan), whatever the path.
MAX_DIM = (2**31 - 1) // (127 * 255) // 4 * 4
_MINIMA_FLOATS = 1 << 22  # a chunk's [queries, blocks] minima, 16 MiB: at 1M rows 64 queries

# Without AVX2 the portable C path (x86-64's baseline instructions) is slower than the float32
# matrix products (scripts/bench_scan.py): it serves where it is asked for, and tests check it.
_path = BEST if PATHS["avx2"] <= BEST else PATHS["blas"]


def set_path(name: str) -> None:
    """Run the candidate pass on one path from now on: "vnni", "avx2", "c" or "blas" (the
    worker's MEMNET_SCAN); results are the same on every path, only the speed differs."""
    global _path
    if name not in PATHS:
        raise ValueError(f"no candidate pass named {name!r}: {', '.join(PATHS)}")
    if PATHS[name] > BEST:
        raise ValueError(f"this CPU cannot run the {name} path: {', '.join(available())}")
    _path = PATHS[name]


@contextlib.contextmanager
def use_path(name: str) -> Iterator[None]:
    """set_path inside the block only (tests, benchmarks)."""
    before = path()
    set_path(name)
    try:
        yield
    finally:
        set_path(before)


def path() -> str:
    """The candidate pass in use."""
    return next(name for name, p in PATHS.items() if p == _path)


def available() -> list[str]:
    """The paths this CPU runs, fastest first."""
    return [name for name, p in PATHS.items() if p <= BEST]


def quantize(X: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows [n, M] -> (codes [n, M] int8 in [-qmax, qmax], scales [n] float32, errors e [n]
    and norms |x| [n], float64 upper bounds)."""
    x = X.astype(np.float64)
    scale = (np.abs(x).max(axis=1, initial=0.0) / qmax).astype(np.float32)
    s = scale.astype(np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(s > 0, np.rint(x / s), 0.0)
    codes = np.clip(codes, -qmax, qmax)  # a scale rounded down can push a code past qmax
    err = np.sqrt(((x - codes * s) ** 2).sum(axis=1)) * _UP  # codes * s is exact in float64
    norm = np.sqrt((x * x).sum(axis=1)) * _UP
    return codes.astype(np.int8), scale, err, norm


@dataclass(frozen=True, eq=False)
class Quantized:
    """A base's rows as int8 codes in the kernel's layout (rows padded to whole superblocks,
    dims to a multiple of 4), with per-group bounds on the rows' norms and errors."""

    codes: np.ndarray  # [blocks, M4 / 4, LANES, 4] int8
    rowsum: np.ndarray  # [Sp] int32: each row's code sum
    coef: np.ndarray  # [Sp] float32: -2 * scale
    norms: np.ndarray  # [Sp] float32 squared norms, +inf for empty and padding rows
    row_norm: np.ndarray  # [Sp] float64: |m| rounded up, 0 for empty rows
    row_err: np.ndarray  # [Sp] float64: e_m rounded up, 0 for empty rows
    R: np.ndarray  # [G] float64: the largest row_norm of each group
    E: np.ndarray  # [G] float64: the largest row_err of each group
    extremes: np.ndarray  # [4] float64: min R, min E, max R, max E
    dim: int

    @staticmethod
    def nbytes_of(slots: int, dim: int) -> int:
        """What ``of`` allocates for a base of these sizes (the arrays below)."""
        padded = -(-max(slots, 1) // PAD) * PAD
        return padded * (-(-dim // 4) * 4 + 4 + 4 + 4 + 8 + 8) + padded // LANES * 16 + 32

    @classmethod
    def of(cls, vectors: np.ndarray, norms: np.ndarray) -> Quantized:
        """Quantize a base: vectors [S, M] float32 and their squared norms [S] (+inf where
        a slot is empty)."""
        slots, dim = vectors.shape
        padded = -(-max(slots, 1) // PAD) * PAD
        m4 = -(-dim // 4) * 4
        out = cls(
            np.zeros((padded // LANES, m4 // 4, LANES, 4), np.int8),
            np.zeros(padded, np.int32),
            np.zeros(padded, np.float32),
            np.full(padded, np.inf, np.float32),
            np.zeros(padded),
            np.zeros(padded),
            np.zeros(padded // LANES),
            np.zeros(padded // LANES),
            np.zeros(4),
            dim,
        )
        for start in range(0, slots, _SLICE):
            rows = np.arange(start, min(slots, start + _SLICE))
            out._write(rows, vectors[rows], norms[rows])
        out._regroup(np.arange(len(out.R)))
        return out

    def with_rows(self, slots: np.ndarray, rows: np.ndarray, norms: np.ndarray) -> Quantized:
        """A copy with rows [n, M] (squared norms [n]) written into slots [n]."""
        out = Quantized(*(a.copy() for a in self._arrays()), self.dim)
        out._write(slots, rows, norms)
        out._regroup(np.unique(_group_of(slots)))
        return out

    def _arrays(self) -> tuple[np.ndarray, ...]:
        return (self.codes, self.rowsum, self.coef, self.norms, self.row_norm, self.row_err,
                self.R, self.E, self.extremes)  # fmt: skip

    def _write(self, slots: np.ndarray, rows: np.ndarray, norms: np.ndarray) -> None:
        codes, scale, err, norm = quantize(rows, 127)
        filled = np.isfinite(norms)
        pad = np.zeros((len(slots), self.codes.shape[1] * 4), np.int8)
        pad[:, : self.dim] = codes
        self.codes[slots // LANES, :, slots % LANES, :] = pad.reshape(len(slots), -1, 4)
        self.rowsum[slots] = codes.sum(axis=1, dtype=np.int32)
        self.coef[slots] = scale * np.float32(-2)  # exact: a power of two
        self.norms[slots] = norms
        self.row_norm[slots] = np.where(filled, norm, 0.0)
        self.row_err[slots] = np.where(filled, err, 0.0)

    def _regroup(self, groups: np.ndarray) -> None:
        rows = rows_of(groups)  # [g, 16]
        self.R[groups] = self.row_norm[rows].max(axis=1)
        self.E[groups] = self.row_err[rows].max(axis=1)
        self.extremes[:] = (self.R.min(), self.E.min(), self.R.max(), self.E.max())

    def candidates(
        self, V: np.ndarray, want: int, max_norm: float, skip: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The rows that can be among the want nearest of each of V [Q, M] (module
        docstring): ([n] query, [n] row, [n] an upper bound of the row's Δ), by query, and
        [Q] each query's cut: an upper bound of its want-th smallest Δ. Rows where skip [S]
        is set are left out."""
        norms = self.norms
        if skip is not None:
            norms = norms.copy()
            norms[: len(skip)][skip] = np.inf
        chunk = self._chunk()
        parts = [
            self._candidates(V[q0 : q0 + chunk], q0, want, max_norm, norms)
            for q0 in range(0, len(V), chunk)
        ]
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate(p) for p in zip(*parts, strict=True))  # type: ignore[return-value]

    def _chunk(self) -> int:
        """Queries per kernel call: their minima fill at most the scratch buffer."""
        return max(8, _MINIMA_FLOATS // len(self.R) // 8 * 8)

    def warm(self) -> None:
        """Map this thread's scratch buffer for the largest chunk now (its page faults are
        milliseconds), not in the middle of a stream."""
        _scratch(self._chunk() * len(self.R)).fill(0)

    def _candidates(
        self, V: np.ndarray, q0: int, want: int, max_norm: float, norms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # The path read once: the query codes' range must be the kernel's, even if another
        # thread calls set_path meanwhile.
        isa = _path
        qmax, offset = (127, 128) if isa != PATHS["avx2"] else (63, 64)
        m4 = self.codes.shape[1] * 4
        q = np.full((len(V), m4), offset, np.uint8)
        codes, qscale, e_v, v_norm = quantize(V, qmax)
        q[:, : self.dim] = codes.astype(np.int16) + offset
        minima = _scratch(len(V) * len(self.R)).reshape(len(V), len(self.R))
        blocks = len(self.norms) // LANES
        kernel = (self.codes, self.rowsum, self.coef, norms, q, qscale)
        _scan.minima(*kernel, minima, blocks, m4 // 4, len(V), offset, isa)
        F = 4 * (self.dim + 2) * _EPS * (max_norm + self.E.max() + v_norm + e_v) ** 2
        F += underflow(127 * 127 * m4 + 6 * m4 + 16)  # (module docstring: underflow)
        params = np.stack((e_v, v_norm + e_v, F), axis=1)  # |v^| <= |v| + e_v
        bounds = (self.R, self.E, self.extremes, self.row_norm, self.row_err, params)
        cuts = np.empty(len(V))
        size = len(V) * 4 * want
        while True:
            pairs, upper = np.empty((size, 2), np.int32), np.empty(size)
            found = (pairs, upper, cuts, blocks, m4 // 4, len(V), want, offset, isa)
            n = _scan.select(minima, *bounds, *kernel, *found)
            if n <= size:
                return pairs[:n, 0] + np.int64(q0), pairs[:n, 1].astype(np.int64), upper[:n], cuts
            size = n


_local = threading.local()


def _scratch(n: int) -> np.ndarray:
    """[n] float32 this thread reuses for every chunk's minima (up to 16 MiB, kept): a
    fresh array of megabytes each time is a fresh mapping, whose page faults and zeroing
    showed in profiles beside the kernel's own arithmetic."""
    buf = getattr(_local, "minima", None)
    if buf is None or len(buf) < n:
        buf = _local.minima = np.empty(n, np.float32)
    return buf[:n]


def rows_of(groups: np.ndarray) -> np.ndarray:
    """[g, 16] the rows of each group (block; padding rows included)."""
    return groups[:, None] * LANES + np.arange(LANES)


def _group_of(slots: np.ndarray) -> np.ndarray:
    return slots // LANES
