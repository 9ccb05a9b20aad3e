"""memnet.vectors.as_vector: the float32 fast path decides exactly as the full checks do."""

from __future__ import annotations

import numpy as np
from memnet._scan import finite_f32

from memnet.errors import InvalidInput
from memnet.vectors import as_vector

F32 = np.float32
MAX = float(np.finfo(F32).max)


def outcome(value, length=8):
    try:
        return as_vector(value, length, "x")
    except InvalidInput as e:
        return str(e)


def cases():
    rng = np.random.default_rng(0)
    yield np.zeros(8, F32)
    yield np.array([-0.0] * 8, F32)
    yield np.full(8, np.finfo(F32).tiny / 4, F32)  # subnormals
    for scale in (1.0, 1e18, 5e18, 1.2e19, 1.3e19, 2e19, 1e30, MAX):
        for _ in range(30):
            with np.errstate(over="ignore"):  # (the largest become inf: a case too)
                yield (rng.standard_normal(8) * scale / np.sqrt(8)).astype(F32)
    for bad in (np.nan, np.inf, -np.inf):
        v = rng.standard_normal(8).astype(F32)
        v[3] = bad
        yield v
    yield np.full(8, np.sqrt(MAX / 8) * 1.0001, F32)  # each fine, the squared norm not
    yield np.full(8, np.sqrt(MAX / 8) * 0.9999, F32)


def test_a_float32_vector_is_decided_as_the_full_checks_decide():
    decided = set()
    for vector in cases():
        fast = outcome(vector)
        full = outcome(vector.tolist())  # a list takes the full path, to the same values
        if isinstance(full, str):
            assert fast == full
        else:
            assert fast is not vector  # (a copy: the event's own)
            assert fast.dtype == F32 and np.array_equal(fast, full)
        decided.add(full if isinstance(full, str) else "ok")
    assert len(decided) == 3  # accepted, non-finite, too large: each case was met


def test_other_arrays_take_the_full_checks():
    v = np.arange(16, dtype=F32)
    assert np.array_equal(outcome(v[::2]), v[::2]) and outcome(v[::2]).flags.c_contiguous
    swapped = v[:8].astype(">f4")
    assert outcome(swapped).dtype == F32 and np.array_equal(outcome(swapped), v[:8])
    assert outcome(np.arange(8)).dtype == F32  # ints are converted
    assert outcome(v[:8].astype(np.float64)).dtype == F32
    assert outcome(np.full(8, 1e39)) == "x has non-finite values (NaN, inf or beyond float32)"
    assert outcome(v) == "x must have 8 values, got 16"
    assert outcome(v.reshape(2, 8)) == "x must be a flat vector of numbers"
    assert outcome(np.ones(8, bool)) == "x must be a flat vector of numbers"
    assert outcome("12345678") == "x must be a vector of numbers, got str"


def test_the_fast_check_says_true_only_where_the_full_one_accepts():
    """_scan.finite_f32 (the fast path) sums the squares in double and answers True only
    below 1e38: then numpy's float32 product is finite in any summation order. Near and
    beyond the limit it answers False (the full checks decide); ordinary vectors take it."""
    rng = np.random.default_rng(1)
    taken = 0
    with np.errstate(over="ignore"):
        for n in (1, 3, 8, 17, 64, 1000):
            for scale in (1.0, 1e3, 1e18, 9e18, 1.2e19, 2e19, 1e30):
                v = (rng.standard_normal(n) * scale / np.sqrt(n)).astype(F32)
                fast = finite_f32(v, n)
                exact = float(np.dot(v.astype(np.float64), v.astype(np.float64)))
                assert fast == (exact < 1e38)
                if fast:
                    assert np.isfinite(np.dot(v, v)) and np.isfinite(v).all()
                taken += fast
    assert taken >= 6 * 3  # the ordinary scales took the fast path
    v = np.ones(8, F32)
    assert finite_f32(v, 8) and not finite_f32(v, 7) and not finite_f32(v[::2], 4)
    assert not finite_f32(v.astype(np.float64), 8) and not finite_f32(v.astype(">f4"), 8)
    assert not finite_f32(b"\0" * 32, 8) and not finite_f32([1.0] * 8, 8)


def test_an_event_keeps_its_own_vector_whatever_the_caller_does_after():
    """A producer reusing one buffer: each event holds the values it was made with, so a
    batch applies what one-at-a-time processing applies. The wire's vectors (read-only,
    over bytes) are read in place."""
    from memnet import Engine
    from tests.conftest import make_model

    engine = Engine(make_model(0))
    d = engine.config.input_dim
    buffer, events = np.zeros(d, np.float32), []
    for value in (1.0, 2.0, 3.0):
        buffer[:] = value
        events.append(engine.write(buffer))
    assert [float(e.row[0]) for e in events] == [1.0, 2.0, 3.0]
    wire = np.frombuffer(np.ones(d, "<f4").tobytes(), np.float32)
    assert as_vector(wire, d, "x") is wire
    assert as_vector(wire.astype(np.float64), d, "x").dtype == np.float32
