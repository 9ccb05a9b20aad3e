"""The int8 candidate pass (memnet/_scan.c, memnet/quantized.py): every path computes the
same bits as a numpy reference, the error bound holds, and the exact search it feeds stays
brute force's on adversarial data, on every path this CPU runs (the portable C one too)."""

from __future__ import annotations

import numpy as np
import pytest

from memnet import _scan, quantized
from memnet.distance import rank, sqdist, underflow
from memnet.exact import ExactSlots, ScanBase, scan
from memnet.quantized import LANES, Quantized, quantize

KERNELS = [p for p in quantized.available() if p != "blas"]
EPS = float(np.finfo(np.float32).eps)


def unsigned(codes: np.ndarray, qz: Quantized, offset: int) -> np.ndarray:
    """Query codes [Q, M] as the kernel takes them: + offset, dims padded with the offset."""
    q = np.full((len(codes), qz.codes.shape[1] * 4), offset, np.uint8)
    q[:, : codes.shape[1]] = codes.astype(np.int16) + offset
    return q


def reference(qz: Quantized, q: np.ndarray, qscale: np.ndarray, offset: int) -> np.ndarray:
    """[Q, rows] estimates in numpy: int64 dot products, then the kernel's three float32
    roundings in its order."""
    rows = qz.codes.transpose(0, 2, 1, 3).reshape(len(qz.norms), -1).astype(np.int64)
    dot = q.astype(np.int64) @ rows.T - offset * qz.rowsum.astype(np.int64)
    a = qz.coef[None, :] * qscale[:, None]
    return qz.norms[None, :] + a * dot.astype(np.float32)


def kernel_minima(qz: Quantized, q: np.ndarray, qscale: np.ndarray, offset: int, path: str):
    out = np.empty((len(q), len(qz.norms) // LANES), np.float32)
    blocks = len(qz.norms) // LANES
    args = (qz.codes, qz.rowsum, qz.coef, qz.norms, q, qscale, out)
    _scan.minima(*args, blocks, qz.codes.shape[1], len(q), offset, quantized.PATHS[path])
    return out


def base_of(X: np.ndarray, filled: np.ndarray | None = None) -> ScanBase:
    return ScanBase.over(X, filled)


@pytest.mark.parametrize("path", KERNELS)
@pytest.mark.parametrize(("rows", "dim"), [(1, 5), (17, 8), (300, 10), (1000, 64), (520, 100)])
def test_every_path_computes_the_reference_bits(path: str, rows: int, dim: int) -> None:
    rng = np.random.default_rng(rows + dim)
    X = rng.standard_normal((rows, dim)).astype(np.float32) * rng.uniform(0.01, 10, (rows, 1))
    filled = rng.random(rows) > 0.1
    qz = base_of(X, filled).quantized()
    for nq in (1, 3, 7, 8, 12, 15):
        V = rng.standard_normal((nq, dim)).astype(np.float32)
        codes, qscale, _, _ = quantize(V, 63)  # the AVX2 path's range, valid on all
        q = unsigned(codes, qz, 64)
        est = reference(qz, q, qscale, 64)
        want = est.reshape(nq, -1, LANES).min(axis=2)
        got = kernel_minima(qz, q, qscale, 64, path)
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("path", [p for p in KERNELS if p != "avx2"])
def test_full_range_query_codes_are_exact_where_the_path_allows_them(path: str) -> None:
    rng = np.random.default_rng(7)
    X = rng.standard_normal((700, 64)).astype(np.float32)
    X[:, 0] = 127  # codes at the edge of the range
    qz = base_of(X).quantized()
    V = np.full((9, 64), -1.0, np.float32)
    codes, qscale, _, _ = quantize(V, 127)  # every code -127: the largest products
    q = unsigned(codes, qz, 128)
    want = reference(qz, q, qscale, 128).reshape(9, -1, LANES).min(axis=2)
    got = kernel_minima(qz, q, qscale, 128, path)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def adversarial(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(rows [S, M], queries [Q, M]) built to stress the bound."""
    S, M = 1500, 16
    X = rng.standard_normal((S, M)).astype(np.float32)
    V = rng.standard_normal((20, M)).astype(np.float32)
    if kind == "ties":  # many rows repeated exactly; queries on rows and between them
        X = np.repeat(X[:50], 30, axis=0)
        V = np.concatenate((X[:10], (X[:10] + X[30:40]) / 2))
    elif kind == "near ties":  # rows a few ulps apart around each query
        V = X[:20].copy()
        steps = rng.integers(-3, 4, X.shape).astype(np.float32)
        X = np.repeat(V, 75, axis=0)
        X = X + steps[: len(X)] * np.spacing(np.abs(X))
    elif kind == "huge":
        X, V = X * np.float32(1e9), V * np.float32(1e9)
    elif kind == "tiny":  # squares near float32's smallest normals, and below
        X, V = X * np.float32(1e-19), V * np.float32(1e-19)
    elif kind == "one big component":  # the rest of each row quantizes to 0
        X[:, 0] = np.float32(1e4) * np.sign(X[:, 0])
        V[:, 0] = np.float32(1e4)
    elif kind == "clusters":  # rows closer to a query than a quantization step: int8 misorders
        V = X[:20] * np.float32(4)
        X = np.repeat(V, 75, axis=0) + np.float32(3e-3) * rng.standard_normal((S, M), np.float32)
    elif kind == "subnormal":  # squares below float32's smallest normal: absolute rounding
        X, V = X * np.float32(1e-21), V * np.float32(1e-21)
    elif kind == "underflow ties":  # every distance underflows to 0: ties to the lower slot
        X = np.full((S, M), 2.5e-23, np.float32)
        X[S // 2 :] = np.float32(1e-23)
        V = np.zeros((4, M), np.float32)
    elif kind == "mixed norms":
        X *= np.float32(10.0) ** rng.integers(-6, 7, (S, 1)).astype(np.float32)
        V *= np.float32(10.0) ** rng.integers(-3, 4, (len(V), 1)).astype(np.float32)
    return X, V


KINDS = ["random", "ties", "near ties", "clusters", "huge", "tiny", "subnormal",
         "underflow ties", "one big component", "mixed norms"]  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_the_bound_holds_row_by_row(kind: str) -> None:
    """|est - Δ| <= 2 (|m| e_v + e_m |v^|) + F for every row and query (quantized.py)."""
    X, V = adversarial(kind, np.random.default_rng(1))
    base = base_of(X)
    qz = base.quantized()
    for qmax, offset in ((127, 128), (63, 64)):
        codes, qscale, e_v, v_norm = quantize(V, qmax)
        est = reference(qz, unsigned(codes, qz, offset), qscale, offset)[:, : len(X)]
        v2 = (V.astype(np.float64) ** 2).sum(axis=1)
        D = np.stack([sqdist(X, v) for v in V]).astype(np.float64)
        F = 4 * (X.shape[1] + 2) * EPS * (base.max_norm + qz.E.max() + v_norm + e_v) ** 2
        m4 = -(-X.shape[1] // 4) * 4
        F += underflow(127 * 127 * m4 + 6 * m4 + 16)
        norm, err = qz.row_norm[None, : len(X)], qz.row_err[None, : len(X)]
        bound = 2 * (norm * e_v[:, None] + err * (v_norm + e_v)[:, None]) + F[:, None]
        finite = np.isfinite(D)
        gap = np.abs(est.astype(np.float64) - (D - v2[:, None]))
        assert (gap[finite] <= bound[finite]).all(), (gap - bound).max()


def brute(X: np.ndarray, filled: np.ndarray | None, v: np.ndarray, k: int) -> np.ndarray:
    live = np.arange(len(X)) if filled is None else np.flatnonzero(filled)
    return rank(live, sqdist(X[live], v), k)


@pytest.mark.parametrize("path", quantized.available())
@pytest.mark.parametrize("kind", KINDS)
def test_exact_search_equals_brute_force(path: str, kind: str) -> None:
    rng = np.random.default_rng(2)
    X, V = adversarial(kind, rng)
    filled = rng.random(len(X)) > 0.05
    k = 5
    with quantized.use_path(path):
        slots = ExactSlots(base_of(X, filled), fold_at=1 << 30)
        hints = scan(slots.base, V, k + 8)
        batched = slots.topk(V, k, hints)
        alone = np.concatenate([slots.topk(v[None], k) for v in V])
    for q, v in enumerate(V):
        truth = brute(X, filled, v, k)
        np.testing.assert_array_equal(batched[q], truth)
        np.testing.assert_array_equal(alone[q], truth)


@pytest.mark.parametrize("path", quantized.available())
def test_overwritten_and_excluded_rows_stay_exact(path: str) -> None:
    """An overlay over a base: excluded (overwritten) rows are left out of the scan, and the
    answers are those of brute force over the current vectors."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((2000, 12)).astype(np.float32)
    V = rng.standard_normal((30, 12)).astype(np.float32)
    with quantized.use_path(path):
        slots = ExactSlots(base_of(X), fold_at=1 << 30)
        current = X.copy()
        for s in rng.choice(2000, 200, replace=False):
            row = V[s % 30] + np.float32(1e-3) * rng.standard_normal(12).astype(np.float32)
            slots.set(int(s), row)
            current[s] = row
        found = np.concatenate([slots.topk(v[None], 5) for v in V])
    for q, v in enumerate(V):
        np.testing.assert_array_equal(found[q], brute(current, None, v, 5))


def test_a_base_with_rows_written_keeps_codes_equal_to_a_fresh_quantization() -> None:
    rng = np.random.default_rng(4)
    X = rng.standard_normal((1000, 10)).astype(np.float32)
    filled = rng.random(1000) > 0.3
    base = base_of(X, filled)
    base.quantized()
    slots = rng.choice(1000, 40, replace=False)
    rows = rng.standard_normal((40, 10)).astype(np.float32) * np.float32(50)
    after = base.with_rows(slots, rows)
    fresh = Quantized.of(after.vectors, after.norms)
    for got, want in zip(after.codes._arrays(), fresh._arrays(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_kernel_refuses_short_buffers_and_paths_the_cpu_lacks() -> None:
    qz = base_of(np.ones((16, 4), np.float32)).quantized()
    q = np.zeros((1, 4), np.uint8)
    out = np.empty((1, 15), np.float32)  # one block short
    args = (qz.codes, qz.rowsum, qz.coef, qz.norms, q, np.ones(1, np.float32), out)
    with pytest.raises(ValueError, match="out"):
        _scan.minima(*args, 16, 1, 1, 128, 1)
    with pytest.raises(ValueError, match="not available"):
        _scan.minima(*args, 16, 1, 1, 128, quantized.BEST + 1)
    # counts that would make a size wrap around (negative, or a product past 2^63): refused
    # on every path, before anything is read or written (they crashed the interpreter)
    for isa in range(1, quantized.BEST + 1):
        for blocks, dim4, nq in ((1, 1, -1), (2**58, 1, 16), (1, -1, 1)):
            with pytest.raises(ValueError, match="negative or too large"):
                _scan.minima(*args, blocks, dim4, nq, 128, isa)
    A, full = np.zeros((1, 4, 2), np.float32), np.ones((1, 4), bool)
    rows, V, ranked = np.zeros(1, np.int64), np.zeros((1, 2), np.float32), np.empty(1, np.int64)
    with pytest.raises(ValueError, match="negative or too large"):
        _scan.rank(A, full, rows, V, ranked, 1, 1, 4, 2, 2**61, 0)
    for name in set(quantized.PATHS) - set(quantized.available()):
        with pytest.raises(ValueError, match="cannot run"), quantized.use_path(name):
            pass


@pytest.mark.parametrize("path", quantized.available())
def test_vectors_too_wide_for_int32_sums_take_the_float32_pass(path: str) -> None:
    """The kernel sums int8 products in int32: beyond quantized.MAX_DIM dims they could
    overflow, and the exact row was lost (a review found it at 140,000 dims)."""
    M = 140_000
    v = np.ones(M, np.float32)
    X = np.stack([v, -v, np.float32(0.5) * v])  # row 0 is v itself
    with quantized.use_path(path):
        slots = ExactSlots.over(X.copy())
        np.testing.assert_array_equal(slots.topk(v[None], 2)[0], brute(X, None, v, 2))
