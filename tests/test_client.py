"""worker.client and ``memnet produce`` against a real redis-server (and a worker in a thread)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading

import msgpack
import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memnet import Engine, load_model
from tests.conftest import WORKER_MODEL
from tests.streams import (
    Running,
    assert_same_answer,
    library_answers,
    wait_for,
    worker_settings,
)
from tests.test_worker import overflowing_x
from worker.client import (
    AsyncMemnetClient,
    ClientError,
    InvalidEvent,
    MemnetClient,
    MemnetError,
    NoDeployment,
    QueryTimeout,
    delete_event,
    query_event,
)
from worker.produce import BadFile, BadLine, produce_file
from worker.protocol import Keys, decode, deleted_message, error_message, partition_of
from worker.worker import Worker

SERVED = "cl-served"  # the prefix the module's worker serves
PARTITIONS = 2
D_IN, D_MEM = WORKER_MODEL.input_dim, WORKER_MODEL.memory_dim
VECTOR_META = {
    "partitions": str(PARTITIONS),
    "protocol": "1",
    "model": "not-served",
    "input_dim": str(D_IN),
    "memory_dim": str(D_MEM),
    "output_dim": str(WORKER_MODEL.output_dim),
    "components": "mlp,gated-nearest,topk-attention,mlp",
}
TEXT_META = {**VECTOR_META, "components": "position-bow,append-only,multi-hop,answer-mlp"}


# ---- fixtures -----------------------------------------------------------------------------
def serving(worker: Worker) -> Running:
    """A worker's loop in a thread, serving SERVED until stopped."""
    running = Running(worker)
    wait_for(lambda: len(worker.parts) == PARTITIONS, 60, "the worker to take over")
    return running


@pytest.fixture(scope="module")
def served(redis_server, tmp_path_factory, model_file):
    """A worker serving SERVED for the whole module; yields the Redis URL."""
    url = redis_server.url
    tmp = tmp_path_factory.mktemp("client")
    s = worker_settings(url, tmp, model_file, SERVED, PARTITIONS)
    running = serving(Worker(s, Engine(load_model(model_file))))
    yield url
    running.stop()


@pytest.fixture
def deployment(redis_server):
    """A deployment record with no worker behind it, under a prefix of the test's own."""
    r = redis_server.client()
    prefixes = []

    def make(prefix: str, meta: dict[str, str] = VECTOR_META) -> redis.Redis:
        prefixes.append(prefix)
        r.hset(Keys(prefix).meta, mapping=meta)
        return r

    yield make
    for prefix in prefixes:
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)


def lengths(r: redis.Redis, prefix: str) -> list[int]:
    return [r.xlen(Keys(prefix).inp(p)) for p in range(PARTITIONS)]


def connected(r: redis.Redis, name: str) -> bool:
    return any(c["name"] == name for c in r.client_list())


# ---- the blocking client against a worker ------------------------------------------------
def test_query_returns_the_library_answer(served, model_file):
    rng = np.random.default_rng(3)
    batch, responses = [], []
    with MemnetClient(served, SERVED) as client:
        for j in range(12):
            memory = f"lib-{j % 3}"
            if j % 3 != 2:
                x = rng.standard_normal(D_IN).astype("<f4")
                client.write(memory, x if j % 2 else x.tolist())
                batch.append({"op": "write", "memory": memory, "x": x.tobytes()})
                continue
            field, dim = ("x", D_IN) if j % 2 else ("q", D_MEM)
            value = rng.standard_normal(dim).astype(np.float32).tolist()
            response = client.query(memory, **{field: value}, timeout_s=20)
            batch.append({"op": "query", "memory": memory, "id": response["id"], field: value})
            responses.append(response)
    expected = library_answers(Engine(load_model(model_file)), batch)
    assert len(responses) == 4
    for response in responses:
        assert_same_answer(response, expected[response["id"]])


def test_an_error_response_raises_memnet_error(served, model_file):
    x = overflowing_x(model_file)
    with MemnetClient(served, SERVED) as client, pytest.raises(MemnetError) as caught:
        client.query("err-1", x=x, timeout_s=20)
    e = caught.value
    assert isinstance(e, ClientError)
    assert e.response["memory"] == "err-1" and e.response["error"] == e.error
    assert e.error in str(e)


def test_wait_on_a_known_entry_id_and_its_timeout(served):
    with MemnetClient(served, SERVED) as client:
        event = query_event("wait-1", x=[0.5] * D_IN)
        entry_id = client.send(event)
        response = client.wait(client.partition("wait-1"), entry_id, timeout_s=20)
        assert response["id"] == event["id"] and len(response["y"]) == WORKER_MODEL.output_dim
        with pytest.raises(TimeoutError, match="no response to 1-0"):
            client.wait(0, "1-0", timeout_s=0.3)


def test_tail_yields_responses_written_after_it_started(served):
    with MemnetClient(served, SERVED) as client:
        before = client.query("tail-1", x=[0.1] * D_IN, timeout_s=20)
        responses = client.tail(block_ms=50)  # "now" is pinned here, before the next query
        after = client.query("tail-1", x=[0.2] * D_IN, timeout_s=20)
        partition, entry_id, response = next(responses)
    assert response == after and response["id"] != before["id"]
    assert partition == client.partition("tail-1") and entry_id.count("-") == 1


def test_the_async_client_writes_queries_and_tails(served, model_file):
    x = np.random.default_rng(4).standard_normal((2, D_IN)).astype("<f4")

    async def run():
        async with AsyncMemnetClient(served, SERVED) as client:
            await client.write("async-1", x[0])
            response = await client.query("async-1", x=x[1].tolist(), timeout_s=20)
            with pytest.raises(MemnetError):
                await client.query("async-1", x=overflowing_x(model_file), timeout_s=20)
            async for _p, _entry, seen in client.tail(start="0-0", block_ms=50):
                if seen["id"] == response["id"]:
                    break
        return response, seen

    response, seen = asyncio.run(run())
    batch = [
        {"op": "write", "memory": "async-1", "x": x[0].tobytes()},
        {"op": "query", "memory": "async-1", "id": response["id"], "x": x[1].tolist()},
    ]
    assert_same_answer(
        response, library_answers(Engine(load_model(model_file)), batch)[response["id"]]
    )
    assert seen == response


# ---- the clients without a worker ---------------------------------------------------------
def test_from_env_reads_redis_url_and_memnet_prefix(redis_server, deployment, monkeypatch):
    deployment("cl-env")
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("MEMNET_PREFIX", "cl-env")
    for client in (MemnetClient.from_env(), MemnetClient()):
        with client:
            assert client.keys.prefix == "cl-env" and client.partitions == PARTITIONS

    async def run():
        async with AsyncMemnetClient.from_env() as client:
            return client.keys.prefix, (await client.deployment()).input_dim

    assert asyncio.run(run()) == ("cl-env", D_IN)
    monkeypatch.setenv("MEMNET_PREFIX", "cl-nothing")
    with MemnetClient.from_env() as client, pytest.raises(NoDeployment, match="cl-nothing:meta"):
        client.write("m", [1.0] * D_IN)
    monkeypatch.setenv("MEMNET_BATCH_SIZE", "0")  # (a worker's setting: not the client's)
    with MemnetClient.from_env() as client, MemnetClient() as other:
        assert client.keys.prefix == other.keys.prefix == "cl-nothing"


def test_the_context_managers_close_what_they_opened(redis_server, deployment):
    admin = redis_server.client()
    with MemnetClient(redis_server.url, "cl-close") as client:
        client.redis.client_setname("cl-close-sync")
        assert connected(admin, "cl-close-sync")
    wait_for(lambda: not connected(admin, "cl-close-sync"), 5, "the connection to close")
    with pytest.raises(ValueError, match=r"retries failed commands .* added twice"):
        MemnetClient(redis.Redis.from_url(redis_server.url, retry=Retry(NoBackoff(), 3)), "x")
    with pytest.raises(ValueError, match="retries failed commands"):
        MemnetClient(redis.Redis(), "x")  # (redis-py's default: 10 retries)
    for made in ({"retry_on_timeout": True}, {"retry_on_error": [redis.ConnectionError]}):
        with pytest.raises(ValueError, match="retries failed commands"):  # (1 a connection)
            MemnetClient(redis.Redis.from_url(redis_server.url, **made), "x")
    mine = redis.Redis.from_url(redis_server.url, retry=Retry(NoBackoff(), 0))
    mine.client_setname("cl-close-mine")
    with MemnetClient(mine, "cl-close"):
        pass
    assert connected(admin, "cl-close-mine")  # a passed-in client stays open
    mine.close()

    async def run():
        async with AsyncMemnetClient(redis_server.url, "cl-close") as client:
            await client.redis.client_setname("cl-close-async")
            assert connected(admin, "cl-close-async")

    asyncio.run(run())
    wait_for(lambda: not connected(admin, "cl-close-async"), 5, "the connection to close")


def test_a_bad_event_raises_before_anything_is_sent(redis_server, deployment):
    r = deployment("cl-check")
    with MemnetClient(redis_server.url, "cl-check") as client:
        bad = [
            (lambda: client.write("m", [1.0] * (D_IN - 1)), f"'x' must have {D_IN} numbers.*got 7"),
            (lambda: client.query("m", q=np.ones(D_MEM + 1)), f"'q' must have {D_MEM}.*got 9"),
            (lambda: client.write("m", [1.0] * (D_IN - 1) + [float("nan")]), "non-finite"),
            (lambda: client.write("m", [1e39] * D_IN), "non-finite"),
            (lambda: client.write("m", [True] * D_IN), "numbers"),
            (lambda: client.write("m", text_input="where is mary"), "reads vectors"),
            (lambda: client.write("", [1.0] * D_IN), "'memory' must be a non-empty"),
            (lambda: client.write("a\x00b", [1.0] * D_IN), "cannot contain the character U"),
            (lambda: client.query("m", x=[1.0] * D_IN, q=[1.0] * D_MEM), "exactly one"),
            (lambda: client.write("m"), "exactly one"),
            (lambda: client.write("m", [10**400] + [1.0] * (D_IN - 1)), "non-finite"),
            (lambda: client.write("m\udc80", [1.0] * D_IN), "'memory' is not valid Unicode"),
            (
                lambda: client.send({"op": "query", "memory": "m", "id": "\ud800", "x": [1.0] * 8}),
                "'id' is not valid Unicode",
            ),
            (lambda: client.delete("m", id="\ud800"), "'id' is not valid Unicode"),
            (
                lambda: client.send({"op": "write", "memory": "m", "x": [1.0] * 8, "n": "\udc00"}),
                "'n' is not valid Unicode",
            ),
        ]
        for call, message in bad:
            with pytest.raises(InvalidEvent, match=message):
                call()
        assert lengths(r, "cl-check") == [0, 0]
        with pytest.raises(ValueError):  # InvalidEvent is a ValueError
            client.write("m", np.ones(3))
        client.write("m", np.ones(D_IN))
        assert sum(lengths(r, "cl-check")) == 1


def test_text_models_refuse_vectors_and_old_records_skip_the_checks(redis_server, deployment):
    r = deployment("cl-text", TEXT_META)
    with MemnetClient(redis_server.url, "cl-text") as client:
        with pytest.raises(InvalidEvent, match="reads text"):
            client.write("m", [1.0] * D_IN)
        with pytest.raises(InvalidEvent, match="9 words; this model reads at most 8"):
            client.write("m", text_input="one two three four five six seven eight nine")
        with pytest.raises(InvalidEvent, match="no words"):
            client.write("m", text_input="?!")
        client.write("m", text_input="Mary went to the kitchen.")
        client.send(query_event("m", q=[0.5] * D_MEM))
    assert sum(lengths(r, "cl-text")) == 2
    r = deployment("cl-old", {"partitions": str(PARTITIONS), "protocol": "1"})
    with MemnetClient(redis_server.url, "cl-old") as client:
        client.write("m", [1.0, 2.0])  # no dims recorded: the worker judges
        with pytest.raises(InvalidEvent, match="non-finite"):
            client.write("m", [float("inf")])
    assert sum(lengths(r, "cl-old")) == 1


def test_the_async_client_checks_events_and_times_out(redis_server, deployment):
    r = deployment("cl-async")

    async def run():
        async with AsyncMemnetClient(redis_server.url, "cl-async") as client:
            with pytest.raises(InvalidEvent, match="got 7"):
                await client.write("m", [1.0] * (D_IN - 1))
            assert lengths(r, "cl-async") == [0, 0]
            with pytest.raises(QueryTimeout) as caught:
                await client.query("m", x=[1.0] * D_IN, timeout_s=0.3)
            return caught.value

    error = asyncio.run(run())
    assert isinstance(error, TimeoutError) and isinstance(error, ClientError)
    assert sum(lengths(r, "cl-async")) == 1


# ---- deletes (a stand-in answers them: the worker's side is tested with the worker) --------
def sent(r: redis.Redis, prefix: str) -> list[tuple[int, str, bytes]]:
    """(partition, entry id, msg) of every input entry under prefix."""
    keys = Keys(prefix)
    return [
        (p, entry_id.decode(), fields[b"msg"])
        for p in range(PARTITIONS)
        for entry_id, fields in r.xrange(keys.inp(p))
    ]


def answer_one(r: redis.Redis, prefix: str, memory: str, reply=deleted_message) -> None:
    """Stand in for a worker: answer the first event of memory with an id at its entry id,
    as a worker answers a delete with an id."""
    keys, p = Keys(prefix), partition_of(memory, PARTITIONS)
    after = "0-0"
    while entries := r.xread({keys.inp(p): after}, count=100, block=10_000):
        for entry_id, fields in entries[0][1]:
            after, message = entry_id, msgpack.unpackb(fields[b"msg"], raw=False)
            if message["memory"] == memory and "id" in message:
                r.xadd(keys.out(p), {"msg": reply(message["id"], memory)}, id=entry_id)
                return
    raise AssertionError(f"no event of {memory} with an id arrived")


def test_delete_sends_one_entry_to_the_memory_s_partition(redis_server, deployment):
    r = deployment("cl-delete")
    with MemnetClient(redis_server.url, "cl-delete") as client:
        plain = client.delete("alice")
        with_id = client.delete("bob", id="d-bob")
        made = client.send(delete_event("carol", "d-carol"))
    entries = sent(r, "cl-delete")
    assert len(entries) == 3
    messages = {}  # (partition, entry id): the decoded entry (ids repeat across streams)
    for p, entry_id, raw in entries:
        message = decode(raw, p, PARTITIONS, 1 << 20)  # it is in its memory's partition
        assert message.op == "delete"
        messages[p, entry_id] = (message.memory, message.query_id)
    assert messages[partition_of("alice", PARTITIONS), plain] == ("alice", None)
    assert messages[partition_of("bob", PARTITIONS), with_id] == ("bob", "d-bob")
    assert messages[partition_of("carol", PARTITIONS), made] == ("carol", "d-carol")
    assert delete_event("m") == {"op": "delete", "memory": "m"}  # no id: no "id" key at all


def test_a_bad_delete_raises_before_anything_is_sent(redis_server, deployment):
    r = deployment("cl-delete-bad")
    with MemnetClient(redis_server.url, "cl-delete-bad") as client:
        bad = [
            (lambda: client.delete(""), "'memory' must be a non-empty"),
            (lambda: client.delete("m", id=""), "'id', when given, must be a non-empty"),
            (lambda: client.send({**delete_event("m"), "x": [1.0] * D_IN}), "carries no 'x'"),
            (lambda: client.send({**delete_event("m"), "text": "mary"}), "carries no 'text'"),
            (lambda: client.send({**delete_event("m"), "id": 7}), "'id', when given"),
            (lambda: client.send({"op": "erase", "memory": "m"}), "or 'delete'"),
        ]
        for call, message in bad:
            with pytest.raises(InvalidEvent, match=message):
                call()
    assert lengths(r, "cl-delete-bad") == [0, 0]


def test_delete_waits_for_the_deleted_response(redis_server, deployment):
    r = deployment("cl-delete-wait")
    responder = threading.Thread(target=answer_one, args=(r, "cl-delete-wait", "alice"))
    responder.start()
    with MemnetClient(redis_server.url, "cl-delete-wait") as client:
        entry_id = client.delete("alice", wait=True, timeout_s=20)
        responder.join(10)
        response = client.wait(client.partition("alice"), entry_id)
        with pytest.raises(QueryTimeout, match="no response to"):
            client.delete("bob", wait=True, timeout_s=0.3)
    alice = partition_of("alice", PARTITIONS)
    [raw] = [m for p, e, m in sent(r, "cl-delete-wait") if (p, e) == (alice, entry_id)]
    made_up = msgpack.unpackb(raw, raw=False)["id"]  # wait without an id makes one up
    assert response == {"id": made_up, "memory": "alice", "deleted": True}
    assert sum(lengths(r, "cl-delete-wait")) == 2  # the timed-out delete was sent


def test_the_async_client_deletes_and_waits(redis_server, deployment):
    r = deployment("cl-delete-async")

    def refuse(query_id: str, memory: str) -> bytes:
        return error_message(query_id, memory, "refused")

    async def run():
        async with AsyncMemnetClient(redis_server.url, "cl-delete-async") as client:
            plain = await client.delete("alice")
            responding = asyncio.to_thread(answer_one, r, "cl-delete-async", "bob")
            waited, _ = await asyncio.gather(
                client.delete("bob", id="d-bob", wait=True), responding
            )
            refusing = asyncio.to_thread(answer_one, r, "cl-delete-async", "carol", refuse)
            with pytest.raises(MemnetError, match="refused"):
                await asyncio.gather(client.delete("carol", wait=True, timeout_s=20), refusing)
        return plain, waited

    plain, waited = asyncio.run(run())
    messages = {(p, e): msgpack.unpackb(m, raw=False) for p, e, m in sent(r, "cl-delete-async")}
    alice, bob = partition_of("alice", PARTITIONS), partition_of("bob", PARTITIONS)
    assert messages[alice, plain] == {"op": "delete", "memory": "alice"}
    assert messages[bob, waited] == {"op": "delete", "memory": "bob", "id": "d-bob"}


def test_importing_the_client_imports_neither_jax_nor_memnet():
    code = "import sys, worker.client; print('jax' in sys.modules, 'memnet' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


# ---- produce ------------------------------------------------------------------------------
def write_lines(path, events):
    path.write_text("".join(e if isinstance(e, str) else json.dumps(e) + "\n" for e in events))
    return path


def good(j: int) -> dict:
    return {"op": "write", "memory": f"m{j}", "x": [float(j)] * D_IN}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("not json\n", "not JSON"),
        ("[1, 2]\n", "JSON object"),
        (json.dumps({"op": "write", "x": [1.0] * D_IN}) + "\n", "'memory'"),
        (json.dumps({"op": "erase", "memory": "m"}) + "\n", "unknown op 'erase'"),
        (
            json.dumps({**good(0), "x": [1.0] * (D_IN + 1)}) + "\n",
            r"must have 8 numbers \(the model's input_dim\), got 9",
        ),
        (json.dumps({"op": "query", "memory": "m", "x": [1.0] * D_IN}) + "\n", "'id'"),
        (json.dumps({**good(3), "tag": 2**64}) + "\n", "cannot be sent as msgpack"),
        ('{"op": "write", "n": 1' + "0" * 5000 + "}\n", "not JSON"),
        ("[" * 100_000 + "]" * 100_000 + "\n", "not JSON"),
    ],
    ids=[
        "not-json",
        "not-object",
        "no-memory",
        "bad-op",
        "wrong-length",
        "query-without-id",
        "int-beyond-msgpack",
        "5000-digits",
        "deep",
    ],
)
def test_produce_sends_nothing_from_a_file_with_a_bad_line(
    redis_server, deployment, tmp_path, bad, reason
):
    r = deployment("cl-produce")
    path = write_lines(tmp_path / "events.jsonl", [good(1), "\n", good(2), bad, good(4)])
    client = MemnetClient(redis_server.url, "cl-produce")
    with client, pytest.raises(BadLine, match=f"line 4: .*{reason}") as caught:
        produce_file(client, path)
    assert caught.value.line == 4 and isinstance(caught.value, ValueError)
    assert lengths(r, "cl-produce") == [0, 0]


def test_produce_names_a_line_that_is_not_utf8_and_refuses_a_pipe(
    redis_server, deployment, tmp_path
):
    r = deployment("cl-bytes")
    path = write_lines(tmp_path / "events.jsonl", [good(1), good(2)])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes() + b'{"op": "caf\xe9"}\n')  # BOM
    with MemnetClient(redis_server.url, "cl-bytes") as client:
        with pytest.raises(BadLine, match="line 3: not UTF-8"):
            produce_file(client, path)
        with pytest.raises(BadFile, match="not a regular file"):
            produce_file(client, "/dev/stdin")
        path.write_bytes(path.read_bytes().rsplit(b"\n", 2)[0] + b"\n")
        assert produce_file(client, path) == 2  # (the byte-order mark is not part of line 1)
    assert sum(lengths(r, "cl-bytes")) == 2


def test_produce_skips_what_was_sent_and_names_a_missing_file(redis_server, deployment, tmp_path):
    r = deployment("cl-skip")
    path = write_lines(tmp_path / "events.jsonl", [good(0), "\n", good(1), good(2), good(3)])
    with MemnetClient(redis_server.url, "cl-skip") as client:
        assert produce_file(client, path, skip=2) == 2
        sent = [f for p in range(PARTITIONS) for _id, f in r.xrange(Keys("cl-skip").inp(p))]
        assert produce_file(client, path) == 4
        with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
            produce_file(client, tmp_path / "missing.jsonl")
    assert len(sent) == 2 and sum(lengths(r, "cl-skip")) == 6
    names = sorted(msgpack.unpackb(f[b"msg"])["memory"] for f in sent)
    assert names == ["m2", "m3"]


def test_a_tail_of_a_partition_the_deployment_lacks_is_refused(redis_server, deployment):
    """(It read a stream no worker writes and waited forever, silently.)"""
    deployment("cl-tail")
    with MemnetClient(redis_server.url, "cl-tail") as client:
        total = client.partitions
        with pytest.raises(InvalidEvent, match=f"no partition {total} .there are {total}"):
            client.tail([total])

    async def run():
        async with AsyncMemnetClient(redis_server.url, "cl-tail") as client:
            with pytest.raises(InvalidEvent, match="no partition -1"):
                await anext(client.tail([-1]))

    asyncio.run(run())


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_produce_never_sends_an_event_twice_after_a_lost_reply(tmp_path, monkeypatch, kind):
    """A reply lost after Redis ran the XADDs (a timeout): produce stops with the error and
    its note, and no event is added twice. A cluster's pipeline sent every command of the
    node again on its own, whatever the client's retry policy: each event twice, reported
    as sent once."""
    import redis.connection

    from worker.servers import RedisCluster, RedisServer

    server = RedisServer(tmp_path / "r") if kind == "standalone" else RedisCluster(tmp_path / "c")
    try:
        r = server.client()
        r.hset(Keys("cl-lost").meta, mapping=VECTOR_META)
        path = write_lines(tmp_path / "events.jsonl", [good(j) for j in range(20)])
        client = MemnetClient(server.url, "cl-lost")
        assert client.deployment.partitions == PARTITIONS  # (read before the fault)
        send, read, lose = (
            redis.connection.Connection.send_packed_command,
            redis.connection.Connection.read_response,
            [],
        )

        def sending(self, command, *args, **kwargs):
            data = b"".join(command) if isinstance(command, list) else command
            if b"XADD" in data and not lose:
                lose.append(self)  # (this connection's next reply is lost)
            return send(self, command, *args, **kwargs)

        def reading(self, *args, **kwargs):
            if lose and lose[0] is self:
                lose[0] = None
                self.disconnect()
                raise redis.exceptions.TimeoutError("Timeout reading from socket (lost)")
            return read(self, *args, **kwargs)

        monkeypatch.setattr(redis.connection.Connection, "send_packed_command", sending)
        monkeypatch.setattr(redis.connection.Connection, "read_response", reading)
        with pytest.raises(redis.exceptions.TimeoutError) as caught:
            produce_file(client, path)
        monkeypatch.undo()
        landed = sum(lengths(r, "cl-lost"))
        assert 0 < landed <= 20  # each at most once
        assert "resume with skip" in caught.value.__notes__[0]
    finally:
        server.stop()


def test_a_response_trimmed_before_it_was_read_is_told_apart_from_a_timeout(
    redis_server, deployment
):
    """Out streams keep MEMNET_RESPONSE_MAXLEN responses: one trimmed before the client
    read it raises ResponseTrimmed at once (a QueryTimeout, so handlers of that still
    catch it), not a timeout saying no worker runs; one not yet published times out."""
    from worker.client import QueryTimeout, ResponseTrimmed

    r = deployment("cl-trim")
    out = Keys("cl-trim").out(0)
    for j in range(1, 201):
        r.xadd(out, {"msg": msgpack.packb({"id": f"q{j}", "y": [0.0]})}, id=f"{j}-0")
    r.xtrim(out, maxlen=10, approximate=False)

    async def waited(entry_id):
        async with AsyncMemnetClient(redis_server.url, "cl-trim") as client:
            return await client.wait(0, entry_id, timeout_s=3)

    with MemnetClient(redis_server.url, "cl-trim") as client:
        assert client.wait(0, "195-0", timeout_s=0)["id"] == "q195"  # (0: one read, a poll)
        with pytest.raises(
            ResponseTrimmed, match=r"no response to 5-0 .* goes on from 191-0: it was trimmed"
        ):
            client.wait(0, "5-0", timeout_s=30)
        with pytest.raises(QueryTimeout) as caught:
            client.wait(0, "300-0", timeout_s=1.5)
        assert not isinstance(caught.value, ResponseTrimmed)
    with pytest.raises(ResponseTrimmed):
        asyncio.run(waited("190-0"))


def test_an_event_of_more_keys_than_a_worker_decodes_is_refused_before_it_is_sent(
    redis_server, deployment
):
    """A worker's decoding refuses a map of more than 64 keys, at any depth, and a key
    that is not a string: the client refuses them before sending, as every other check."""
    r = deployment("cl-keys")
    event = {"op": "write", "memory": "m", "x": [1.0] * D_IN}
    event.update({f"k{j}": j for j in range(64 - len(event))})
    with MemnetClient(redis_server.url, "cl-keys") as client:
        client.send(event)  # 64 keys: the most a worker decodes
        with pytest.raises(InvalidEvent, match="the event has 65 keys: a map holds at most 64"):
            client.send({**event, "one more": 1})
        nested = {"op": "write", "memory": "m", "x": [1.0] * D_IN}
        with pytest.raises(InvalidEvent, match="'tags' has 65 keys"):
            client.send({**nested, "tags": {f"t{j}": j for j in range(65)}})  # (any map)
        with pytest.raises(InvalidEvent, match="a key that is not a string: 7"):
            client.send({**nested, "tags": [{7: "seven"}]})
        client.send({**nested, b"trace": {b"span": 1}})  # (bin keys: decoded by workers)
    assert sum(lengths(r, "cl-keys")) == 2


@pytest.mark.slow
def test_the_asyncio_client_refuses_a_cluster_it_does_not_support(tmp_path):
    from worker.servers import RedisCluster

    cluster = RedisCluster(tmp_path / "c")
    try:
        cluster.client().hset(Keys("cl-async").meta, mapping=VECTOR_META)

        async def run():
            async with AsyncMemnetClient(cluster.url, "cl-async") as client:
                await client.write("bob", x=[1.0] * D_IN)

        with pytest.raises(ClientError, match="does not support Redis Cluster"):
            asyncio.run(run())
    finally:
        cluster.stop()
