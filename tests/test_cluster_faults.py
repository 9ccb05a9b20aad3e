"""Faults of a Redis Cluster stay with the partitions they touch: a cluster out of reach at
start-up is waited out, and a slot being migrated or a node down holds back only the
partitions whose slots it holds, never the others (each test has a cluster of its own: it
stops nodes or migrates slots)."""

from __future__ import annotations

import contextlib
import logging
import re
import time

import numpy as np
import pytest

from memnet import Engine, load_model
from tests.conftest import WORKER_MODEL
from tests.streams import (
    Running,
    assert_same_answer,
    events,
    library_answers,
    send,
    stream,
    wait_for,
    worker_settings,
)
from worker.protocol import Keys, partition_of
from worker.servers import RedisCluster, RedisServer
from worker.worker import Worker

# PREFIX:meta and PREFIX:workers hash to slots of the first two nodes; partition 0's slot
# (13907, of {0}) is on the third, alone with none of the other partitions.
PREFIX = "cf"
PARTITIONS = 4
DIMS = (WORKER_MODEL.input_dim, WORKER_MODEL.memory_dim)
MEMORIES = [f"f{i}" for i in range(12)]  # (three in each partition)
KEYS = Keys(PREFIX)

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path):
    """A 3-master cluster of this test's own, every node stopped at the end."""
    c = RedisCluster(tmp_path / "cluster")
    yield c
    c.stop()


@pytest.fixture(scope="module")
def engine(model_file):
    """One engine for the module: its compilations are made once."""
    return Engine(load_model(model_file))


def settings(cluster, tmp_path, model_file, **overrides):
    values = {"batch_size": 10, "lease_ms": 3000, "worker_id": "A", **overrides}
    return worker_settings(cluster.url, tmp_path, model_file, PREFIX, PARTITIONS, **values)


@contextlib.contextmanager
def serving(worker):
    """worker's run() in a thread until the block ends; an error that ended it fails it."""
    running = Running(worker)
    try:
        yield running
    finally:
        running.stop()


def holds_every_partition(worker):
    wait_for(
        lambda: sorted(worker.parts) == list(range(PARTITIONS)),
        60,
        "the worker to take every partition",
    )


def node_of(cluster, slot) -> RedisServer:
    """The node serving slot, as the cluster says (CLUSTER SLOTS)."""
    for start, end, primary, *_ in cluster.nodes[0].client().execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return next(n for n in cluster.nodes if n.port == primary[1])
    raise AssertionError(f"slot {slot} has no node")


def node_id(node) -> str:
    return node.client().execute_command("CLUSTER", "MYID").decode()


def start_migration(cluster, slot):
    """slot IMPORTING on another node, MIGRATING on its own, no key moved yet: the first
    moments of any reshard (redis-cli --cluster reshard does the same)."""
    source = node_of(cluster, slot)
    target = next(n for n in cluster.nodes if n is not source)
    target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
    source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))
    return source, target


def finish_migration(cluster, source, target, slot):
    """Move slot's keys with MIGRATE, then give the slot to target on every node."""
    r = source.client()
    while names := r.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
        for name in names:
            r.execute_command("MIGRATE", target.host, target.port, name, 0, 5000)
    others = [n for n in cluster.nodes if n not in (source, target)]
    for node in (target, source, *others):
        node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(target))


def in_partitions(batch, partitions):
    return [e for e in batch if partition_of(e["memory"], PARTITIONS) in partitions]


def queries(batch, partitions=range(PARTITIONS)):
    return sum(e["op"] == "query" for e in in_partitions(batch, partitions))


def answers(r, partitions=range(PARTITIONS)):
    """The responses in the output streams of partitions (only those: another's node may be
    down)."""
    return [m for p in partitions for _, m in stream(r, KEYS.out(p))]


def assert_all_answered_once(r, batch, engine):
    expected = library_answers(engine, batch)
    out = answers(r)
    assert sorted(m["id"] for m in out) == sorted(expected), "missing or duplicated responses"
    for response in out:
        assert_same_answer(response, expected[response["id"]])


def partition_zeros_node(cluster, r):
    """(partition 0's node, the partitions on other nodes), the cluster set to serve its
    other slots while a node is away; that node is neither REDIS_URL's nor the one of
    PREFIX:meta or PREFIX:workers."""
    for node in cluster.nodes:
        node.client().config_set("cluster-require-full-coverage", "no")
    home = {p: node_of(cluster, r.keyslot(KEYS.inp(p))) for p in range(PARTITIONS)}
    victim = home[0]
    healthy = [p for p in range(PARTITIONS) if home[p] is not victim]
    assert healthy, "every partition on one node: no partition to stay served"
    assert victim is not cluster.nodes[0]  # (REDIS_URL's node stays up)
    assert victim not in {node_of(cluster, r.keyslot(k)) for k in (KEYS.meta, KEYS.workers)}
    return victim, healthy


def dropped(log_text):
    """The partitions the worker dropped (to take again, or rebuild) in log_text."""
    return {int(p) for p in re.findall(r"dropping partition (\d+)", log_text)}


def test_a_worker_starting_while_the_cluster_is_out_of_reach_waits_for_it(
    cluster, tmp_path, model_file, engine, caplog
):
    """Every node of the cluster stops after the worker connected (a network blip, the
    cluster restarted) and before it started up: what redis-py raises then (a topology
    refresh reaching no node) is waited out like an outage, never an error that ends the
    starting worker, and once the nodes are back it serves every query exactly once."""
    r = cluster.client()
    worker = Worker(settings(cluster, tmp_path, model_file), engine)  # connected: it was up
    for node in cluster.nodes:
        node.stop()
    with caplog.at_level(logging.WARNING, logger="worker"), serving(worker) as running:
        wait_for(
            lambda: "Redis unavailable at start-up" in caplog.text or running.error,
            60,
            "the start-up to find the cluster out of reach",
        )
        time.sleep(5)
        assert running.thread.is_alive() and running.error is None, repr(running.error)
        assert not worker.parts
        for node in cluster.nodes:
            node.start()
        cluster.wait_ok()
        holds_every_partition(worker)
        batch = events(200, MEMORIES, DIMS, np.random.default_rng(31))
        send(r, PREFIX, PARTITIONS, batch)
        wait_for(lambda: len(answers(r)) >= queries(batch), 30, "every answer")
    assert_all_answered_once(r, batch, engine)


def test_a_slot_being_migrated_holds_back_only_its_partition(
    cluster, tmp_path, model_file, engine, caplog
):
    """Partition 1's slot goes MIGRATING (no key moved yet): its scripts meet TRYAGAIN
    (their keys split between two nodes) until redis-py gives up (TTL exhausted). That is a
    fault of partition 1 alone: the other partitions are answered meanwhile, and never
    dropped or rebuilt (their epochs stay). Once the migration is done, every query of every
    partition is answered exactly once."""
    r = cluster.client()
    slot = r.keyslot(KEYS.inp(1))
    others = [0, 2, 3]
    assert slot not in {r.keyslot(KEYS.inp(p)) for p in others}
    batch = events(300, MEMORIES, DIMS, np.random.default_rng(32))
    first, during = batch[:100], batch[100:]
    assert all(queries(during, [p]) for p in range(PARTITIONS))
    worker = Worker(settings(cluster, tmp_path, model_file), engine)
    with caplog.at_level(logging.INFO, logger="worker"), serving(worker):
        holds_every_partition(worker)
        send(r, PREFIX, PARTITIONS, first)  # (partition 1's keys exist: its slot has keys)
        wait_for(lambda: len(answers(r)) >= queries(first), 30, "the first answers")
        epochs = {p: part.epoch for p, part in worker.parts.items()}
        source, target = start_migration(cluster, slot)
        send(r, PREFIX, PARTITIONS, during)
        wait_for(
            lambda: len(answers(r, others)) >= queries(batch, others),
            15,
            "the answers of the partitions not being migrated",
        )
        still = {p: getattr(worker.parts.get(p), "epoch", None) for p in others}
        assert still == {p: epochs[p] for p in others}  # never dropped nor taken again
        assert dropped(caplog.text) <= {1}, caplog.text
        finish_migration(cluster, source, target, slot)
        assert node_of(cluster, slot) is target
        wait_for(lambda: len(answers(r)) >= queries(batch), 60, "every answer")
        still = {p: getattr(worker.parts.get(p), "epoch", None) for p in others}
        assert still == {p: epochs[p] for p in others}
    assert dropped(caplog.text) <= {1}, caplog.text
    assert_all_answered_once(r, batch, engine)


def test_a_node_down_leaves_the_partitions_of_the_other_nodes_served(
    cluster, tmp_path, model_file, engine, caplog
):
    """The node of partition 0's slot goes down (no replica; the cluster does not require
    full coverage, so the other nodes serve their slots on). Partition 0's faults stay with
    it: the partitions on the other nodes are answered meanwhile, never dropped. Once the
    node is back (restarted with its data), every query -- partition 0's too, sent before
    it went down and after it came back -- is answered exactly once."""
    r = cluster.client()
    victim, healthy = partition_zeros_node(cluster, r)
    victim.client().config_set("save", "3600 1")  # stopped, it saves: a restart keeps data
    batch = events(360, MEMORIES, DIMS, np.random.default_rng(33))
    first, rest = batch[:120], batch[120:]
    down = in_partitions(rest, healthy)  # sent while the node is down
    after = in_partitions(rest, [p for p in range(PARTITIONS) if p not in healthy])
    assert queries(down) and queries(after) and queries(first, [0])
    worker = Worker(settings(cluster, tmp_path, model_file), engine)
    with caplog.at_level(logging.INFO, logger="worker"), serving(worker):
        holds_every_partition(worker)
        send(r, PREFIX, PARTITIONS, first)
        wait_for(lambda: len(answers(r)) >= queries(first), 30, "the first answers")
        epochs = {p: worker.parts[p].epoch for p in healthy}
        victim.stop()
        send(r, PREFIX, PARTITIONS, down)
        wait_for(
            lambda: len(answers(r, healthy)) >= queries(first + down, healthy),
            15,
            "the answers of the partitions on the nodes still up",
        )
        assert {p: getattr(worker.parts.get(p), "epoch", None) for p in healthy} == epochs
        assert not dropped(caplog.text) & set(healthy), caplog.text
        victim.start()
        cluster.wait_ok()
        send(r, PREFIX, PARTITIONS, after)
        wait_for(lambda: len(answers(r)) >= queries(batch), 60, "every answer")
    assert_all_answered_once(r, first + down + after, engine)


@pytest.mark.parametrize("script", ["read", "commit"])
def test_a_reply_lost_after_its_script_ran_is_answered_once(
    cluster, tmp_path, model_file, engine, script
):
    """Partition 0's read (or commit) runs on its node, and its reply is lost twice (a
    timeout): the read's entries were delivered to the group and never reached the
    worker, so its replay must be planned again before it reads on; the commit's batch is
    held and sent again (idempotent). Every query is answered exactly once."""
    import redis

    r = cluster.client()
    worker = Worker(settings(cluster, tmp_path, model_file, lease_ms=5000), engine)
    worker.burst = True
    worker._start_up()
    worker.owner.rebalance(worker.keeper.members, grace=True)
    assert sorted(worker.parts) == list(range(PARTITIONS))
    batch = events(200, MEMORIES, DIMS, np.random.default_rng(34))
    send(r, PREFIX, PARTITIONS, batch)
    sha = getattr(worker.scripts, script).sha
    real, lost = worker.client.evalsha, [2]

    def evalsha(called, n, *rest):
        reply = real(called, n, *rest)
        if called == sha and rest[0] == KEYS.part(0, "epoch") and lost[0]:
            lost[0] -= 1
            raise redis.TimeoutError("the reply was lost (the script ran)")
        return reply

    worker.client.evalsha = evalsha
    deadline = time.monotonic() + 30
    while len(answers(r)) < queries(batch) and time.monotonic() < deadline:
        worker.step()
        time.sleep(0.01)
    assert lost == [0] and not worker.owner.unreachable
    assert sorted(worker.parts) == list(range(PARTITIONS))  # none dropped or rebuilt
    assert_all_answered_once(r, batch, engine)
    worker.shutdown()


def test_a_node_that_stops_answering_holds_back_only_its_partitions(
    cluster, tmp_path, model_file, engine
):
    """A node frozen or cut off accepts connections and never answers: each call to it
    waits out the client's timeout. The keeper's calls time out within a lease, so the
    other partitions' leases never lapse; a retry of the partition out of reach first
    pings its node briefly, and the free leases are asked with the keeper's timeouts, once
    a node, so the others are served without stalls of the full timeout.
    Once the node answers again, every query is answered exactly once."""
    import os
    import signal

    r = cluster.client()
    victim, healthy = partition_zeros_node(cluster, r)
    batch = events(240, MEMORIES, DIMS, np.random.default_rng(35))
    first, rest = batch[:80], batch[80:]
    worker = Worker(settings(cluster, tmp_path, model_file, lease_ms=3000), engine)
    with serving(worker):
        holds_every_partition(worker)
        send(r, PREFIX, PARTITIONS, first)
        wait_for(lambda: len(answers(r)) >= queries(first), 30, "the first answers")
        epochs = {p: worker.parts[p].epoch for p in healthy}
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            lapsed, waits, began = set(), [], time.monotonic()
            for at in range(0, len(rest), 20):
                chunk = in_partitions(rest[at : at + 20], healthy)
                send(r, PREFIX, PARTITIONS, chunk)
                sent = time.monotonic()
                wanted = queries(first + rest[: at + 20], healthy)
                wait_for(lambda n=wanted: len(answers(r, healthy)) >= n, 15, "healthy answers")
                waits.append(time.monotonic() - sent)
                lapsed |= {p for p in healthy if not r.exists(KEYS.part(p, "lease"))}
            assert time.monotonic() - began > 3  # (long enough for the keeper to go round)
            assert not lapsed, lapsed
            asked = time.monotonic()  # (a rebalance below its share asks every lease)
            assert 0 not in worker.owner.free_partitions()
            assert time.monotonic() - asked < 2.5  # (the keeper's timeouts, once a node)
            assert sorted(waits)[len(waits) // 2] < 2.0, waits  # (not the 5 s timeout)
            assert {p: getattr(worker.parts.get(p), "epoch", None) for p in healthy} == epochs
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
        send(r, PREFIX, PARTITIONS, in_partitions(rest, [0]))
        wait_for(lambda: len(answers(r)) >= queries(batch), 60, "every answer")
    assert_all_answered_once(r, batch, engine)
