"""Search structures against brute force: exact where promised, high recall where not."""

from __future__ import annotations

import numpy as np
import pytest

from memnet.config import IndexConfig
from memnet.exact import ExactSlots, scan
from memnet.graph import GraphBase
from memnet.search import GraphSlots


def brute_topk(matrix, v, k, filled=None):
    d = ((matrix.astype(np.float64) - v) ** 2).sum(axis=1)
    if filled is not None:
        d[~filled] = np.inf
    order = np.lexsort((np.arange(len(d)), d))
    order = order[np.isfinite(d[order])]
    return order[:k]


def readonly(a):
    a = np.array(a, np.float32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("scale", [1.0, 200.0], ids=["in-distribution", "far-out queries"])
def test_exact_slots_equal_brute_force(k, scale, rng):
    X = readonly(rng.standard_normal((3000, 32)))
    search = ExactSlots.over(X)
    for _ in range(3):  # interleave updates so the cached norms must follow
        V = (scale * rng.standard_normal((50, 32))).astype(np.float32)
        got = search.topk(V, k)
        truth = np.stack([brute_topk(search.vectors(np.arange(3000)), v, k) for v in V])
        np.testing.assert_array_equal(got, truth)
        for slot in rng.integers(0, 3000, 20):
            search.set(int(slot), (scale * rng.standard_normal(32)).astype(np.float32))
    assert not X.flags.writeable and np.array_equal(X, readonly(X))  # the shared base is intact


def test_exact_slots_break_ties_by_slot_and_skip_empty_slots():
    X = readonly(np.zeros((6, 4)))
    filled = np.array([False, True, False, True, True, False])
    search = ExactSlots.over(X, filled.copy())
    np.testing.assert_array_equal(search.topk(np.zeros((1, 4), np.float32), 5), [[1, 3, 4, -1, -1]])
    search.set(0, np.ones(4, np.float32))
    assert search.filled_count() == 4
    assert search.nearest(np.ones(4, np.float32)) == 0


@pytest.mark.parametrize("fold_at", [1024, 7], ids=["overlay", "folding"])
@pytest.mark.parametrize("scale", [1.0, 200.0], ids=["in-distribution", "far-out queries"])
def test_scans_done_ahead_never_change_answers(fold_at, scale, rng):
    """Hints from one batched scan of the base give a fresh search's answers, also after
    writes overwrote hinted rows (up to all of a query's best: it then scans again) or
    folded the overlay into a new base (hints of the old one are ignored)."""
    X = readonly(rng.standard_normal((3000, 16)))
    search, truth = ExactSlots.over(X, fold_at=fold_at), X.copy()
    V = (scale * rng.standard_normal((40, 16))).astype(np.float32)
    hints = scan(search.base, V, 5 + 8)
    for v in V[:20]:
        for slot in brute_topk(truth, v, 14)[: int(rng.integers(0, 15))]:
            truth[slot] = truth[slot] + np.float32(3)
            search.set(int(slot), truth[slot])
    expected = np.stack([brute_topk(truth, v, 5) for v in V])
    np.testing.assert_array_equal(search.topk(V, 5, hints), expected)
    np.testing.assert_array_equal(search.topk(V, 5), expected)
    assert (search.base is hints[0].base) == (fold_at == 1024)


def test_a_scan_of_a_partly_filled_base_skips_empty_slots(rng):
    X = readonly(rng.standard_normal((500, 8)))
    filled = np.zeros(500, bool)
    filled[[3, 77, 400]] = True
    search = ExactSlots.over(X, filled)
    V = rng.standard_normal((6, 8)).astype(np.float32)
    hints = scan(search.base, V, 13)
    assert all(set(h.slots) == {3, 77, 400} for h in hints)
    got = search.topk(V, 5, hints)
    np.testing.assert_array_equal(got[:, :3], np.stack([brute_topk(X, v, 5, filled) for v in V]))
    assert (got[:, 3:] == -1).all()


def test_vectors_too_far_out_to_estimate_are_searched_in_full(rng):
    """Where |m|^2 - 2 m·v could overflow float32, no row is pruned: the answer is brute
    force's over float32 distances (including infinite ones, ranked by slot)."""
    from memnet.distance import rank, sqdist

    far = (5e18 * rng.standard_normal((3, 8))).astype(np.float32)  # |v|^2 ~ 2e38, finite
    X = rng.standard_normal((500, 8)).astype(np.float32)
    X[[7, 300, 411]] = 0.9 * far  # the nearest rows; 2 m·v overflows for them
    search = ExactSlots.over(readonly(X))
    V = np.concatenate([rng.standard_normal((3, 8)).astype(np.float32), far])
    hints = scan(search.base, V, 13)
    for hinted in (hints, None):
        got = search.topk(V, 5, hinted)
        truth = [rank(np.arange(500), sqdist(X, v), 5) for v in V]
        np.testing.assert_array_equal(got, truth)


def graph(X, cfg):
    return GraphSlots(GraphBase.build(X, np.ones(len(X), bool), cfg, "init"), cfg)


def test_graph_slots_track_updates_and_reindex(rng):
    cfg = IndexConfig(exact_max_slots=1, overlay_max=64)
    X = rng.standard_normal((3000, 16)).astype(np.float32)
    search, truth = graph(X, cfg), X.copy()
    hits = total = 0
    for round_ in range(6):
        for slot in rng.integers(0, 3000, 50):
            vector = rng.standard_normal(16).astype(np.float32) * (1 + round_)
            search.set(int(slot), vector)
            truth[slot] = vector
        np.testing.assert_array_equal(search.vectors(np.arange(3000)), truth)
        V = np.concatenate(
            [
                truth[rng.integers(0, 3000, 50)] + 0.1,
                rng.standard_normal((50, 16)).astype(np.float32),
            ]
        )
        got = search.topk(V, 5)
        for v, row in zip(V, got, strict=True):
            hits += len(set(row) & set(brute_topk(truth, v, 5)))
            total += 5
    assert search.base.id != "init"  # the overlay was re-indexed at least once
    assert hits / total >= 0.99


def test_reindexing_one_memory_leaves_the_shared_graph_alone(rng):
    cfg = IndexConfig(exact_max_slots=1, overlay_max=8)
    X = rng.standard_normal((2000, 8)).astype(np.float32)
    base = GraphBase.build(X, np.ones(2000, bool), cfg, "init")
    base.shared = True
    a, b = GraphSlots(base, cfg), GraphSlots(base, cfg)
    for slot in range(10):
        a.set(slot, np.full(8, 50.0, np.float32))
    assert a.base is not base and b.base is base
    np.testing.assert_array_equal(b.vectors(np.arange(2000)), X)
    assert b.nearest(np.full(8, 50.0, np.float32)) != a.nearest(np.full(8, 50.0, np.float32))


@pytest.mark.slow
def test_recall_at_100k_slots(rng):
    """recall@1 against brute force on random data at 100k slots, with default settings:
    the default search there (exact, a batched scan) equals brute force, and the hnswlib
    graph (for memories above index.exact_max_slots) reaches 0.99 both for queries near
    stored vectors (noise 0.3 per dimension) and for fresh Gaussian queries, the hardest
    case for a graph in 64 dimensions."""
    cfg = IndexConfig()
    X = rng.standard_normal((100_000, 64)).astype(np.float32)
    exact = ExactSlots.over(readonly(X))
    search = graph(X, cfg)
    near = X[rng.integers(0, len(X), 400)] + 0.3 * rng.standard_normal((400, 64)).astype(np.float32)
    fresh = rng.standard_normal((400, 64)).astype(np.float32)
    for V in (near, fresh[:40]):
        np.testing.assert_array_equal(
            exact.topk(V, 1, scan(exact.base, V, 9)), [brute_topk(X, v, 1) for v in V]
        )
    truth = {"near": exact.topk(near, 1), "fresh": exact.topk(fresh, 1)}
    recall = {
        n: float((search.topk(V, 1) == truth[n]).mean())
        for n, V in (("near", near), ("fresh", fresh))
    }
    print(f"graph recall@1 at 100k: near-data {recall['near']:.3f}, fresh {recall['fresh']:.3f}")
    assert recall["near"] >= 0.99 and recall["fresh"] >= 0.99


def test_far_out_queries_are_answered_exactly(rng):
    """Queries far outside the graph's rows (where graph navigation fails) are answered by
    the overlay when the triangle inequality rules the graph out, else by a full product."""
    cfg = IndexConfig(exact_max_slots=1, overlay_max=10_000)
    X = rng.standard_normal((5000, 16)).astype(np.float32)
    search, truth = graph(X, cfg), X.copy()
    for _ in range(200):
        v = (rng.standard_normal(16) * 40).astype(np.float32)  # |v| ~ 160 vs rows ~ 4
        got = search.topk(v[None], 3)[0]
        np.testing.assert_array_equal(got, brute_topk(truth, v, 3))
        slot = int(got[0])
        search.set(slot, v * 0.9)  # writes move slots far out, as an untrained I does
        truth[slot] = v * 0.9


def test_a_sole_user_takes_the_shared_graph_over_instead_of_copying_it(rng):
    from memnet import Engine
    from tests.conftest import make_model

    model = make_model(0, input_dim=8, memory_dim=8, slots=3000)
    config = type(model.config)(
        **{**model.config.__dict__, "index": IndexConfig(exact_max_slots=100, overlay_max=8)}
    )
    engine = Engine(type(model).create(config, model.params))
    memory = engine.new_memory()
    shared = memory.search.base
    for slot in range(8):
        memory.search.set(slot, np.full(8, 3.0, np.float32))
    assert memory.search.base is shared and not shared.shared  # taken over, not copied
    assert engine.new_memory().search.base is not shared  # the engine made a fresh one
    np.testing.assert_array_equal(engine.new_memory().matrix(), model.params["memory_init"])


def test_the_initial_graph_cache_is_shared_and_verified(tmp_path, rng):
    from memnet import Engine, SnapshotError
    from tests.conftest import make_model

    model = make_model(0, input_dim=8, memory_dim=8, slots=3000)
    config = type(model.config)(
        **{**model.config.__dict__, "index": IndexConfig(exact_max_slots=100)}
    )
    model = type(model).create(config, model.params)
    first = Engine(model, cache_dir=tmp_path).init_base()
    second = Engine(model, cache_dir=tmp_path).init_base()
    V = rng.standard_normal((50, 8)).astype(np.float32)
    assert np.array_equal(first.index.knn_query(V, k=5)[0], second.index.knn_query(V, k=5)[0])
    [graph_file] = tmp_path.glob("init-*.hnsw")
    data = bytearray(graph_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph_file.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="damaged index cache"):
        Engine(model, cache_dir=tmp_path).init_base()


def test_a_graph_base_knows_the_largest_norm_of_its_rows_as_they_are_not_as_they_were(rng):
    """The search routes a query by it (GraphSlots._route): a base read back from a
    snapshot computes it from its rows, so the one that served must have the same."""
    from memnet.distance import squared_norms

    cfg = IndexConfig(exact_max_slots=16, overlay_max=4)
    vectors = rng.standard_normal((64, 8)).astype(np.float32)
    vectors[7] *= 10  # slot 7 the largest, then shrunk, then others grow and shrink
    base = GraphBase.build(vectors.copy(), np.ones(64, bool), cfg, "init")
    base.norms()
    for slots, scale in (([7], 0.0), ([3, 9], 5.0), ([3], 0.1), ([9, 20], 1.0)):
        rows = rng.standard_normal((len(slots), 8)).astype(np.float32) * np.float32(scale)
        base.update(np.array(slots), rows)
        assert base.max_norm == squared_norms(base.vectors, base.filled)[1]  # bit for bit


def test_an_overlay_slot_never_takes_the_tie_of_a_base_row_equal_to_the_query(rng):
    """rules_out_base compares |v| (np.dot) with max_norm (squared_norms' pairwise sum):
    for one float32 vector the two float64 sums may round apart by an ulp, and a base row
    equal to v (distance 0) must still win the tie against the overlay's copy of it."""
    from memnet.distance import rank, sqdist

    M = 64
    for _ in range(10_000):  # a vector whose two norms round apart
        x = rng.standard_normal(M).astype(np.float32)
        if np.sqrt(np.dot(x.astype(np.float64), x)) > np.sqrt((x.astype(np.float64) ** 2).sum()):
            break
    X = (rng.standard_normal((8, M)) * 0.1).astype(np.float32)
    X[0] = x  # the base's largest norm
    slots = ExactSlots.over(X)
    slots.set(5, x)  # the same vector again, in the overlay
    truth = rank(np.arange(8), sqdist(slots.vectors(np.arange(8)), x), 1)
    assert slots.nearest(x) == truth[0] == 0
    np.testing.assert_array_equal(slots.topk(x[None], 1)[0], truth)


def test_a_query_whose_nearest_graph_rows_were_rewritten_still_finds_its_neighbours():
    """The graph's candidates for a query were its 8 nearest rows, all rewritten elsewhere
    since (in the overlay): the graph is asked again until it offers live rows, instead of
    the answer coming from the overlay's far-away slots alone."""
    rng = np.random.default_rng(0)  # (a query the graph route answers)
    S, M = 5000, 16
    X = rng.standard_normal((S, M)).astype(np.float32)
    base = GraphBase.build(X, np.ones(S, bool), IndexConfig(), "init")
    base.shared = True
    g = GraphSlots(base, IndexConfig())
    v = rng.standard_normal(M).astype(np.float32)
    for s in np.argsort(((X - v) ** 2).sum(1))[:8]:
        g.set(int(s), X[s] + 3 * rng.standard_normal(M).astype(np.float32))
    current = g.vectors(np.arange(S))
    dist = ((current - v) ** 2).sum(1)
    got = g.topk(v[None], 5)[0].tolist()
    assert g._route(((g.overlay()[1] - v) ** 2).sum(1), v, 5) == "graph"
    assert got == np.lexsort((np.arange(S), dist))[:5].tolist()


def graph_model(slots, dims=8):
    from tests.conftest import make_model

    model = make_model(0, input_dim=dims, memory_dim=dims, slots=slots)
    config = type(model.config)(
        **{**model.config.__dict__, "index": IndexConfig(exact_max_slots=100)}
    )
    return type(model).create(config, model.params)


def test_every_machine_builds_the_same_initial_graph(tmp_path):
    """Built on one thread: two caches (two machines) hold byte-identical graphs. hnswlib's
    multithreaded build inserts in the threads' order: another graph on another host."""
    import json

    from memnet import Engine

    model = graph_model(20_000, dims=16)
    for host in ("a", "b"):
        Engine(model, cache_dir=tmp_path / host).init_base()
    pointers = [json.loads(next((tmp_path / h).glob("init-*.json")).read_text()) for h in "ab"]
    assert pointers[0]["sha256"] == pointers[1]["sha256"]


def test_the_initial_graph_survives_racing_and_dead_builders(tmp_path, monkeypatch):
    """Two builders publishing the same graph keep it (the loser removed the winner's file,
    which has the same name); a waiter whose builder died (lock left, or gone without a
    graph) builds it itself instead of waiting for ever."""
    import os

    from memnet import Engine, graph

    model = graph_model(3000)
    engine = Engine(model, cache_dir=tmp_path / "race")
    cache = graph.InitGraphCache(tmp_path / "race", model.fingerprint)
    init = np.asarray(model.params["memory_init"])
    filled = np.ones(len(init), bool)
    cache.directory.mkdir(parents=True)
    cache._publish(init, filled, model.config.index)
    cache._publish(init, filled, model.config.index)
    engine.init_base()  # (verified against the pointer: raised "damaged index cache")

    # a graph cached by an older version (built on all cores, another per machine): unused
    old = graph.InitGraphCache(tmp_path / "old", model.fingerprint)
    old.directory.mkdir(parents=True)
    (old.directory / f"init-{model.fingerprint[:24]}.json").write_text('{"file": "x.hnsw"}')
    old.get(init, filled, model.config.index)
    assert old.pointer.name.startswith("init-1t-") and old.pointer.exists()

    for case in ("stale", "gone"):
        cache = graph.InitGraphCache(tmp_path / case, model.fingerprint)
        cache.directory.mkdir(parents=True)
        lock = cache.directory / f"{cache.stem}.lock"
        lock.touch()
        if case == "stale":
            os.utime(lock, (0, 0))
        else:
            monkeypatch.setattr(graph.time, "sleep", lambda s, lock=lock: lock.unlink())
        cache.get(init, filled, model.config.index)
        assert cache.pointer.exists() and not lock.exists()
        monkeypatch.undo()


def test_memory_bytes_counts_a_folded_memorys_codes_and_an_own_graphs_index(rng):
    """MEMNET_RESIDENT_MB is kept by these estimates: a folded exact memory's int8 codes
    and an own graph's hnswlib index were left out, so RAM went to 2x and 30x the budget
    (a review's measurements)."""
    import os

    from memnet import Engine
    from tests.conftest import make_model

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    model = make_model(0, input_dim=8, memory_dim=8, output_dim=3, slots=1024,
                       generalizer="append-only")  # fmt: skip
    for kind, index in (
        ("exact", IndexConfig(overlay_max=4)),
        ("graph", IndexConfig(exact_max_slots=512, overlay_max=4)),
    ):
        config = type(model.config)(**{**model.config.__dict__, "index": index})
        engine = Engine(type(model).create(config, model.params))
        engine.apply(engine.new_memory(), engine.query(q=rng.standard_normal(8).astype(np.float32)))
        before, memories = rss(), []
        for _ in range(30):
            memory = engine.new_memory()
            for _ in range(6):  # (folded: its own base)
                engine.apply(memory, engine.write(rng.standard_normal(8).astype(np.float32)))
            engine.apply(memory, engine.query(q=rng.standard_normal(8).astype(np.float32)))
            memories.append(memory)
        estimate = sum(engine.memory_bytes(m) for m in memories)
        if kind == "exact":
            base = memories[0].search.base
            held = base.vectors.nbytes + base.norms.nbytes + base.filled.nbytes
            codes = sum(a.nbytes for a in base.codes._arrays())
            assert engine.memory_bytes(memories[0]) >= held + codes
            fetched = engine.new_memory()  # (as read back from a snapshot: no codes yet)
            fetched.search = ExactSlots(type(base).over(base.vectors.copy(), base.filled), 4)
            assert fetched.search.base.codes is None
            assert engine.memory_bytes(fetched) >= held + codes  # (sized before its query)
        else:
            assert rss() - before <= 1.1 * estimate  # (hnswlib's allocations: not traced)


@pytest.mark.parametrize("slots, dim", [(1, 1), (255, 3), (1024, 8), (5000, 64)])
def test_the_size_of_a_bases_codes_is_known_before_they_are_made(slots, dim):
    from memnet.quantized import Quantized

    vectors = np.ones((slots, dim), np.float32)
    made = Quantized.of(vectors, np.full(slots, float(dim), np.float32))
    assert Quantized.nbytes_of(slots, dim) == sum(a.nbytes for a in made._arrays())
