"""Model upgrades against a real redis-server: the input archive, memnet rebuild, memnet
deploy with the old model's workers handing over to the new one's, exactly once."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest

from memnet import Engine, load_model, random_model, save_model
from tests.conftest import WORKER_MODEL
from tests.streams import (
    Running,
    assert_same_answer,
    events,
    library_answers,
    outputs,
    send,
    wait_for,
    worker_settings,
)
from worker import upgrade
from worker.archive import Archive
from worker.connection import text
from worker.ownership import model_prefix, store_at
from worker.protocol import Keys, parse_id, partition_of
from worker.status import gather, problems, render
from worker.upgrade import deploy, rebuild
from worker.worker import Worker

PREFIX = "up"
PARTITIONS = 4
DIMS = (WORKER_MODEL.input_dim, WORKER_MODEL.memory_dim)
NAMES = [f"user-{i}" for i in range(40)]


def answered(r, n):
    return lambda: len(outputs(r, PREFIX, PARTITIONS)) >= n


def test_deploy_switches_models_exactly_once_and_the_new_one_knows_the_whole_history(
    redis_url, redis_server, tmp_path, model_file
):
    r = redis_server.client()
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=77), model_b)
    settings = {"snapshot_every_entries": 60, "snapshots_kept": 2, "batch_size": 50}
    a_settings = [
        worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS, worker_id=f"a{i}",
                        **settings)
        for i in (1, 2)
    ]  # fmt: skip
    rng = np.random.default_rng(41)
    before = events(3000, NAMES, DIMS, rng)
    after = [{**e, "id": "after-" + e["id"]} if "id" in e else e
             for e in events(1000, NAMES, DIMS, rng)]  # fmt: skip
    queries_before = sum(e["op"] == "query" for e in before)
    a = [Running(Worker(s, Engine(load_model(s.model)))) for s in a_settings]
    for start in range(0, len(before), 500):
        send(r, PREFIX, PARTITIONS, before[start : start + 500])
    wait_for(answered(r, queries_before), 120, "model A's answers")
    wait_for(lambda: all(r.exists(Keys(PREFIX).part(p, "trimmed")) for p in range(PARTITIONS)),
             30, "the inputs to be trimmed")  # fmt: skip
    assert sum(r.xlen(Keys(PREFIX).inp(p)) for p in range(PARTITIONS)) < len(before) / 2
    archived = sum(len(list(Archive(store_at(str(tmp_path / "snap")), p).read(None)))
                   for p in range(PARTITIONS))  # fmt: skip
    assert archived > len(before) / 2  # what Redis trimmed is in the archive

    rebuilt = rebuild(a_settings[0], model_b, jobs=1)  # while A serves
    assert sum(d["entries"] for d in rebuilt) >= len(before) - 100
    result = deploy(a_settings[0], model_b, jobs=1)
    assert result["switched"] and text(r.hget(Keys(PREFIX).meta, "model")) == result["model"]
    for worker in a:
        worker.stop()
    waiting = f"model {result['model'][:12]} is deployed; {PARTITIONS} partitions not yet taken"
    assert waiting in "\n".join(render(gather(a_settings[0])))  # (memnet status: why no owner)
    b_settings = [
        worker_settings(redis_url, tmp_path, model_b, PREFIX, PARTITIONS, worker_id=f"b{i}",
                        **settings)
        for i in (1, 2)
    ]  # fmt: skip
    b = [Running(Worker(s, Engine(load_model(s.model)))) for s in b_settings]
    send(r, PREFIX, PARTITIONS, after)
    everything = before + after
    wait_for(answered(r, sum(e["op"] == "query" for e in everything)), 120, "B's answers")
    for worker in b:
        worker.stop()

    switch = {}
    for p in range(PARTITIONS):
        record = {text(k): text(v) for k, v in r.hgetall(Keys(PREFIX).part(p, "switch")).items()}
        assert record["to"] == result["model"] and record["from"] == result["previous"]
        switch[p] = parse_id(record["after"])
    by_a = library_answers(Engine(load_model(model_file)), everything)
    by_b = library_answers(Engine(load_model(model_b)), everything)
    out = outputs(r, PREFIX, PARTITIONS)
    ids = [m["id"] for _, m in out]
    assert len(ids) == len(set(ids)) == len(by_a), "every query answered exactly once"
    counts = {"A": 0, "B": 0}
    for entry_id, response in out:
        p = partition_of(response["memory"], PARTITIONS)
        model = "A" if parse_id(entry_id) <= switch[p] else "B"
        counts[model] += 1
        assert_same_answer(response, (by_a if model == "A" else by_b)[response["id"]])
    assert counts["A"] >= queries_before and counts["B"] > 0
    shown = "\n".join(render(gather(a_settings[0])))  # memnet status shows the switch points
    assert "not yet taken" not in shown
    for p in range(PARTITIONS):
        record = {text(k): text(v) for k, v in r.hgetall(Keys(PREFIX).part(p, "switch")).items()}
        assert (f"partition {p}: model {result['previous'][:12]} answered up to entry "
                f"{record['after']}, model {result['model'][:12]} after it") in shown  # fmt: skip


def test_only_the_served_or_deploying_model_may_start_and_a_rollback_is_a_deploy(
    redis_url, redis_server, tmp_path, model_file
):
    from worker.settings import SettingsError

    r = redis_server.client()
    models = {}
    for name, seed in (("b", 78), ("c", 79)):
        models[name] = tmp_path / f"{name}.safetensors"
        save_model(random_model(WORKER_MODEL, seed=seed), models[name])

    def settings(model):
        return worker_settings(redis_url, tmp_path, model, PREFIX, PARTITIONS)

    send(r, PREFIX, PARTITIONS, events(200, NAMES, DIMS, np.random.default_rng(42)))
    Worker(settings(model_file), Engine(load_model(model_file))).run(burst=True)
    fingerprints = {k: load_model(v).fingerprint for k, v in models.items()}
    assert deploy(settings(model_file), models["b"], jobs=1)["switched"]
    for refused in (models["c"], model_file):  # neither served nor deploying: the old one too
        with pytest.raises(SettingsError, match=f"serves model {fingerprints['b'][:12]}"):
            Worker(settings(refused), Engine(load_model(refused)))._start_up()
    back = deploy(settings(models["b"]), model_file, jobs=1)  # roll back: A again
    assert back["switched"] and back["previous"] == fingerprints["b"]
    assert text(r.hget(Keys(PREFIX).meta, "model")) == load_model(model_file).fingerprint
    Worker(settings(model_file), Engine(load_model(model_file))).run(burst=True)  # accepted
    deploy(settings(model_file), model_file, jobs=1)  # the served one: nothing to switch
    assert {text(r.get(Keys(PREFIX).part(p, "deploying"))) for p in range(PARTITIONS)} == {
        load_model(model_file).fingerprint
    }


def test_a_rebuild_on_several_processes_computes_what_one_process_does(
    redis_url, redis_server, tmp_path, model_file, monkeypatch
):
    """--jobs 2: this process and a spawned one take the partitions, each rebuilt once;
    every memory's state in the snapshots equals a one-process run's. This process waits
    in its first partition until the spawned one has claimed one: the spawned one claims
    partitions as it begins them (from the first up), not when the pool hands them out."""
    r = redis_server.client()
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=78), model_b)
    s = worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS,
                        snapshot_every_entries=40, batch_size=20)  # fmt: skip
    send(r, PREFIX, PARTITIONS, events(1200, NAMES, DIMS, np.random.default_rng(5)))
    Worker(s, Engine(load_model(model_file))).run(burst=True)
    assert any(r.exists(Keys(PREFIX).part(p, "trimmed")) for p in range(PARTITIONS))
    fingerprint = load_model(model_b).fingerprint

    def blobs():
        dirs = [tmp_path / "snap" / model_prefix(p, fingerprint) for p in range(PARTITIONS)]
        found = {p: sorted(members(d / "blobs")) for p, d in enumerate(dirs)}
        for d in dirs:
            shutil.rmtree(d)  # (the next run starts from nothing)
        return found

    here = []
    rebuild_partition = upgrade.rebuild_partition

    def slow_start(settings, model, p, **kw):
        claims, waited = upgrade._claims[0], time.monotonic()
        while not here and not any(claims[:p]) and time.monotonic() - waited < 120:
            time.sleep(0.05)
        here.append(p)
        return rebuild_partition(settings, model, p, **kw)

    monkeypatch.setattr(upgrade, "rebuild_partition", slow_start)
    several = rebuild(s, model_b, jobs=2)
    monkeypatch.undo()
    by_several = blobs()
    assert 0 not in here and sorted(here) == here[::-1], here  # (0: the other's first)
    one = rebuild(s, model_b, jobs=1)
    assert [d["partition"] for d in several] == list(range(PARTITIONS))
    assert [(d["entries"], d["position"]) for d in several] == [
        (d["entries"], d["position"]) for d in one
    ]
    assert sum(d["entries"] for d in one) == 1200
    assert by_several == blobs() and all(by_several.values())


def members(blobs):
    """(name, header, data) of every memory blob in the packs under blobs (a pack is
    memory blobs end to end; their headers' key order is not fixed, so compared parsed)."""
    for path in blobs.iterdir():
        data, at = path.read_bytes(), 0
        while at < len(data):
            n = int.from_bytes(data[at : at + 8], "little")
            header = json.loads(data[at + 8 : at + 8 + n])
            end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
            body = data[at + 8 + n : at + 8 + n + end]
            yield header["__metadata__"]["name"], sorted(header.items()), body
            at += 8 + n + end


# ---- the history a rebuild reads: whole, once, in order, never past the committed offset ----


def _stream_of(r, keys, n):
    for i in range(1, n + 1):
        r.xadd(keys.inp(0), {"msg": f"entry {i}".encode()}, id=f"{i}-0")


def _archive_and_trim(r, keys, archive, point):
    """What a serving worker does (Ownership.trim): archive below point, then trim there."""
    last = archive.last()
    got = r.xrange(keys.inp(0), "-" if last is None else "(" + last, "(" + point)
    archive.append([(text(i), f[b"msg"]) for i, f in got])
    r.xtrim(keys.inp(0), minid=point, approximate=False)  # (exact, as the TRIM script)
    r.set(keys.part(0, "trimmed"), point)


def test_a_rebuild_reads_what_a_serving_worker_archives_and_trims_while_it_reads(
    redis_url, redis_server, tmp_path
):
    from types import SimpleNamespace

    from worker.upgrade import _history

    r, keys = redis_server.client(), Keys(PREFIX)
    archive = Archive(store_at(f"file://{tmp_path / 'store'}"), 0)
    _stream_of(r, keys, 30)
    r.set(keys.part(0, "offset"), "30-0")  # (every entry committed)
    _archive_and_trim(r, keys, archive, "11-0")
    history = _history(r, SimpleNamespace(prefix=PREFIX), 0, None, archive)
    seen = [next(history)[0] for _ in range(10)]  # the archive as it was: 1..10
    _archive_and_trim(r, keys, archive, "21-0")  # meanwhile: 11..20 archived, then trimmed
    seen += [entry_id for entry_id, _ in history]
    assert seen == [f"{i}-0" for i in range(1, 31)]


def test_a_rebuild_stops_at_the_committed_offset(redis_url, redis_server, tmp_path):
    """A deploy's new workers skip what is before their snapshot as applied: the old
    model's workers must have answered it (they may lag behind the input, or be stopped)."""
    from types import SimpleNamespace

    from worker.upgrade import _history

    r, keys = redis_server.client(), Keys(PREFIX)
    archive = Archive(store_at(f"file://{tmp_path / 'store'}"), 0)
    settings = SimpleNamespace(prefix=PREFIX)
    _stream_of(r, keys, 30)
    assert list(_history(r, settings, 0, None, archive)) == []  # nothing committed yet
    r.set(keys.part(0, "offset"), "17-0")
    assert [i for i, _ in _history(r, settings, 0, "4-0", archive)] == [
        f"{i}-0" for i in range(5, 18)
    ]
    r.delete(keys.part(0, "offset"))  # (deleted by hand): a trim point was committed
    r.set(keys.part(0, "trimmed"), "9-0")
    assert [i for i, _ in _history(r, settings, 0, "4-0", archive)][-1] == "9-0"


def test_a_rebuild_refuses_entries_trimmed_unarchived_while_it_reads(
    redis_url, redis_server, tmp_path
):
    from types import SimpleNamespace

    from worker.upgrade import UpgradeError, _history

    r, keys = redis_server.client(), Keys(PREFIX)
    archive = Archive(store_at(f"file://{tmp_path / 'store'}"), 0)
    _stream_of(r, keys, 30_000)  # (three pages)
    r.set(keys.part(0, "offset"), "30000-0")
    history = _history(r, SimpleNamespace(prefix=PREFIX), 0, None, archive)
    assert [next(history)[0] for _ in range(10)][-1] == "10-0"
    r.set(keys.part(0, "unarchived"), "20001-0")  # a worker with MEMNET_ARCHIVE=0 trims
    with pytest.raises(UpgradeError, match="MEMNET_ARCHIVE=0 trimmed its input up to 20001-0"):
        list(history)


def test_a_rebuild_refuses_a_history_with_a_hole_after_its_snapshots(
    redis_url, redis_server, tmp_path
):
    from types import SimpleNamespace

    from worker.upgrade import UpgradeError, _check_history

    r, keys = redis_server.client(), Keys(PREFIX)
    archive = Archive(store_at(f"file://{tmp_path / 'store'}"), 0)
    settings = SimpleNamespace(prefix=PREFIX)
    archive.append([(f"{i}-0", b"x") for i in range(1, 31)])
    _check_history(r, settings, 0, None, archive)  # whole: no error
    archive.store.put(archive.prefix + "PRUNED", b"20-0")  # (what retention records)
    for position in (None, "5-0", "19-0"):
        with pytest.raises(UpgradeError, match="pruned up to 20-0"):
            _check_history(r, settings, 0, position, archive)
    _check_history(r, settings, 0, "20-0", archive)  # (nothing needed was pruned)
    r.set(keys.part(0, "unarchived"), "25-0")
    with pytest.raises(UpgradeError, match="MEMNET_ARCHIVE=0 trimmed its input up to 25-0"):
        _check_history(r, settings, 0, "20-0", archive)
    _check_history(r, settings, 0, "25-0", archive)


def test_a_worker_that_trims_without_archiving_says_so_and_a_rebuild_refuses(
    redis_url, redis_server, tmp_path, model_file
):
    r = redis_server.client()
    s = worker_settings(redis_url, tmp_path, model_file, PREFIX, 1, archive=False,
                        snapshot_every_entries=20)  # fmt: skip
    send(r, PREFIX, 1, events(100, NAMES, DIMS, np.random.default_rng(5)))
    Worker(s, Engine(load_model(model_file))).run(burst=True)
    unarchived = r.get(Keys(PREFIX).part(0, "unarchived"))
    assert unarchived is not None and unarchived == r.get(Keys(PREFIX).part(0, "trimmed"))
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=78), model_b)
    with pytest.raises(Exception, match="MEMNET_ARCHIVE=0 trimmed its input"):
        rebuild(s, model_b, 1)


def test_archived_ids_of_any_width_are_read_in_stream_order(tmp_path):
    """Ids a producer gives (XADD with an id) may be wider than those Redis makes."""
    archive = Archive(store_at(f"file://{tmp_path / 'store'}"), 0)
    archive.append([("99999999999999-0", b"c"), ("99999999999999-10000000000", b"d")])
    archive.append([("5-0", b"a"), ("5-9999999999", b"b")])
    assert archive.last() == "99999999999999-10000000000"
    assert [raw for _, raw in archive.read(None)] == [b"a", b"b", b"c", b"d"]
    assert [raw for _, raw in archive.read("5-9999999999")] == [b"c", b"d"]


def test_a_deploy_while_the_old_model_lags_leaves_every_query_answered_once(
    redis_url, redis_server, tmp_path, model_file
):
    """The old model's workers stopped with a backlog: a deploy must not skip it."""
    r = redis_server.client()
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=79), model_b)
    rng = np.random.default_rng(43)
    served = events(200, NAMES, DIMS, rng)
    backlog = [{**e, "id": "late-" + e["id"]} if "id" in e else e
               for e in events(200, NAMES, DIMS, rng)]  # fmt: skip

    def settings(model):
        return worker_settings(redis_url, tmp_path, model, PREFIX, PARTITIONS,
                               snapshot_every_entries=20)  # fmt: skip

    send(r, PREFIX, PARTITIONS, served)
    Worker(settings(model_file), Engine(load_model(model_file))).run(burst=True)
    send(r, PREFIX, PARTITIONS, backlog)  # no worker of A runs any more
    assert deploy(settings(model_file), model_b, jobs=1)["switched"]
    Worker(settings(model_b), Engine(load_model(model_b))).run(burst=True)
    ids = [m["id"] for _, m in outputs(r, PREFIX, PARTITIONS)]
    by_b = library_answers(Engine(load_model(model_b)), served + backlog)
    queries = {e["id"] for e in served + backlog if e["op"] == "query"}
    assert len(ids) == len(set(ids)) and set(ids) == queries  # every query answered, once
    for _, response in outputs(r, PREFIX, PARTITIONS):
        if response["id"] in {e.get("id") for e in backlog}:
            assert_same_answer(response, by_b[response["id"]])  # B over the whole history


def test_a_deploy_that_cannot_finish_is_called_off_and_the_old_model_serves_on(
    redis_url, redis_server, tmp_path, model_file
):
    """A model whose input does not fit what producers send is refused before anything is
    marked; a deploy whose rebuild fails (a hole in the history) is called off: the
    partitions' deploying marks go back, so the old workers trim again."""
    from dataclasses import replace

    from worker.upgrade import UpgradeError

    r = redis_server.client()
    wider = tmp_path / "wider.safetensors"
    save_model(random_model(replace(WORKER_MODEL, input_dim=WORKER_MODEL.input_dim + 1), 80),
               wider)  # fmt: skip
    s = worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS)
    send(r, PREFIX, PARTITIONS, events(200, NAMES, DIMS, np.random.default_rng(44)))
    Worker(s, Engine(load_model(model_file))).run(burst=True)
    served = load_model(model_file).fingerprint

    def marks():
        return (
            text(r.hget(Keys(PREFIX).meta, "model")),
            text(r.hget(Keys(PREFIX).meta, "deploying")),
            {text(r.get(Keys(PREFIX).part(p, "deploying"))) for p in range(PARTITIONS)},
        )

    before = marks()
    d = WORKER_MODEL.input_dim
    with pytest.raises(UpgradeError, match=f"reads vectors of {d + 1} numbers; this "
                       f"deployment's producers send vectors of {d} numbers"):  # fmt: skip
        deploy(s, wider, jobs=1)
    assert marks() == before
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=81), model_b)
    r.set(Keys(PREFIX).part(0, "unarchived"), "99999999999999-0")  # (a hole: rebuild fails)
    with pytest.raises(UpgradeError, match=r"MEMNET_ARCHIVE=0 trimmed.*called off"):
        deploy(s, model_b, jobs=1)
    assert marks() == (served, served, {served})


def test_a_young_history_trimmed_of_nothing_is_whole(redis_url, redis_server, tmp_path):
    """A worker records a trim point even when its trim removed nothing (a young stream,
    MEMNET_SNAPSHOT_EVERY_S short): with nothing archived that is not a hole. Once entries
    are gone from Redis and not in the archive, it is."""
    from types import SimpleNamespace

    from worker.upgrade import UpgradeError, _check_history

    r, keys = redis_server.client(), Keys(PREFIX)
    archive = Archive(store_at(f"file://{tmp_path / 'store'}"), 0)
    settings = SimpleNamespace(prefix=PREFIX)
    first = r.xadd(keys.inp(0), {"msg": b"x"}).decode()
    r.xadd(keys.inp(0), {"msg": b"y"})
    r.set(keys.part(0, "trimmed"), first)  # (XTRIM MINID first: nothing below it)
    _check_history(r, settings, 0, None, archive)
    r.xtrim(keys.inp(0), maxlen=1, approximate=False)  # (the first entry gone, unarchived)
    with pytest.raises(UpgradeError, match=r"trimmed .up to .* but none archived"):
        _check_history(r, settings, 0, None, archive)
    r.delete(keys.inp(0))  # (no stream at all: cannot tell, so refused)
    with pytest.raises(UpgradeError, match="none archived"):
        _check_history(r, settings, 0, None, archive)


@pytest.mark.parametrize("archive", [True, False])
def test_archive_retention_runs_on_quiet_partitions_and_with_archiving_off(
    redis_url, redis_server, tmp_path, model_file, monkeypatch, archive
):
    """MEMNET_ARCHIVE_DAYS pruned only inside a trim with archiving on: a partition
    without input, or a worker with MEMNET_ARCHIVE=0, kept old segments (a deleted person's
    writes) forever. Partition 0 gets no input here; its segment of 1970 goes."""
    import worker.worker as worker_module

    monkeypatch.setattr(worker_module, "PRUNE_EVERY_S", 0.0)  # (hourly in service)
    s = worker_settings(redis_url, tmp_path, model_file, PREFIX, 2, archive=archive,
                        archive_days=1.0)  # fmt: skip
    old = Archive(store_at(str(tmp_path / "snap")), 0)
    old.append([("1000-0", b"x"), ("2000-0", b"y")])
    assert len(list(old.read(None))) == 2
    Worker(s, Engine(load_model(model_file))).run(burst=True)
    assert list(old.read(None)) == [] and old.pruned() == "2000-0"


def test_an_old_model_worker_that_has_not_seen_the_deploy_cannot_take_a_partition_back(
    redis_url, redis_server, tmp_path, model_file
):
    """Workers learn of a deploy at their next look at PREFIX:meta. One of the old model
    that took a partition in between (its new owner released it) overwrote the switch point
    and answered after the new model had (a review's reproduction). The switch makes the new
    model the only one that may take the partitions, and ACQUIRE records the switch."""
    r, keys = redis_server.client(), Keys(PREFIX)
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=82), model_b)
    a_fp, b_fp = load_model(model_file).fingerprint, load_model(model_b).fingerprint

    def worker(model, worker_id):
        w = Worker(worker_settings(redis_url, tmp_path, model, PREFIX, PARTITIONS,
                                   worker_id=worker_id), Engine(load_model(model)))  # fmt: skip
        w.burst = True
        w._start_up()
        return w

    send(r, PREFIX, PARTITIONS, events(120, NAMES, DIMS, np.random.default_rng(45)))
    stale = worker(model_file, "A-stale")  # it looked at PREFIX:meta before the deploy
    assert stale.owner.active and not stale.parts
    Worker(
        worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS),
        Engine(load_model(model_file)),
    ).run(burst=True)  # fmt: skip (served, released)
    assert deploy(worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS),
                  model_b, jobs=1)["switched"]  # fmt: skip
    b = worker(model_b, "B")
    b.owner.rebalance(b.keeper.members, grace=True)
    switches = {p: r.hgetall(keys.part(p, "switch")) for p in range(PARTITIONS)}
    assert {text(s[b"from"]) + ">" + text(s[b"to"]) for s in switches.values()} == {
        f"{a_fp}>{b_fp}"
    }
    b.shutdown()  # (leases released)
    for p in range(PARTITIONS):
        stale.owner.take(p)
    assert not stale.parts  # refused: model B serves them now
    assert {p: r.hgetall(keys.part(p, "switch")) for p in range(PARTITIONS)} == switches
    assert {text(r.get(keys.part(p, "model"))) for p in range(PARTITIONS)} == {b_fp}
    r.delete(keys.meta)  # and the record lost: its keeper must not write model A back
    stale.keeper.tick()
    assert text(r.hget(keys.meta, "model")) != a_fp and not stale.keeper.meta.active
    r.flushall()  # the serve keys gone too: the store's record (deployment.json) says B
    stale.keeper.meta.active = True  # (as if it had not looked since the deploy)
    stale.keeper.tick()
    assert not r.exists(keys.meta) and not stale.keeper.meta.active
    b = worker(model_b, "B2")  # (writes the record again)
    r.set(keys.part(0, "serve"), b_fp)
    r.hset(keys.meta, "model", a_fp)  # were meta and the serve keys at odds, status says so
    status = gather(worker_settings(redis_url, tmp_path, model_b, PREFIX, PARTITIONS))
    assert f"partition 0: only model {b_fp[:12]} may take it" in "\n".join(problems(status))
    b.shutdown()


def test_one_deploy_at_a_time_and_a_lost_record_does_not_bring_the_old_model_back(
    redis_url, redis_server, tmp_path, model_file
):
    """A second deploy (or a call-off) reset the first's marks while it caught up, so the
    old model trimmed what the new one still needed (its partitions then unservable). And
    after PREFIX:meta was lost, a restarting worker of the old model wrote its own record:
    the deploy silently undone (both: a review's reproductions)."""
    from worker.settings import SettingsError
    from worker.upgrade import DeployLock, UpgradeError

    r, keys = redis_server.client(), Keys(PREFIX)
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=83), model_b)
    s = worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS)
    send(r, PREFIX, PARTITIONS, events(120, NAMES, DIMS, np.random.default_rng(46)))
    Worker(s, Engine(load_model(model_file))).run(burst=True)
    with DeployLock(r, keys.deploy):  # (another deploy running)
        for call in (lambda: deploy(s, model_b, jobs=1), lambda: deploy(s, model_file, jobs=1)):
            with pytest.raises(UpgradeError, match="another memnet deploy or rebuild is running"):
                call()
        with pytest.raises(UpgradeError, match="another memnet deploy or rebuild is running"):
            rebuild(s, model_b, jobs=1)
    assert r.get(keys.deploy) is None  # released
    assert deploy(s, model_b, jobs=1)["switched"] and r.get(keys.deploy) is None
    r.delete(keys.meta)
    with pytest.raises(SettingsError, match=r"missing, and this deployment's partitions are "
                       r"served by model " + load_model(model_b).fingerprint[:12]):  # fmt: skip
        Worker(s, Engine(load_model(model_file)))._start_up()
    assert not r.exists(keys.meta)
    r.flushall()  # and with it the partitions' serve keys: the store's record remains
    with pytest.raises(
        SettingsError, match=r"served by model " + load_model(model_b).fingerprint[:12]
    ):
        Worker(s, Engine(load_model(model_file)))._start_up()
    assert not r.exists(keys.meta)
    sb = worker_settings(redis_url, tmp_path, model_b, PREFIX, PARTITIONS)
    Worker(sb, Engine(load_model(model_b)))._start_up()  # B's worker writes it again
    assert text(r.hget(keys.meta, "model")) == load_model(model_b).fingerprint


def test_a_deploy_stopped_by_sigterm_calls_itself_off(
    redis_url, redis_server, tmp_path, model_file
):
    """SIGTERM (a supervisor, a closed terminal's SIGHUP) ended memnet deploy on the spot:
    its marks stayed, so the old model's workers never trimmed again (a review's
    reproduction). It now stops as Ctrl-C does, calling itself off."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    r, keys = redis_server.client(), Keys(PREFIX)
    s = worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS)
    send(r, PREFIX, PARTITIONS, events(2000, NAMES, DIMS, np.random.default_rng(47)))
    Worker(s, Engine(load_model(model_file))).run(burst=True)
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=84), model_b)
    a_fp, b_fp = load_model(model_file).fingerprint, load_model(model_b).fingerprint
    env = {
        **os.environ, "REDIS_URL": redis_url, "MEMNET_PREFIX": PREFIX,
        "MEMNET_PARTITIONS": str(PARTITIONS), "MEMNET_SNAPSHOT_DIR": str(tmp_path / "snap"),
        "MEMNET_CACHE_DIR": str(tmp_path / "cache"), "MEMNET_MODEL": str(model_file),
    }  # fmt: skip
    deploying = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "deploy", "--model", str(model_b)],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def marks():
        return {text(r.get(keys.part(p, "deploying"))) for p in range(PARTITIONS)}

    deadline = time.monotonic() + 120
    while marks() != {b_fp} and deploying.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    deploying.send_signal(signal.SIGTERM)
    _, err = deploying.communicate(timeout=120)
    assert deploying.returncode == 128 + signal.SIGTERM, err
    assert marks() == {a_fp} and text(r.hget(keys.meta, "model")) == a_fp
    assert r.get(keys.deploy) is None
    nohup = subprocess.Popen(  # a hang-up it was told to ignore (nohup) does not stop it
        ["nohup", sys.executable, "-m", "worker.cli", "deploy", "--model", str(model_b)],
        cwd=Path(__file__).resolve().parents[1], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    while not r.exists(keys.deploy) and nohup.poll() is None and time.monotonic() < deadline + 120:
        time.sleep(0.005)  # (its handlers are set: it holds the lock)
    nohup.send_signal(signal.SIGHUP)
    _, err = nohup.communicate(timeout=120)
    assert nohup.returncode == 0, err
    assert text(r.hget(keys.meta, "model")) == b_fp


def test_a_deploy_that_lost_its_lock_does_not_switch_and_a_stale_record_defers_to_redis(
    redis_url, redis_server, tmp_path, model_file, monkeypatch
):
    """A deploy paused past its lock's expiry (a call-off may have run meanwhile) switched
    anyway, onto partitions nobody could serve; and the store's record of the deployed
    model, left behind by a switch cut short, refused the served model's workers after
    PREFIX:meta was lost (a review's reproductions)."""
    from worker import upgrade
    from worker.ownership import record_deployed
    from worker.upgrade import LockLost

    r, keys = redis_server.client(), Keys(PREFIX)
    model_b = tmp_path / "b.safetensors"
    save_model(random_model(WORKER_MODEL, seed=85), model_b)
    a_fp = load_model(model_file).fingerprint
    s = worker_settings(redis_url, tmp_path, model_file, PREFIX, PARTITIONS)
    send(r, PREFIX, PARTITIONS, events(120, NAMES, DIMS, np.random.default_rng(48)))
    Worker(s, Engine(load_model(model_file))).run(burst=True)
    real = upgrade.rebuild

    def paused(*args, **kwargs):
        done = real(*args, **kwargs)
        r.delete(keys.deploy)  # (expired while the deploy was paused)
        return done

    monkeypatch.setattr(upgrade, "rebuild", paused)
    with pytest.raises(LockLost, match="nothing switched"):
        deploy(s, model_b, jobs=1)
    assert text(r.hget(keys.meta, "model")) == a_fp
    assert {r.get(keys.part(p, "serve")) for p in range(PARTITIONS)} == {None}
    monkeypatch.setattr(upgrade, "rebuild", real)
    deploy(s, model_file, jobs=1)  # the call-off: A's marks, A's serve keys
    record_deployed(s, load_model(model_b).fingerprint)  # a record left behind
    r.delete(keys.meta)
    Worker(s, Engine(load_model(model_file)))._start_up()  # the serve keys say A: accepted
    assert text(r.hget(keys.meta, "model")) == a_fp


def test_the_archives_pruned_mark_only_goes_up(tmp_path):
    """A prune working from an older listing (an old owner's, slowed by retries) must not
    bring PRUNED back below segments another prune deleted: a rebuild would then pass its
    hole check and skip the entries silently."""
    archive = Archive(store_at(f"file://{tmp_path / 'store'}"), 0)
    archive.append([("1000-0", b"a"), ("1001-0", b"b")])  # (ids in ms: long ago)
    archive.store.put(archive.prefix + "PRUNED", b"5000-0")  # (another prune went further)
    assert archive.prune(days=1) == 1
    assert archive.pruned() == "5000-0"
