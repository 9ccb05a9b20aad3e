"""The view's whole-view work done in SQLite (apply an index, write a full one, list the
blobs) gives what the same work on Python objects gives."""

from __future__ import annotations

import json

import numpy as np
import pytest

from memnet.manifest import Entry, canonical
from memnet.view import View


def entries(rng, n, prefix="m"):
    out = {}
    for i in range(n):
        pack = f"p/blobs/pack-{int(rng.integers(5))}"
        kind = i % 3
        if kind == 0:  # a slice of a pack
            out[f"{prefix}{i}"] = Entry(pack, 4096, i, part=(i * 10, 10, f"{i:064x}"))
        elif kind == 1:  # a blob of its own
            out[f"{prefix}{i}"] = Entry(f"p/blobs/own-{i}", 100 + i, i)
        else:  # with a graph base
            base = ("fp", f"p/blobs/vec-{i % 2}", 64, f"p/blobs/links-{i % 2}", 32)
            out[f"{prefix}{i}"] = Entry(f"p/blobs/own-{i}", 50, i, base=base)
    return out


NAMES = ["plain", "ünïcode", 'quote"and\\slash', "tab\tnew\nline", "日本", "emoji-🙂", ""]


def test_a_full_index_written_by_sqlite_is_the_canonical_json_of_the_merged_view():
    rng = np.random.default_rng(1)
    old = entries(rng, 300) | {n: Entry(f"p/blobs/x{j}", 1, j) for j, n in enumerate(NAMES)}
    view = View()
    view.update(old)
    changes = entries(rng, 40, prefix="m1") | {"ünïcode": Entry("p/blobs/new", 2, 9)}
    gone = ["m3", "m4", "日本", "never-there"]
    got = view.merged_json(changes, gone)
    merged = {n: e for n, e in old.items() if n not in gone} | changes
    expected = {n: e.to_json() for n, e in merged.items()}
    assert json.loads(got) == expected
    ascii_only = {n: e for n, e in expected.items() if n.isascii()}
    if ascii_only == expected:  # (json.dumps escapes non-ASCII; SQLite writes UTF-8)
        assert got.encode() == canonical(expected)
    ascii_view = View()
    ascii_view.update({n: e for n, e in old.items() if n.isascii()})
    text = ascii_view.merged_json({}, [])
    assert text.encode() == canonical({n: e.to_json() for n, e in old.items() if n.isascii()})
    assert len(view) == len(old) and view.get("m3") == old["m3"]  # the view is unchanged
    assert view.merged_json({}, []) == view.merged_json({}, [])  # (pending table emptied)


def test_an_index_applied_by_sqlite_gives_the_entries_it_lists():
    rng = np.random.default_rng(2)
    first = entries(rng, 200) | {n: Entry(f"p/blobs/x{j}", 1, j) for j, n in enumerate(NAMES)}
    view = View()
    view.apply_index(
        canonical({"made": "a", "memories": {n: e.to_json() for n, e in first.items()}})
    )
    delta = entries(rng, 20, prefix="m5")
    removed = ["m0", "m1", "emoji-🙂"]
    index = {
        "made": "b",
        "memories": {n: e.to_json() for n, e in delta.items()},
        "removed": removed,
    }
    view.apply_index(json.dumps(index).encode())
    expected = {n: e for n, e in first.items() if n not in removed} | delta
    assert dict(view.items()) == expected and len(view) == len(expected)


@pytest.mark.parametrize(
    "data",
    [
        b"[1, 2]",
        b'{"memories": {"a": ["k", 1]}}',
        b'{"memories": {"a": [1, 1, 1]}}',
        b'{"memories": {"a": ["k", "1", 1]}}',
        b'{"memories": {"a": "k"}}',
        b'{"memories": {"a": ["k", 1, 1]',
        b"\xff\xfe",
    ],
)
def test_a_malformed_index_is_refused_and_changes_nothing(data):
    view = View()
    view.update({"kept": Entry("p/blobs/k", 1, 1)})
    with pytest.raises(ValueError):
        view.apply_index(data)
    assert dict(view.items()) == {"kept": Entry("p/blobs/k", 1, 1)}


def test_blob_sizes_name_each_blob_once_with_its_size():
    rng = np.random.default_rng(3)
    listed = entries(rng, 90)
    view = View()
    view.update(listed)
    got = view.blob_sizes()
    expected = {}
    for entry in listed.values():
        expected[entry.key] = entry.size
        if entry.base is not None:
            expected[entry.base[1]] = entry.base[2]
            expected[entry.base[3]] = entry.base[4]
    assert {(k, s) for k, s, _ in got} == set(expected.items())
    assert len(got) == len(expected)
    for key, _, name in got:
        assert key in listed[name].blobs()


def test_get_many_gives_what_get_gives_for_each_name_it_holds():
    rng = np.random.default_rng(7)
    view = View()
    held = entries(rng, 60)
    held.update({name: Entry(f"p/blobs/{i}", 10, i) for i, name in enumerate(NAMES)})
    view.update(held)
    asked = [*held, "absent", "m9999", *NAMES]  # (names twice, and names not held)
    found = view.get_many(asked)
    assert found == {name: view.get(name) for name in held} == held
    assert view.get_many([]) == {} and view.get_many(["absent"]) == {}
