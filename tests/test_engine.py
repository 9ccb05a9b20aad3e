"""I, G, O, R and whole event sequences against the independent numpy implementation."""

from __future__ import annotations

import numpy as np
import pytest

from memnet import Answer, Engine, IndexConfig, InvalidInput, Rejected
from tests.conftest import close, make_model
from tests.reference import NumpyMemNet

SIZES = {
    "reference": {},
    "64-dim, 1k slots": {"input_dim": 64, "memory_dim": 64, "output_dim": 8, "slots": 1000},
    "64-dim, 10k slots": {"input_dim": 64, "memory_dim": 64, "output_dim": 8, "slots": 10_000},
}


def setup(seed=0, **sizes):
    model = make_model(seed, **sizes)
    return model, Engine(model), NumpyMemNet(model.params, model.config.top_k)


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_I_matches_reference(sizes, rng):
    model, engine, ref = setup(**sizes)
    X = rng.standard_normal((37, model.config.input_dim)).astype(np.float32)
    ours = engine._encode(engine._jax, X)
    close(ours, np.stack([ref.I(x) for x in X]))


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_G_updates_the_nearest_slot_through_the_gate(sizes, rng):
    model, engine, ref = setup(**sizes)
    memory, m = engine.new_memory(), ref.new_memory()
    for _ in range(20):
        x = rng.standard_normal(model.config.input_dim).astype(np.float32)
        before = memory.matrix()
        engine.apply(memory, engine.write(x))
        slot = ref.G(m, x)
        changed = np.flatnonzero((memory.matrix() != before).any(axis=1))
        assert set(changed) <= {slot}
        close(memory.matrix(), m)


def test_G_gate_blends_between_slot_and_input():
    # Gate weights chosen so g is a known value: g = sigmoid(gate_b) = sigmoid(0) = 0.5.
    model, engine, _ref = setup()
    params = dict(model.params)
    params["gate_w"] = np.zeros_like(params["gate_w"])
    model = type(model).create(model.config, params)
    engine = Engine(model)
    memory = engine.new_memory()
    x = np.ones(5, np.float32)
    i = engine._encode(engine._jax, x[None])[0]
    slot = int(np.argmin(((model.params["memory_init"] - i) ** 2).sum(axis=1)))
    engine.apply(memory, engine.write(x))
    np.testing.assert_allclose(
        memory.vector(slot), 0.5 * model.params["memory_init"][slot] + 0.5 * i, rtol=1e-6
    )


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_O_and_R_match_reference(sizes, rng):
    model, engine, ref = setup(**sizes)
    memory, m = engine.new_memory(), ref.new_memory()
    for _ in range(10):
        if rng.random() < 0.5:
            q = rng.standard_normal(model.config.memory_dim).astype(np.float32)
            ours, (y, r, a) = engine.apply(memory, engine.query(q=q)), ref.query(m, q=q)
        else:
            x = rng.standard_normal(model.config.input_dim).astype(np.float32)
            ours, (y, r, a) = engine.apply(memory, engine.query(x=x)), ref.query(m, x=x)
        assert isinstance(ours, Answer)
        np.testing.assert_array_equal(ours.slots, r)
        close(ours.weights, a)
        close(ours.y, y)


def test_R_is_the_response_mlp(rng):
    _model, engine, ref = setup(memory_dim=10)
    o = rng.standard_normal((4, 10)).astype(np.float32)
    close(np.asarray(engine.response.respond(engine._jax, o)), np.stack([ref.R(v) for v in o]))


def random_events(engine, rng, n, p_write=0.5):
    c = engine.config
    events = []
    for _ in range(n):
        u = rng.random()
        if u < p_write:
            events.append(("write", rng.standard_normal(c.input_dim).astype(np.float32)))
        elif u < p_write + (1 - p_write) / 2:
            events.append(("x", rng.standard_normal(c.input_dim).astype(np.float32)))
        else:
            events.append(("q", rng.standard_normal(c.memory_dim).astype(np.float32)))
    return events


def as_event(engine, kind, value):
    if kind == "write":
        return engine.write(value)
    return engine.query(x=value) if kind == "x" else engine.query(q=value)


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_sequences_match_reference(sizes, rng):
    _model, engine, ref = setup(**sizes)
    memory, m = engine.new_memory(), ref.new_memory()
    for kind, value in random_events(engine, rng, 120):
        ours = engine.apply(memory, as_event(engine, kind, value))
        if kind == "write":
            assert ours is None
            ref.G(m, value)
        else:
            y, r, a = ref.query(m, **{kind: value})
            np.testing.assert_array_equal(ours.slots, r)
            close(ours.weights, a)
            close(ours.y, y)
    close(memory.matrix(), m)


def process_in_batches(engine, memories, stream, rng):
    """Process (memory index, event) pairs in randomly sized batches."""
    out, start = [], 0
    while start < len(stream):
        size = int(rng.integers(1, 40))
        batch = stream[start : start + size]
        out.extend(engine.process([(memories[k], e) for k, e in batch]))
        start += size
    return out


def same(a, b):
    if a is None or b is None:
        return a is b
    return (
        np.array_equal(a.y, b.y)
        and np.array_equal(a.slots, b.slots)
        and np.array_equal(a.weights, b.weights)
    )


@pytest.mark.parametrize(
    "index",
    [None, IndexConfig(overlay_max=16), IndexConfig(exact_max_slots=100, overlay_max=16)],
    ids=["exact", "exact with folding", "graph with re-indexing"],
)
def test_batched_equals_one_at_a_time_bitwise(index, rng):
    sizes = {"input_dim": 16, "memory_dim": 16, "output_dim": 4, "slots": 500}
    model = make_model(3, **sizes)
    if index is not None:
        model = type(model).create(
            type(model.config)(**{**model.config.__dict__, "index": index}), model.params
        )
    engine = Engine(model)
    for trial in range(3):
        stream = [
            (int(rng.integers(0, 3)), as_event(engine, kind, value))
            for kind, value in random_events(engine, rng, 300, p_write=0.6)
        ]
        one = [engine.new_memory() for _ in range(3)]
        many = [engine.new_memory() for _ in range(3)]
        singles = [engine.apply(one[k], e) for k, e in stream]
        batched = process_in_batches(engine, many, stream, np.random.default_rng(trial))
        assert all(same(a, b) for a, b in zip(singles, batched, strict=True))
        for a, b in zip(one, many, strict=True):
            np.testing.assert_array_equal(a.matrix(), b.matrix())
            assert a.writes == b.writes


def test_k_is_min_of_top_k_and_slots():
    _model, engine, _ = setup(slots=3, top_k=5)
    answer = engine.apply(engine.new_memory(), engine.query(q=np.zeros(10, np.float32)))
    assert len(answer.slots) == 3 and len(answer.weights) == 3


@pytest.mark.parametrize(
    "make_event, message",
    [
        (lambda e: e.write([1.0, 2.0]), "x must have 5 values, got 2"),
        (lambda e: e.write([1.0, float("nan"), 0, 0, 0]), "non-finite"),
        (lambda e: e.write([1e39, 0, 0, 0, 0]), "non-finite"),
        (lambda e: e.write([True, False, True, True, True]), "flat vector of numbers"),
        (lambda e: e.write("hello"), "must be a vector"),
        (lambda e: e.query(), "exactly one of x"),
        (lambda e: e.query(x=np.ones(5), q=np.ones(10)), "exactly one of x"),
        (lambda e: e.query(q=np.ones(9)), "q must have 10 values, got 9"),
        (lambda e: e.query(q=[float("inf")] * 10), "non-finite"),
    ],
)
def test_invalid_input_is_refused_with_a_clear_message(make_event, message):
    _, engine, _ = setup()
    with pytest.raises(InvalidInput, match=message):
        make_event(engine)


def test_input_that_overflows_memory_space_changes_nothing():
    _model, engine, _ = setup()
    memory = engine.new_memory()
    before = memory.matrix()
    results = engine.process(
        [
            (memory, engine.write(np.full(5, 1e18, np.float32))),
            (memory, engine.query(x=np.full(5, 1e18, np.float32))),
        ]
    )
    assert all(isinstance(r, Rejected) for r in results)
    np.testing.assert_array_equal(memory.matrix(), before)
    assert memory.writes == 0


@pytest.mark.parametrize("generalizer", ["gated-nearest", "append-only"])
def test_a_memory_is_searchable_directly_after_process(generalizer, rng):
    """Scans done ahead for a batch are used up or dropped by the engine, whatever G does:
    a later direct search of several vectors sees none of them."""
    _model, engine, _ = setup(memory_dim=10, slots=300, generalizer=generalizer)
    memory = engine.new_memory()
    engine.process([(memory, engine.write(rng.standard_normal(5).astype(np.float32)))])
    V = rng.standard_normal((3, 10)).astype(np.float32)
    matrix = memory.matrix()
    dist = ((matrix[None].astype(np.float64) - V[:, None]) ** 2).sum(-1)
    if generalizer == "append-only":
        dist[:, np.arange(300) != 0] = np.inf  # only slot 0 has been written
    expected = np.argsort(dist, axis=1, kind="stable")[:, :2]
    got = memory.topk(V, 2)
    np.testing.assert_array_equal(np.where(got >= 0, got, expected), expected)


def test_events_and_answers_are_frozen_values_the_collector_does_not_track():
    """Made in C (memnet/_rows.c): they compare by value as frozen dataclasses did, refuse
    assignment, each Answer gets its own extra, and none is tracked by the cyclic collector
    (one per event: tracked, each batch's triggered full collections)."""
    import copy
    import gc

    from memnet.engine import Answer, Query, Write

    v = np.arange(4, dtype=np.float32)
    assert Write(v).row is v and Query(q=v).q is v and Query(row=v).q is None
    assert Query(q=v) == Query(None, v) and Query(q=1) != Query(1) and Write(v) != Query(v)
    assert hash(Query()) == hash(Query(None, None)) and repr(Write(1)) == "Write(row=1)"
    a, b = Answer(v, v, v), Answer(v, v, v)
    assert a.extra == {} and a.extra is not b.extra and Answer(v, v, v, {"x": 1}).extra == {"x": 1}
    assert Answer(y=v, slots=v, weights=v, extra=None).extra == {}
    for value, field in ((Write(v), "row"), (Query(q=v), "q"), (a, "y"), (a, "extra")):
        with pytest.raises(AttributeError):
            setattr(value, field, None)
    for bad, message in (
        (lambda: Write(), "missing required argument 'row'"),
        (lambda: Query(v, v, v), "takes at most 2 arguments"),
        (lambda: Query(v, row=v), "multiple values for argument 'row'"),
        (lambda: Answer(v, v, v, z=1), "unexpected keyword argument 'z'"),
    ):
        with pytest.raises(TypeError, match=message):
            bad()
    assert not any(gc.is_tracked(x) for x in (Write(v), Query(q=v), a, Answer(v, v, v, {"x": 1})))
    c = copy.deepcopy(Answer(1, 2, 3, {"x": [1]}))
    assert (c.y, c.slots, c.weights, c.extra) == (1, 2, 3, {"x": [1]}) and copy.copy(a) == a
    match Query(q=v):
        case Query(row=None, q=q):
            assert q is v
        case _:
            raise AssertionError("Query's fields do not match by keyword")


@pytest.mark.parametrize("dense", [None, 0], ids=["small memories (arena)", "per memory"])
def test_a_write_G_cannot_store_finitely_is_rejected_and_changes_nothing(dense, rng):
    """Finite but huge weights: z = i.w1 + m_s.w2 = inf + -inf for a write whose nearest
    slot is a row of 2s, so its new vector would be NaN. That write is Rejected and its
    memory unchanged (vectors and write count); a write to another memory in the same
    batch (nearest a row of 0s: z = +-inf + 0, a finite blend) and a query after are as
    if it never came."""
    model = make_model(3)
    params = {k: np.array(v) for k, v in model.params.items()}
    m, s = model.config.memory_dim, model.config.slots
    params["memory_init"][: s // 2], params["memory_init"][s // 2 :] = 2.0, 0.0
    engine = Engine(type(model).create(model.config, params))

    def nearest_is_twos(x):
        i = engine._encode(engine._jax, x[None])[0]
        return i, int(np.argmin(((params["memory_init"] - i) ** 2).sum(1))) < s // 2

    xs = [rng.standard_normal(model.config.input_dim).astype(np.float32) for _ in range(50)]
    picks = [(x, *nearest_is_twos(x)) for x in xs]
    x, i = next((x, i) for x, i, twos in picks if twos and np.abs(i).max() > 2)
    tame = next(x for x, _, twos in picks if not twos)
    k = int(np.argmax(np.abs(i)))
    params = {key: np.array(v) for key, v in params.items()}  # (create froze those)
    params["gate_w"][:] = 0
    params["gate_w"][k, 0] = 3e38 * np.sign(i[k])  # i.w1 = +inf
    params["gate_w"][m:, 0] = -3e38  # a row of 2s: -inf; of 0s: 0
    model = type(model).create(model.config, params)
    engine = Engine(model, dense_max_floats=dense)
    bad, other, alone = engine.new_memory(), engine.new_memory(), engine.new_memory()
    before = bad.matrix().copy()
    got = engine.process([(bad, engine.write(x)), (other, engine.write(tame)),
                          (bad, engine.query(x=x))])  # fmt: skip
    assert got[0] == Rejected("the write would store non-finite values in memory")
    np.testing.assert_array_equal(bad.matrix(), before)
    assert bad.writes == 0 and isinstance(got[2], Answer)
    assert got[1] is None and other.writes == 1
    engine.apply(alone, engine.write(tame))
    np.testing.assert_array_equal(other.matrix(), alone.matrix())
    assert np.isfinite(other.matrix()).all()
    expected = engine.apply(engine.new_memory(), engine.query(x=x))
    np.testing.assert_array_equal(got[2].y, expected.y)


def test_attention_over_kept_slots_only_whatever_their_logits():
    """Padding (a partly filled memory) takes no weight, even from real logits far below
    any constant that could stand in for it; otherwise bit for bit the earlier
    softmax(where(mask, logits, -1e30)); gradients stay finite (training)."""
    import jax
    import jax.numpy as jnp

    from memnet.components.topk_attention import masked_softmax

    got = masked_softmax(jnp.array([[-2e30, -3e30, 0.0]]), jnp.array([[True, True, False]]))
    assert np.asarray(got).tolist() == [[1.0, 0.0, 0.0]]
    assert np.asarray(masked_softmax(jnp.ones((1, 2)), jnp.zeros((1, 2), bool))).tolist() == [
        [0.0, 0.0]
    ]
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5000, 6)) * 10).astype(np.float32)
    mask = rng.random((5000, 6)) < 0.7
    earlier = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1), 0.0)
    np.testing.assert_array_equal(masked_softmax(logits, mask), earlier)
    for row, kept in (([1.0, 1e30], [True, False]), ([-100.0, 0.0], [False, False])):
        grad = jax.grad(lambda x, m=kept: (masked_softmax(x, jnp.array([m])) * 2).sum())
        assert np.isfinite(grad(jnp.array([row]))).all()
