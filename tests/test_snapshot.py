"""Snapshots: exact round trip, refusal of damaged or foreign ones, fallback, retention."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from memnet import Engine, IndexConfig, SnapshotError
from memnet.errors import StaleSnapshot
from memnet.snapshot import SnapshotStore
from tests.conftest import make_model
from tests.test_engine import as_event, random_events, same

GRAPH = IndexConfig(exact_max_slots=100, overlay_max=16)


def engine_for(seed=0, index=None, **sizes):
    model = make_model(
        seed, **{"input_dim": 8, "memory_dim": 8, "output_dim": 3, "slots": 300, **sizes}
    )
    if index is not None:
        config = type(model.config)(**{**model.config.__dict__, "index": index})
        model = type(model).create(config, model.params)
    return Engine(model)


def feed(engine, memories, events):
    return [
        engine.apply(memories[name], as_event(engine, kind, value))
        for name, (kind, value) in events
    ]


def named_events(engine, rng, n, names=("alpha", "beta", "γάμμα")):
    return [
        (names[int(rng.integers(0, len(names)))], e)
        for e in random_events(engine, rng, n, p_write=0.7)
    ]


@pytest.mark.parametrize(
    "index", [None, IndexConfig(overlay_max=8), GRAPH], ids=["exact", "exact folded", "graph"]
)
def test_round_trip_is_exact_and_continues_as_if_never_stopped(tmp_path, rng, index):
    engine = engine_for(index=index)
    store = SnapshotStore(tmp_path, engine)
    names = ("alpha", "beta", "γάμμα")
    before, after = named_events(engine, rng, 200), named_events(engine, rng, 200)

    straight = {n: engine.new_memory() for n in names}
    feed(engine, straight, before)
    expected = feed(engine, straight, after)

    memories = {n: engine.new_memory() for n in names}
    feed(engine, memories, before)
    store.save(memories, position="1700000000000-42", epoch=3)
    loaded = store.load()
    assert loaded.position == "1700000000000-42" and loaded.epoch == 3 and not loaded.refused
    assert set(loaded.memories) == set(names)
    for n in names:
        np.testing.assert_array_equal(loaded.memories[n].matrix(), memories[n].matrix())
        assert loaded.memories[n].writes == memories[n].writes
    resumed = feed(engine, loaded.memories, after)
    assert all(same(a, b) for a, b in zip(expected, resumed, strict=True))
    for n in names:
        np.testing.assert_array_equal(loaded.memories[n].matrix(), straight[n].matrix())


def test_unchanged_graph_files_are_linked_not_rewritten(tmp_path, rng):
    engine = engine_for(index=GRAPH)
    store = SnapshotStore(tmp_path, engine)
    memory = engine.new_memory()
    for _ in range(20):
        engine.apply(memory, engine.write(rng.standard_normal(8).astype(np.float32) * 9))
    memory.search.reindex()  # fold the overlay in: the memory now has a private graph
    assert not memory.search.base.shared
    first = store.save({"m": memory}, "1-0")
    second = store.save({"m": memory}, "2-0")
    graph = [p.name for p in first.path.iterdir() if p.suffix == ".hnsw"]
    assert len(graph) == 1
    assert os.stat(first.path / graph[0]).st_ino == os.stat(second.path / graph[0]).st_ino


def saved_twice(tmp_path, rng):
    engine = engine_for()
    store = SnapshotStore(tmp_path, engine)
    memories = {"a": engine.new_memory()}
    feed(engine, memories, named_events(engine, rng, 50, names=("a",)))
    old = store.save(memories, "1-0")
    feed(engine, memories, named_events(engine, rng, 50, names=("a",)))
    new = store.save(memories, "2-0")
    return engine, store, old, new


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_manifest(path):
    outer = json.loads(path.read_text())
    outer["manifest"]["position"] = "9-9"
    path.write_text(json.dumps(outer))


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (truncate, "state.safetensors", "bytes, expected"),
        (flip, "state.safetensors", "checksum mismatch (file corrupted)"),
        (os.remove, "state.safetensors", "missing"),
        (os.remove, "MANIFEST.json", "missing"),
        (edit_manifest, "MANIFEST.json", "checksum mismatch (manifest corrupted)"),
        (truncate, "MANIFEST.json", "unreadable"),
    ],
    ids=[
        "truncated",
        "flipped byte",
        "missing file",
        "missing manifest",
        "edited manifest",
        "truncated manifest",
    ],
)
def test_damaged_snapshot_is_refused_and_loading_falls_back(tmp_path, rng, damage, file, message):
    _engine, store, old, new = saved_twice(tmp_path, rng)
    damage(new.path / file)
    loaded = store.load()
    assert loaded.name == old.name and loaded.position == "1-0"
    assert len(loaded.refused) == 1
    assert str(new.path / file) in loaded.refused[0] and message in loaded.refused[0]


def test_snapshot_of_another_model_is_refused(tmp_path, rng):
    _engine, _store, old, new = saved_twice(tmp_path, rng)
    other = SnapshotStore(tmp_path, engine_for(seed=1))
    with pytest.raises(SnapshotError, match="another model") as e:
        other.load()
    assert old.name in str(e.value) and new.name in str(e.value)


def test_only_the_newest_are_kept_and_leftovers_do_not_block(tmp_path, rng):
    engine = engine_for()
    store = SnapshotStore(tmp_path, engine, keep=3)
    (tmp_path / ".tmp-crashed").mkdir(parents=True)
    (tmp_path / ".tmp-crashed" / "state.safetensors").write_bytes(b"half")
    memories = {"a": engine.new_memory()}
    for n in range(5):
        feed(engine, memories, named_events(engine, rng, 5, names=("a",)))
        store.save(memories, f"{n}-0")
    assert [s.serial for s in store.snapshots()] == [5, 4, 3]
    assert store.positions() == ["4-0", "3-0", "2-0"]
    assert store.load().position == "4-0"
    store.clean_temporary()
    assert not (tmp_path / ".tmp-crashed").exists()


def test_an_older_epoch_never_replaces_a_newer_one(tmp_path, rng):
    engine = engine_for()
    store = SnapshotStore(tmp_path, engine)
    memories = {"a": engine.new_memory()}
    store.save(memories, "5-0", epoch=2)
    with pytest.raises(StaleSnapshot, match="epoch 1 is stale"):
        store.save(memories, "9-0", epoch=1)
    assert store.load().position == "5-0"
    assert not list(tmp_path.glob(".tmp-*"))


def test_no_snapshot_directory_means_no_snapshot(tmp_path):
    assert SnapshotStore(tmp_path / "absent", engine_for()).load() is None
