"""Small memories as arena rows, processed many at a time (memnet/dense.py): bit for bit the
per-memory path (``dense_max_floats=0``, the engine before them), one event at a time."""

from __future__ import annotations

import numpy as np
import pytest

from memnet import Engine
from memnet.codec import decode_memory, encode_memory
from memnet.dense import DenseMemory, nearest, reference_nearest, reference_topk, topk
from memnet.distance import rank, sqdist
from tests.conftest import make_model
from tests.test_engine import as_event, random_events, same

MODELS = {
    "reference 5/10/5, 10 slots": {},
    "64 slots x 8": {"input_dim": 8, "memory_dim": 8, "output_dim": 8, "slots": 64},
    "append-only, multi-hop": {
        "memory_dim": 8,
        "slots": 12,
        "top_k": 12,
        "generalizer": "append-only",
        "output": "multi-hop",
    },
}


def with_init(model, memory_init):
    return type(model).create(model.config, {**model.params, "memory_init": memory_init})


def adversarial(model, rng):
    """memory_init with duplicate rows (exact ties), near ties, and rows so large that
    their distances overflow to +inf (ranked by slot number among themselves)."""
    init = model.params["memory_init"].copy()
    s = len(init)
    init[1] = init[0]
    init[3] = np.nextafter(init[2], np.float32(np.inf))
    init[s - 1] = init[s - 2] = np.float32(5.5e18)  # its norm fits float32; distances not
    init[s // 2] = -init[s // 2 - 1]
    return with_init(model, init)


def stream(engine, rng, n, memories):
    events = random_events(engine, rng, n, p_write=0.6)
    huge = engine.config.memory_dim
    events += [("q", np.full(huge, -1.2e18, np.float32)), ("q", np.zeros(huge, np.float32))]
    return [(int(rng.integers(0, memories)), as_event(engine, k, v)) for k, v in events]


def batches(engine, memories, events, rng):
    out, start = [], 0
    while start < len(events):
        size = int(rng.integers(1, 300))
        out += engine.process([(memories[k], e) for k, e in events[start : start + size]])
        start += size
    return out


@pytest.mark.parametrize("sizes", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("init", ["random", "adversarial"])
def test_small_memories_equal_the_per_memory_path_bitwise(sizes, init, rng):
    model = make_model(7, **sizes)
    if init == "adversarial":
        model = adversarial(model, rng)
    dense, before = Engine(model), Engine(model, dense_max_floats=0)
    events = stream(dense, rng, 1500, memories=40)  # ~40 events per memory: many waves
    ours = [dense.new_memory() for _ in range(40)]
    theirs = [before.new_memory() for _ in range(40)]
    assert isinstance(ours[0], DenseMemory) and not isinstance(theirs[0], DenseMemory)
    got = batches(dense, ours, events, np.random.default_rng(1))
    want = [before.apply(theirs[k], e) for k, e in events]
    assert all(same(a, b) for a, b in zip(got, want, strict=True))
    assert sum(a is not None for a in got) > 500
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a.matrix(), b.matrix())
        assert a.writes == b.writes
        assert a.filled_count() == b.filled_count()
        np.testing.assert_array_equal(a.search.changed, b.search.changed)


def test_many_memories_in_one_batch_equal_one_at_a_time(rng):
    model = make_model(2, input_dim=8, memory_dim=8, output_dim=8, slots=64)
    engine = Engine(model)
    events = stream(engine, rng, 3000, memories=2000)  # mostly one event per memory
    ours = [engine.new_memory() for _ in range(2000)]
    theirs = [engine.new_memory() for _ in range(2000)]
    got = engine.process([(ours[k], e) for k, e in events])
    want = [engine.apply(theirs[k], e) for k, e in events]
    assert all(same(a, b) for a, b in zip(got, want, strict=True))
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a.matrix(), b.matrix())


def test_ranking_keys_order_like_rank_with_ties_infinities_and_empty_slots(rng):
    A = rng.standard_normal((200, 16, 4)).astype(np.float32)
    A[:, 5] = A[:, 3]  # ties: the lower slot first
    A[:, 14:] = 3e19  # +inf distances: by slot number, after every finite one
    filled = rng.random((200, 16)) < 0.7
    V = rng.standard_normal((200, 4)).astype(np.float32)
    V[0] = 1e18
    found, first = topk(A, filled, V, 6), nearest(A, filled, V)
    for n in range(200):
        live = np.flatnonzero(filled[n])
        best = rank(live, sqdist(A[n, live], V[n]), 6)
        want = np.full(6, -1)
        want[: len(best)] = best
        np.testing.assert_array_equal(found[n], want)
        assert first[n] == want[0]


@pytest.mark.parametrize(
    "slots,dim,k", [(10, 10, 5), (64, 8, 5), (16, 7, 20), (5, 129, 3), (2, 2048, 2), (3, 1000, 3)]
)
def test_the_c_kernel_equals_numpys_keys_bit_for_bit(slots, dim, k, rng):
    """memnet/_scan.c's rank() against keys() in numpy: every pairwise-sum regime (under 8,
    up to 128, halves above), wild magnitudes (distances from 1e-30 to +inf), exact ties,
    empty slots, and memories picked by row (the arena, read in place)."""
    n = 300
    scale = np.exp(rng.uniform(-35, 45, (n, slots, 1))).astype(np.float32)
    A = (rng.standard_normal((n, slots, dim)) * scale).astype(np.float32)
    A[:, slots - 1] = A[:, 0]  # an exact tie: the lower slot first
    V = (rng.standard_normal((n, dim)) * np.exp(rng.uniform(-35, 45, (n, 1)))).astype(np.float32)
    V[: n // 4] = A[: n // 4, 1]  # distance 0
    filled = rng.random((n, slots)) < 0.8
    filled[:7] = False  # no slot filled: -1
    np.testing.assert_array_equal(nearest(A, filled, V), reference_nearest(A, filled, V))
    np.testing.assert_array_equal(topk(A, filled, V, k), reference_topk(A, filled, V, k))
    rows = rng.integers(0, n, n)  # memories read in place, in any order, some twice
    got = nearest(A, filled, V, rows), topk(A, filled, V, k, rows)
    np.testing.assert_array_equal(got[0], reference_nearest(A[rows], filled[rows], V))
    np.testing.assert_array_equal(got[1], reference_topk(A[rows], filled[rows], V, k))
    assert len(topk(A, filled, V[:0], k, rows[:0])) == 0
    with pytest.raises(IndexError):
        topk(A, filled, V[:1], k, np.array([n]))


def test_snapshot_blobs_move_between_small_and_per_memory_engines(rng):
    model = make_model(4, input_dim=8, memory_dim=8, output_dim=8, slots=64)
    dense, before = Engine(model), Engine(model, dense_max_floats=0)
    for src, dst in ((dense, before), (before, dense)):
        memory = src.new_memory()
        for kind, value in random_events(src, rng, 50, p_write=1.0):
            src.apply(memory, as_event(src, kind, value))
        back = decode_memory(encode_memory("m", memory, "1-1"), dst, None, "test")
        np.testing.assert_array_equal(back.matrix(), memory.matrix())
        np.testing.assert_array_equal(back.search.changed, memory.search.changed)
        assert back.writes == memory.writes == 50


def test_arena_rows_are_given_back_clean_and_the_arena_grows(rng):
    model = make_model(5, slots=10)
    engine = Engine(model)
    arena = engine.arena()
    memories = [engine.new_memory() for _ in range(1000)]
    for kind, value in random_events(engine, rng, 20, p_write=1.0):
        engine.apply(memories[7], as_event(engine, kind, value))
    before = memories[7].matrix().copy()
    view = arena.vectors[7]  # alive while the arena grows: its rows are copied, not moved
    memories += [engine.new_memory() for _ in range(2000)]  # past the first 1,024 rows
    assert arena.in_use() == 3000 and len(arena.writes) >= 3000
    np.testing.assert_array_equal(memories[7].matrix(), before)
    np.testing.assert_array_equal(view, before)
    del view
    memories += [engine.new_memory() for _ in range(5000)]  # grown in place (mremap)
    np.testing.assert_array_equal(memories[7].matrix(), before)
    assert memories[7].writes == 20 and memories[8].writes == 0
    del memories[3000:]
    for kind, value in random_events(engine, rng, 20, p_write=1.0):
        engine.apply(memories[-1], as_event(engine, kind, value))
    row = memories[-1].search.row
    del memories[-1]
    assert arena.in_use() == 2999
    fresh = engine.new_memory()
    assert fresh.search.row == row
    assert fresh.writes == 0 and not fresh.search.changed.any()
    np.testing.assert_array_equal(fresh.matrix(), model.params["memory_init"])


def test_an_arena_that_cannot_grow_keeps_its_rows_and_grows_later(monkeypatch, rng):
    """Out of memory in the middle of growing (a view held, so the rows must be copied into
    a new mapping that cannot be had): take() raises, every row is still there, and once
    memory is back the arena grows. A row given back while the arrays move (a memory
    collected meanwhile) is reset and reused afterwards."""
    import memnet.dense as dense

    model = make_model(5, slots=10)
    engine = Engine(model)
    arena = engine.arena()
    memories = [engine.new_memory() for _ in range(len(arena.writes))]  # full
    for kind, value in random_events(engine, rng, 20, p_write=1.0):
        engine.apply(memories[3], as_event(engine, kind, value))
        engine.apply(memories[5], as_event(engine, kind, value))  # (its row comes back clean)
    kept, rows = memories[3].matrix().copy(), len(arena.writes)
    anonymous, calls = dense._anonymous, []

    def failing(size):
        calls.append(size)
        if len(calls) == 1:  # vectors grew in place; filled's copy cannot be had
            raise MemoryError
        return anonymous(size)

    view = arena.filled[3]  # (forces the copying path for filled)
    monkeypatch.setattr(dense, "_anonymous", failing)
    with pytest.raises(MemoryError):
        engine.new_memory()
    assert len(arena.writes) == rows and arena.in_use() == rows
    np.testing.assert_array_equal(memories[3].matrix(), kept)
    del view
    monkeypatch.setattr(dense, "_anonymous", anonymous)
    doomed = [memories.pop(5)]
    given = doomed[0].search.row

    def collect_during_growth(name, shape, dtype, grown=dense.Arena._mapped):
        if name == "filled":
            assert arena._deferred is not None
            doomed.clear()  # the memory's last reference goes while the arrays move
        return grown(arena, name, shape, dtype)

    monkeypatch.setattr(arena, "_mapped", collect_during_growth)
    fresh = engine.new_memory()
    assert len(arena.writes) == 2 * rows and fresh.search.row == rows and not doomed
    np.testing.assert_array_equal(memories[3].matrix(), kept)
    again = engine.new_memory()
    assert again.search.row == given
    np.testing.assert_array_equal(again.matrix(), model.params["memory_init"])
    assert again.writes == 0 and not again.search.changed.any()


def test_threshold_picks_the_path():
    model = make_model(0, input_dim=8, memory_dim=8, output_dim=8, slots=64)  # 512 floats
    assert isinstance(Engine(model, dense_max_floats=512).new_memory(), DenseMemory)
    assert not isinstance(Engine(model, dense_max_floats=511).new_memory(), DenseMemory)


def test_memory_bytes_covers_what_a_small_memory_allocates():
    import tracemalloc

    model = make_model(0, input_dim=8, memory_dim=8, output_dim=8, slots=64)
    engine = Engine(model)
    keep = [engine.new_memory() for _ in range(6000)]  # the arena grown past 5,000 rows
    keep.clear()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    memories = [engine.new_memory() for _ in range(5000)]
    per_memory = (tracemalloc.get_traced_memory()[0] - before) / len(memories)
    tracemalloc.stop()
    row = 64 * 8 * 4 + 2 * 64 + 8  # vectors, filled and changed flags, write count
    assert engine.memory_bytes(memories[0]) == row + engine_overhead()
    assert per_memory <= engine_overhead()  # the Python objects (rows are preallocated)


def engine_overhead():
    from memnet.engine import DENSE_OVERHEAD_BYTES

    return DENSE_OVERHEAD_BYTES


def test_a_small_memory_of_another_engine_is_refused_not_written_elsewhere():
    """Its row number means another memory in this engine's arena."""
    from memnet import Engine
    from tests.conftest import make_model

    model = make_model(0, slots=8)
    one, two = Engine(model), Engine(model)
    mine, theirs = two.new_memory(), one.new_memory()
    before = mine.matrix().copy()
    with pytest.raises(ValueError, match="another Engine"):
        two.process([(theirs, two.write(np.ones(model.config.input_dim, np.float32)))])
    np.testing.assert_array_equal(mine.matrix(), before)
