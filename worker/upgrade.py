"""Model upgrades: ``memnet rebuild --model NEW`` and ``memnet deploy --model NEW``.

rebuild: for each partition, NEW's snapshots are computed by running the partition's whole
input history -- the archive (worker/archive.py), then what Redis still holds -- through
NEW's engine in this process: batched, no round trip per event, resumable (it continues
from NEW's newest snapshot), one process per partition up to ``--jobs``. The serving model
is not disturbed. It ends with NEW's snapshots at the last entry each partition had
committed when the rebuild read its Redis stream (never past it: see _history), and refuses
a history with a hole (entries pruned from the archive, or trimmed without archiving).

deploy: switches the deployment to NEW. It marks each partition ``deploying`` (from then
on only NEW's workers may trim its input), records NEW as ``deploying`` in PREFIX:meta,
catches NEW's snapshots up with the committed input once more, then makes NEW the served model
(PREFIX:meta ``model``, dimensions, components). The old model's workers then hand their
partitions over and take none; NEW's workers take them, load NEW's snapshot and replay the
tail. Exactly once across the switch: entries the old model had committed were answered by
it (a replay's responses for them are refused by Redis as duplicates); every later entry is
answered by NEW. The first NEW owner of a partition records the switch point
(PREFIX:{p}:switch; memnet status shows it). Deploying the previous model rolls back the
same way, from its own snapshots (kept under their own prefix) and the archive.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from worker.events import ClientError
from worker.settings import Settings

CHUNK = 1000  # entries per engine call
SNAPSHOT_EVERY = 50_000  # entries between a rebuild's snapshots (what a resume repeats)


class UpgradeError(ClientError):
    """A rebuild or deploy cannot go on; the message says why and what to do."""


class LockLost(UpgradeError):
    """A deploy no longer holds PREFIX:deploy (paused past its expiry, or Redis lost it):
    it must not switch, nor call anything off (another deploy may run now)."""


def rebuild_partition(settings: Settings, model: Path, p: int, quiet: bool = False) -> dict:
    """Bring model's snapshots of partition p to the end of its input; what was done."""
    from tqdm import tqdm

    from worker.archive import Archive
    from worker.connection import connect
    from worker.ownership import open_store, store_at
    from worker.partition import Partition

    engine = _engine(model)
    client = connect(settings.redis_url)
    store = open_store(settings, p, engine)
    part = Partition(
        p, 0, engine, store, settings.partitions, settings.max_message_bytes,
        (settings.resident_mb << 20),
    )  # fmt: skip
    part.restore()
    part.epoch = store.newest_epoch()  # continue its snapshots, never behind them
    archive = Archive(store_at(settings.store_url), p)
    _check_history(client, settings, p, part.position, archive)
    started, done, writes, refused = time.perf_counter(), 0, 0, 0
    bar = tqdm(desc=f"partition {p}", unit=" entries", position=p, disable=quiet, leave=True)
    for chunk in _chunks(_history(client, settings, p, part.position, archive)):
        pending = part.prepare(chunk, queries=False)  # (they change no memory)
        batch = part.finish(pending, engine.process(pending.items))
        writes, refused = writes + batch.counts["write"], refused + batch.refused_writes
        part.uncommitted = False
        done += len(chunk)
        bar.update(len(chunk))
        if part.since_snapshot >= SNAPSHOT_EVERY or part.over_budget():
            part.snapshot()  # (which also lets memories beyond the budget go)
    if part.since_snapshot:
        part.snapshot()
    bar.close()
    took = time.perf_counter() - started
    return {"partition": p, "entries": done, "seconds": took, "position": part.position,
            "writes": writes, "refused": refused}  # fmt: skip


@functools.cache
def _engine(model: Path) -> Any:
    """One engine per model in this process, shared by the partitions it rebuilds one
    after another: its jitted functions compile once, not once per partition."""
    from memnet import Engine, load_model

    return Engine(load_model(model))


def _check_history(client: Any, settings: Settings, p: int, position: Any, archive: Any) -> None:
    """Refuse a history with a hole after ``position`` (NEW's newest snapshot, None: from
    the start): entries retention deleted from the archive, or that a worker trimmed from
    Redis without archiving them (MEMNET_ARCHIVE=0, or a memnet before 0.2)."""
    from worker.connection import text
    from worker.protocol import Keys, parse_id

    def after_position(entry_id: str) -> bool:  # (an entry the rebuild needs was there)
        return position is None or parse_id(entry_id) > parse_id(position)

    pruned = archive.pruned()
    if pruned is not None and after_position(pruned):
        raise UpgradeError(
            f"partition {p}: the archive was pruned up to {pruned} (MEMNET_ARCHIVE_DAYS), "
            f"after {position or 'the start'}, where this model's snapshots end; a rebuild "
            "needs the whole input history after it"
        )
    keys = Keys(settings.prefix)
    unarchived, trimmed = client.mget(keys.part(p, "unarchived"), keys.part(p, "trimmed"))
    if unarchived is not None and after_position(text(unarchived)):
        raise UpgradeError(
            f"partition {p}: a worker with MEMNET_ARCHIVE=0 trimmed its input up to "
            f"{text(unarchived)}, after {position or 'the start'}, where this model's "
            "snapshots end; a rebuild needs the whole input history after it"
        )
    if (
        position is None
        and trimmed is not None
        and archive.last() is None
        and _removed(client, keys.inp(p)) != 0
    ):
        raise UpgradeError(
            f"partition {p}: entries of its input were trimmed (up to {text(trimmed)}) but "
            "none archived (MEMNET_ARCHIVE=0, or the stream deleted); a rebuild needs the "
            "whole history"
        )


def _removed(client: Any, stream: str) -> int | None:
    """How many entries were ever removed from the stream (Redis 7's entries-added less its
    length; workers only trim their input); None where Redis cannot tell (no such stream, or
    Redis 6). A trim point is recorded even when the trim removed nothing (a young stream),
    so the point alone does not mean entries are gone."""
    from redis.exceptions import ResponseError

    try:
        info = client.xinfo_stream(stream)
    except ResponseError:  # (no such key)
        return None
    added = info.get("entries-added")
    return None if added is None else int(added) - int(info["length"])


def _history(
    client: Any, settings: Settings, p: int, after: str | None, archive: Any
) -> Iterator[tuple[str, dict[bytes, Any]]]:
    """The partition's entries after ``after``, each once and in order, up to the last one
    committed (applied and answered) when Redis is first read: the archive's, then Redis's.

    Not past the committed offset: a deploy's new workers start from NEW's snapshot, and
    skip the entries before its position as applied; the old model's workers must have
    answered them (past the offset, they may lag or be stopped). While this reads, serving
    workers may archive and trim more: each page of Redis comes with its trim point in one
    transaction, and when that point passed what was read, the entries below it are read
    from the archive first (a worker archives before it trims)."""
    from worker.connection import text
    from worker.protocol import Keys, parse_id

    keys, at = Keys(settings.prefix), _Position(after)
    yield from at.take((i, raw_fields(raw)) for i, raw in archive.read(after))
    end = archived_to = None  # the committed offset (read with the first page); the trim
    while True:  # point up to which the archive was read
        pipe = client.pipeline(transaction=True)  # (MULTI: offset, trim point and page agree)
        pipe.mget(*(keys.part(p, name) for name in ("offset", "trimmed", "unarchived")))
        pipe.xrange(keys.inp(p), "-" if at.last is None else "(" + at.last, end or "+", 10_000)
        (committed, trimmed, unarchived), got = pipe.execute()
        committed, trimmed, unarchived = text(committed), text(trimmed), text(unarchived)
        if unarchived is not None and at.before(unarchived):
            raise UpgradeError(
                f"partition {p}: a worker with MEMNET_ARCHIVE=0 trimmed its input up to "
                f"{unarchived} while this rebuild read it; a rebuild needs the whole history"
            )
        end = end or committed or trimmed  # (a trim point was committed: a snapshot's)
        if end is None:
            return  # nothing committed yet: NEW's workers apply everything
        if trimmed not in (None, archived_to) and at.before(trimmed):
            archived_to = trimmed  # entries of (last, trimmed) were archived, then trimmed
            yield from at.take(((i, raw_fields(raw)) for i, raw in archive.read(at.last)), end)
            continue  # (and read the page again after them)
        if not got:
            return
        past = parse_id(text(got[-1][0])) > parse_id(end)  # (only the first page, read to +)
        yield from at.take(((text(i), fields) for i, fields in got), end if past else None)
        if not at.before(end):
            return


class _Position:
    """The last entry a history gave (None: none yet)."""

    def __init__(self, last: str | None) -> None:
        self.last = last

    def before(self, entry_id: str) -> bool:
        from worker.protocol import parse_id

        return self.last is None or parse_id(entry_id) > parse_id(self.last)

    def take(
        self, entries: Iterator[tuple[str, dict[bytes, Any]]], end: str | None = None
    ) -> Iterator[tuple[str, dict[bytes, Any]]]:
        """entries up to end (all if None), remembering the last one given. Each source
        gives its entries in stream order after ``last``: the archive's read(last), and
        XRANGE from "(last" (so no id is parsed per entry, but against end when given: a
        rebuild reads millions)."""
        from worker.protocol import parse_id

        stop = None if end is None else parse_id(end)
        for entry_id, fields in entries:
            if stop is not None and parse_id(entry_id) > stop:
                return
            self.last = entry_id
            yield entry_id, fields


def raw_fields(raw: bytes) -> dict[bytes, Any]:
    """An archived entry as Redis's fields."""
    return {b"msg": raw}


def _chunks(entries: Iterator[Any]) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) == CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def rebuild(settings: Settings, model: Path, jobs: int, locked: bool = False) -> list[dict]:
    """Every partition, ``jobs`` at a time: this process and jobs - 1 others (they share
    nothing). Whoever is free claims the next partition no one has claimed: the others
    from the first up once they have started (a spawned process imports JAX and loads the
    compiled functions: seconds), this process at once, from the last partition down. A
    partition is claimed when a process begins it, not when it is handed out: a pool hands
    the first ones to a process before it has started, and this process would wait for it.
    Under the deployment's DeployLock (taken here unless the caller holds it)."""
    if not locked:
        from worker.connection import connect
        from worker.protocol import Keys

        with DeployLock(connect(settings.redis_url), Keys(settings.prefix).deploy):
            return rebuild(settings, model, jobs, locked=True)
    from worker.ownership import claim_store

    claim_store(settings)
    partitions = list(range(settings.partitions))
    _process_start(settings)
    if jobs <= 1 or len(partitions) == 1:
        return [rebuild_partition(settings, model, p) for p in partitions]
    context = multiprocessing.get_context("spawn")  # (JAX and threads: no fork)
    claims = context.Array("b", len(partitions))  # 1: a process has begun that partition
    done: dict[int, dict] = {}
    others = min(jobs, len(partitions)) - 1
    pool = ProcessPoolExecutor(
        others, context, initializer=_process_start, initargs=(settings, claims)
    )
    try:
        runs = [pool.submit(_claimed, settings, model, p) for p in partitions]
        _claims.append(claims)
        for p in reversed(partitions):
            mine = _claimed(settings, model, p)
            if mine is not None:
                done[p] = mine
        if len(done) < len(partitions):  # (the others' results)
            done.update((d["partition"], d) for d in (run.result() for run in runs) if d)
    except (KeyboardInterrupt, SystemExit):  # stopped (a signal): the others too, at once,
        _stop(pool)  # not after their partitions (a deploy calls itself off only after this)
        raise
    finally:  # (on a failure, what has not started is not started)
        _claims.clear()
        if len(done) == len(partitions):  # all done here: the others, still starting,
            _stop(pool)  # can claim nothing (they would only start to find that out)
        pool.shutdown(wait=True, cancel_futures=True)
    return [done[p] for p in partitions]


_claims: list[Any] = []  # this process's claims array, while a rebuild shares partitions


def _claimed(settings: Settings, model: Path, p: int) -> dict | None:
    """rebuild_partition(p) if no process has begun it (then this one claims it), else None."""
    claims = _claims[0]
    with claims.get_lock():
        if claims[p]:
            return None
        claims[p] = 1
    return rebuild_partition(settings, model, p)


def _stop(pool: ProcessPoolExecutor) -> None:
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.terminate()


def _process_start(settings: Settings, claims: Any = None) -> None:
    """As a worker starts (a rebuild is its data path): its collector's pace, and the
    compiled functions this machine's workers keep (memnet.batching.keep_compilations);
    in a spawned process, the claims array it shares with the others."""
    from memnet.batching import keep_compilations
    from worker.worker import collect_less

    collect_less(settings.gc_threshold)
    keep_compilations(settings.cache_dir)
    if claims is not None:
        _claims[:] = [claims]


class DeployLock:
    """PREFIX:deploy, held by the one memnet deploy or rebuild running: a second deploy (or
    the call-off, a deploy of the served model) would reset the marks of the first while it
    catches up, and two rebuilds of one model would race for its snapshots. It expires
    LOCK_MS after its holder stops renewing it (a killed deploy's goes by itself)."""

    LOCK_MS = 30_000

    def __init__(self, client: Any, key: str) -> None:
        import os
        import socket
        import threading
        import uuid

        self.client, self.key = client, key
        self.token = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
        self._done = threading.Event()
        self.lost = False  # a renewal found the lock gone or another's
        self._renewer = threading.Thread(target=self._renew, name="deploy-lock", daemon=True)
        self._mine = client.register_script(_IF_MINE)

    def __enter__(self) -> DeployLock:
        from worker.connection import text

        if not self.client.set(self.key, self.token, nx=True, px=self.LOCK_MS):
            raise UpgradeError(
                f"another memnet deploy or rebuild is running ({self.key} is held by "
                f"{text(self.client.get(self.key))}); wait for it (a killed one's lock "
                f"expires within {self.LOCK_MS // 1000} s)"
            )
        self._renewer.start()
        return self

    def _renew(self) -> None:
        while not self._done.wait(self.LOCK_MS / 3000):
            with contextlib.suppress(Exception):  # (Redis away: the next try, or it expires)
                if self._mine(keys=[self.key], args=[self.token, self.LOCK_MS]) == 0:
                    self.lost = True

    def check(self, partitions: int, keys: Any, model: str) -> None:
        """Before the switch: still held, and every partition still marked for model (a
        call-off or another deploy resets the marks); LockLost otherwise."""
        from worker.connection import text

        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.key)
        for p in range(partitions):
            pipe.get(keys.part(p, "deploying"))
        holder, *marks = [text(v) for v in pipe.execute()]
        if self.lost or holder != self.token or set(marks) != {model}:
            raise LockLost(
                f"this deploy lost {self.key} before its switch (paused past "
                f"{self.LOCK_MS // 1000} s, or Redis lost the lock), and the partitions' marks "
                "may have changed since: nothing switched; see memnet status, and deploy again"
            )

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._renewer.join()
        with contextlib.suppress(Exception):  # (it expires)
            self._mine(keys=[self.key], args=[self.token, 0])


# KEYS: the lock  ARGV: token, ms (0: release)  ->  1 done, 0 not held by token
_IF_MINE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""


def deploy(settings: Settings, model: Path, jobs: int) -> dict:
    from memnet import load_model
    from worker.connection import connect, text
    from worker.events import NoDeployment
    from worker.protocol import Keys

    new = load_model(model)
    keys = Keys(settings.prefix)
    client = connect(settings.redis_url)
    with DeployLock(client, keys.deploy) as lock:
        meta = {text(k): text(v) for k, v in client.hgetall(keys.meta).items()}
        if not meta:
            raise NoDeployment(f"{keys.meta} does not exist: start a worker first")
        settings = replace(settings, partitions=int(meta["partitions"]))
        _check_inputs(meta, new)
        return _deploy(client, keys, settings, model, new, meta.get("model"), jobs, lock)


def _deploy(
    client: Any,
    keys: Any,
    settings: Settings,
    model: Path,
    new: Any,
    old: str | None,
    jobs: int,
    lock: DeployLock,
) -> dict:
    from worker.ownership import record_deployed

    calling_off = old == new.fingerprint  # (how an interrupted deploy is called off)
    switched = False
    try:
        pipe = client.pipeline(transaction=False)
        for p in range(settings.partitions):  # from now on only NEW's workers trim
            pipe.set(keys.part(p, "deploying"), new.fingerprint)
            if calling_off:  # (the served model takes them, as before)
                pipe.set(keys.part(p, "serve"), new.fingerprint)
        pipe.hset(keys.meta, "deploying", new.fingerprint)
        pipe.execute()
        if calling_off:  # (and the store's record follows: a switch cut short leaves it)
            record_deployed(settings, new.fingerprint)
            return {"model": new.fingerprint, "previous": old, "switched": False, "rebuilt": []}
        rebuilt = rebuild(settings, model, jobs, locked=True)  # caught up: nothing trimmed
        _check_fits(rebuilt, new.fingerprint)  # meanwhile
        with _signals_held():  # a stop signal from here waits for the switch to be written
            lock.check(settings.partitions, keys, new.fingerprint)
            _switch(client, keys, settings, new, old)
            switched = True
            record_deployed(settings, new.fingerprint)
    except LockLost:
        raise  # (nothing of ours to call off: the marks may be another deploy's now)
    except UpgradeError as e:  # called off: the old model's workers may trim again
        _call_off(client, keys, settings.partitions, old)
        raise UpgradeError(f"{e}; deploy called off, model {str(old)[:12]} serves on") from None
    except BaseException:
        if not (calling_off or switched):
            _call_off(client, keys, settings.partitions, old)
        raise
    return {"model": new.fingerprint, "previous": old, "switched": True, "rebuilt": rebuilt}


def _switch(client: Any, keys: Any, settings: Settings, new: Any, old: str | None) -> None:
    """In one round trip: from its first write on, no worker of the old model takes a
    partition (ACQUIRE), even one that has not yet seen PREFIX:meta change."""
    from worker.meta import record

    fields = {k: v for k, v in record(settings, new).items() if k not in ("partitions", "protocol")}
    pipe = client.pipeline(transaction=False)
    for p in range(settings.partitions):
        pipe.set(keys.part(p, "serve"), new.fingerprint)
    pipe.hset(keys.meta, mapping={**fields, "previous": old or ""})
    pipe.execute()


_held: list[int] = []  # while the switch is written: stop signals that came meanwhile
_holding = False


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A stop signal (_stopped_by_signals) waits until the block is done, then stops."""
    global _holding
    _holding = True
    try:
        yield
    finally:
        _holding = False
    if _held:
        raise SystemExit(128 + _held[0])


def _check_inputs(meta: dict[str, str], new: Any) -> None:
    """Refuse a model whose writes differ from what the deployment's producers send (text
    against vectors, or vectors of another length): none of the history's writes would fit
    it, and every new one would be refused the moment it is deployed."""
    from worker.events import TEXT_ENCODERS

    served = (meta.get("components") or "").split(",")[0]
    if not served or "input_dim" not in meta:
        return  # (a record without them: nothing to compare)
    config = new.config
    old_text, new_text = served in TEXT_ENCODERS, config.encoder in TEXT_ENCODERS
    if old_text == new_text and (new_text or int(meta["input_dim"]) == config.input_dim):
        return

    def reads(text: bool, dim: int) -> str:
        return "text" if text else f"vectors of {dim} numbers"

    raise UpgradeError(
        f"model {new.fingerprint[:12]} reads {reads(new_text, config.input_dim)}; this "
        f"deployment's producers send {reads(old_text, int(meta['input_dim']))} (model "
        f"{str(meta.get('model'))[:12]}): none of its history would fit, and every new write "
        "would be refused. A model with other inputs needs a deployment of its own (another "
        "MEMNET_PREFIX); not deployed"
    )


def _check_fits(rebuilt: list[dict], fingerprint: str) -> None:
    """Refuse a model that takes none of the history's writes it read (its input
    dimensions or encoder do not fit what producers send): its memories would all be empty.
    Writes only: malformed entries are refused by every model."""
    refused = sum(d.get("refused", 0) for d in rebuilt)
    if refused and not sum(d.get("writes", 0) for d in rebuilt):
        raise UpgradeError(
            f"model {fingerprint[:12]} refuses every write of the input history it read "
            f"({refused:,}: their input does not fit it; a worker of it would dead-letter "
            "them with the reason); not deployed"
        )


def _call_off(client: Any, keys: Any, partitions: int, old: str | None) -> None:
    """Undo a deploy's marks: the served model's workers trim again (deploying = served)."""
    if old is None:
        return
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        pipe.set(keys.part(p, "deploying"), old)
    pipe.hset(keys.meta, "deploying", old)
    pipe.execute()


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name, what in (
        ("rebuild", "compute a model's snapshots from the whole input history (the served "
                    "model keeps serving); resumable"),
        ("deploy", "switch the deployment to a model: catch its snapshots up, then the old "
                   "model's workers hand over and the new model's take over"),
    ):  # fmt: skip
        p = sub.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        p.add_argument("--model", type=Path, required=True, help="the model file")
        p.add_argument(
            "--jobs",
            type=int,
            default=1,
            metavar="N",
            help="partitions rebuilt at once, one process each (default %(default)s)",
        )
        p.set_defaults(run=cmd_rebuild if name == "rebuild" else cmd_deploy)


def _model_file(path: Path) -> Path:
    if not path.is_file():
        raise UpgradeError(f"--model {path}: no such file")
    return path


def _stopped_by_signals() -> None:
    """SIGTERM and SIGHUP end memnet deploy / rebuild as Ctrl-C does: through their
    clean-up (a deploy calls itself off: left marked, the old model's workers would never
    trim again), not at once."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        if _holding:  # (the switch is being written: stop right after it)
            _held.append(signum)
            return
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # (nohup's, a script's &: kept)
            signal.signal(signum, stop)


def cmd_rebuild(args: argparse.Namespace) -> int:
    from memnet import load_model
    from worker.connection import connect, text
    from worker.protocol import Keys

    settings = Settings.from_env()
    _stopped_by_signals()
    fingerprint = load_model(_model_file(args.model)).fingerprint
    meta = connect(settings.redis_url).hgetall(Keys(settings.prefix).meta)
    if text(meta.get(b"model")) == fingerprint:
        raise UpgradeError(
            f"--model {args.model} is the model the deployment serves: its workers keep its "
            "snapshots; rebuild is for another model"
        )
    if meta.get(b"partitions"):
        settings = replace(settings, partitions=int(meta[b"partitions"]))
    started = time.perf_counter()
    done = rebuild(settings, _model_file(args.model), args.jobs)
    _report(done, time.perf_counter() - started)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    _stopped_by_signals()
    started = time.perf_counter()
    result = deploy(settings, _model_file(args.model), args.jobs)
    if not result["switched"]:
        print(f"model {result['model'][:12]} is already the deployment's")
        return 0
    _report(result["rebuilt"], time.perf_counter() - started)
    print(
        f"deployed model {result['model'][:12]} (was {str(result['previous'])[:12]}): workers "
        f"of the old model hand their partitions over; start workers with "
        f"MEMNET_MODEL={args.model}, then stop the old ones (memnet status shows the switch "
        "points)"
    )
    return 0


def _report(done: list[dict], seconds: float) -> None:
    entries = sum(d["entries"] for d in done)
    refused = sum(d.get("refused", 0) for d in done)
    print(
        f"{entries:,} entries over {len(done)} partitions in {seconds:.1f} s "
        f"({entries / max(seconds, 1e-9):,.0f} entries/s)"
        + (
            f"; {refused:,} writes refused by this model (their input does not fit it)"
            if refused
            else ""
        )
    )
