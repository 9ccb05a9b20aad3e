"""The store contract (memnet/store.py), the same for a directory and for S3 (moto's server
through obstore), and snapshots on S3 end to end.

The S3 fixture (`s3_server`) comes from the tests.fixtures_s3 plugin."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from memnet.errors import StaleSnapshot
from memnet.snapshot import SnapshotStore
from memnet.store import (
    AlreadyExists,
    DirectoryStore,
    NotFound,
    ObjectStore,
    StoreError,
    get_many,
    get_ranges,
    open_store,
    put_many,
)
from tests.test_engine import random_events
from tests.test_snapshot import GRAPH, assert_same_memories, engine_for, feed


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The S3 server, with this process's AWS variables pointing at it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(params=["directory", "s3"])
def store(request, tmp_path):
    if request.param == "directory":
        return DirectoryStore(tmp_path / "store")
    return open_store(request.getfixturevalue("s3_env").url("root"))


def test_put_then_get_and_overwrite(store):
    store.put("a/one", b"1")
    store.put("a/b/two", b"")  # empty, and nested
    assert store.get("a/one") == b"1" and store.get("a/b/two") == b""
    store.put("a/one", b"uno")
    assert store.get("a/one") == b"uno"


def test_create_only_if_absent(store):
    store.create("manifests/m", b"first")
    with pytest.raises(AlreadyExists, match="manifests/m"):
        store.create("manifests/m", b"second")
    assert store.get("manifests/m") == b"first"
    assert isinstance(AlreadyExists("x"), StoreError)


def test_get_of_a_missing_key_is_not_found(store):
    with pytest.raises(NotFound, match="nothing/here: missing"):
        store.get("nothing/here")
    store.put("nothing/else", b"x")
    with pytest.raises(NotFound):
        store.get("nothing/here")


def test_list_gives_keys_under_a_prefix_with_sizes(store):
    assert store.list("a/") == []
    start = time.time()
    store.put("a/one", b"1")
    store.put("a/deeper/two", b"22")
    store.create("a/three", b"333")
    store.put("ab/not-under-a", b"x")
    listed = {item.key: item.size for item in store.list("a/")}
    assert listed == {"a/one": 1, "a/deeper/two": 2, "a/three": 3}
    assert all(abs(item.modified - start) < 60 for item in store.list("a/"))
    assert {item.key for item in store.list("ab/")} == {"ab/not-under-a"}


def test_delete_removes_keys_and_ignores_missing_ones(store):
    store.put("d/1", b"1")
    store.put("d/2", b"2")
    store.delete(["d/1", "d/never"])
    store.delete([])
    assert [item.key for item in store.list("d/")] == ["d/2"]
    with pytest.raises(NotFound):
        store.get("d/1")


def test_put_many_and_get_many_keep_the_order(store):
    items = [(f"m/{i:03d}", bytes([i]) * i) for i in range(20)]
    put_many(store, items)
    assert get_many(store, [k for k, _ in reversed(items)]) == [d for _, d in reversed(items)]
    with pytest.raises(NotFound, match="m/missing"):
        get_many(store, ["m/001", "m/missing"])


def test_get_range_reads_a_slice_and_misses_are_not_found(store):
    data = bytes(range(256)) * 40
    store.put("packs/p", data)
    assert store.get_range("packs/p", 1000, 300) == data[1000:1300]
    assert get_ranges(store, [("packs/p", 0, 5), ("packs/p", 10235, 5)]) == [
        data[:5],
        data[10235:],
    ]
    with pytest.raises(NotFound):
        store.get_range("packs/missing", 0, 5)


def test_open_store_picks_by_url(tmp_path, s3_env):
    for url in (tmp_path, str(tmp_path), f"file://{tmp_path}"):
        opened = open_store(url)
        assert isinstance(opened, DirectoryStore) and opened.root == tmp_path
    assert isinstance(open_store(s3_env.url("p")), ObjectStore)
    with pytest.raises(StoreError, match="ftp://x: unsupported snapshot URL"):
        open_store("ftp://x")


def test_a_directory_store_names_the_file_it_cannot_write(tmp_path):
    (tmp_path / "file").write_bytes(b"not a directory")
    store = DirectoryStore(tmp_path)
    with pytest.raises(StoreError, match="cannot write"):
        store.put("file/below", b"x")
    with pytest.raises(StoreError, match="cannot write"):
        store.create("file/below", b"x")
    assert not list(tmp_path.rglob(".tmp-*"))


def test_a_directory_store_writes_whole_files_or_nothing(tmp_path):
    store = DirectoryStore(tmp_path)
    store.put("a/x", b"1")
    (tmp_path / "a" / ".tmp-crashed").write_bytes(b"half")
    assert [item.key for item in store.list("a/")] == ["a/x"]
    store.remove_temporary("a/")
    assert sorted(p.name for p in Path(tmp_path, "a").iterdir()) == ["x"]


@pytest.mark.parametrize("index", [None, GRAPH], ids=["exact", "graph"])
def test_snapshots_round_trip_on_s3(s3_env, rng, index):
    engine = engine_for(index=index)
    url = s3_env.url("snapshots")
    writer = SnapshotStore(url, engine, prefix="p3")
    memories = {n: engine.new_memory() for n in ("a", "b", "c")}
    names = list(memories)
    events = [(names[i % 3], e) for i, e in enumerate(random_events(engine, rng, 120, 0.8))]
    feed(engine, memories, events[:60])
    writer.save(memories, "1-0", epoch=2)
    feed(engine, memories, events[60:])
    writer.save({n: memories[n] for n in ("a", "b")}, "2-0", epoch=2, deleted=["c"])

    reader = SnapshotStore(url, engine, prefix="p3")  # a new object: nothing shared in RAM
    loaded = reader.load()
    assert (loaded.position, loaded.epoch, loaded.refused) == ("2-0", 2, [])
    assert set(loaded.entries) == {"a", "b"}
    assert_same_memories(reader.fetch(["a", "b"]), {n: memories[n] for n in ("a", "b")})
    assert reader.positions() == ["2-0", "1-0"] and reader.newest_epoch() == 2

    whole = open_store(s3_env.url())  # everything lies under the URL's prefix and p3/
    keys = {item.key for item in whole.list("")}
    assert keys and all(k.startswith("snapshots/p3/") for k in keys)
    assert SnapshotStore(url, engine, prefix="p4").load() is None


def test_snapshot_writers_racing_on_s3_publish_one_manifest(s3_env):
    engine = engine_for()
    url = s3_env.url("snapshots")
    first, second = SnapshotStore(url, engine), SnapshotStore(url, engine)
    memories = {"a": engine.new_memory()}
    first.save(memories, "1-0", epoch=1)
    second.load()
    memories["a"].set(3, np.ones(8, np.float32))
    published = []

    def race():
        published.append(first.save({"a": memories["a"]}, "2-0", epoch=1))
        return False

    with pytest.raises(StaleSnapshot, match="published by another writer"):
        second.save({}, "3-0", epoch=1, abort=lambda: not published and race())
    loaded = SnapshotStore(url, engine).load()
    assert loaded.name == published[0].name and loaded.position == "2-0"


def test_a_create_met_by_a_conflicting_request_is_tried_again(s3_env, monkeypatch):
    """S3 answers 409 (ConditionalRequestConflict) to a conditional PUT while another
    request on the key is in progress -- this client's own retry after a timeout, say --
    and asks to try again; obstore reports it as AlreadyExistsError, like 412. Taken for
    "already there", a blob was never written and its snapshot published without it. Only
    an object at the key means it exists."""
    import obstore
    from obstore.exceptions import AlreadyExistsError

    store = open_store(s3_env.url("root"))
    real, conflicts = obstore.put, [2]

    def put(*args, **kwargs):
        if kwargs.get("mode") == "create" and conflicts[0]:
            conflicts[0] -= 1
            raise AlreadyExistsError("409 Conflict: ConditionalRequestConflict")
        return real(*args, **kwargs)

    monkeypatch.setattr(obstore, "put", put)
    store.create("blobs/b", b"bytes")
    assert store.get("blobs/b") == b"bytes" and conflicts == [0]
    with pytest.raises(AlreadyExists):  # (an object there: it exists, as a 412 says)
        store.create("blobs/b", b"bytes")


def test_a_directory_listing_skips_a_file_gone_while_it_lists(tmp_path):
    """A prune or a retention deletes files while another process lists the directory (a
    takeover's load, a rebuild reading the archive): the file is left out, not an error
    that fails the listing. (A dangling link stands for it: listed, then gone.)"""
    store = DirectoryStore(tmp_path / "store")
    store.put("archive/p0/a", b"1")
    (tmp_path / "store" / "archive" / "p0" / "b").symlink_to(tmp_path / "gone")
    assert [item.key for item in store.list("archive/")] == ["archive/p0/a"]


def test_a_directory_store_makes_its_new_directories_durable(tmp_path, monkeypatch):
    """Each directory the store makes is fsynced in its parent: the first manifest's
    directory entry too (the input is trimmed right after the first snapshot)."""
    from memnet import store as store_module

    synced = []
    real = store_module.fsync_path
    monkeypatch.setattr(store_module, "fsync_path", lambda p: synced.append(p) or real(p))
    root = tmp_path / "store"
    DirectoryStore(root).create("p0/MODEL/manifests/m", b"1")
    for made in ("p0", "p0/MODEL", "p0/MODEL/manifests"):
        assert str((root / made).parent) in synced, (made, synced)


def test_credentials_in_a_store_url_are_never_shown(s3_env):
    """A URL written with user:password@ (which obstore refuses for s3://), and obstore's
    messages naming an endpoint given with credentials: the password is masked."""
    from memnet.store import _short

    with pytest.raises(StoreError) as caught:
        ObjectStore(s3_env.url("root").replace("s3://", "s3://AKIAKEY:SeCr/et@"))
    assert "SeCr/et" not in str(caught.value) and "AKIAKEY:***@" in str(caught.value)
    error = OSError("Generic S3 error: sending http://minio:SeCrEtPw@10.0.0.1:9000/b failed")
    assert (
        _short(error)
        == "OSError: Generic S3 error: sending http://minio:***@10.0.0.1:9000/b failed"
    )
    raw = OSError("cannot open s3://AKIA:se@cret@bucket/root")  # (a raw "@" in the password)
    assert _short(raw) == "OSError: cannot open s3://AKIA:***@bucket/root"
