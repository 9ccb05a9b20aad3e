"""Where snapshots live: named blobs in a local directory or on S3-compatible object storage.

A store is a flat namespace of keys ("p3/manifests/snap-...json", "p3/blobs/<sha256>") with
five calls: get, put (overwrite), create (only if absent: how a manifest is published),
list (key, size, modified time) and delete (missing keys are fine). Snapshots
(memnet/snapshot.py) are written on top of it and know nothing of where the bytes go.

``open_store(url)`` picks the implementation:

- a path or ``file:///path``: ``DirectoryStore``. Each blob is written to a temporary file,
  fsynced, then renamed (``create``: hard-linked, which fails if the name exists), and the
  directory fsynced, so a blob appears whole or not at all.
- ``s3://BUCKET/PREFIX``: ``ObjectStore`` on obstore (the Rust object_store crate behind a
  small Python API, no dependencies of its own), configured by the standard AWS variables
  (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION or
  AWS_DEFAULT_REGION, AWS_ALLOW_HTTP=true for a plain-http endpoint). ``create`` is a PUT
  with ``If-None-Match: *`` (S3, MinIO, GCS's S3 API and moto support it). An S3 PUT is
  atomic: a reader never sees part of an object.

Every failure is raised as StoreError naming the store and key (NotFound for a missing key,
AlreadyExists for a create that lost), so callers handle one kind of error for both.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

from memnet.errors import SnapshotError
from memnet.graph import fsync_path

T = TypeVar("T")
R = TypeVar("R")

THREADS = 8  # concurrent requests of one put_many/get_many (I/O bound: network or fsync)
CREATE_TRIES = 5  # an object store's create met by a conflicting request in progress (409)


class StoreError(SnapshotError):
    """A store call failed; the message names the store and the key."""


class NotFound(StoreError):
    """The key does not exist."""


class AlreadyExists(StoreError):
    """``create`` found the key already there (another writer published it first)."""


@dataclass(frozen=True)
class Listed:
    key: str
    size: int
    modified: float  # seconds since the epoch


class Store(Protocol):
    url: str

    def get(self, key: str) -> bytes: ...

    def get_range(self, key: str, start: int, length: int) -> bytes: ...

    def put(self, key: str, data: bytes) -> None: ...

    def create(self, key: str, data: bytes) -> None: ...

    def list(self, prefix: str) -> list[Listed]: ...

    def delete(self, keys: Iterable[str]) -> None: ...


def put_many(store: Store, items: Sequence[tuple[str, bytes]]) -> None:
    """Put every (key, data), several at a time."""
    _each(lambda item: store.put(*item), items)


def create_many(store: Store, items: Sequence[tuple[str, bytes]], created: list[str]) -> None:
    """Create every (key, data), several at a time, appending to ``created`` each key this
    call wrote (not those already there: content-addressed, they hold the same bytes, and
    may belong to another writer), so a caller that fails can remove only its own."""

    def one(item: tuple[str, bytes]) -> None:
        try:
            store.create(*item)
        except AlreadyExists:
            return
        created.append(item[0])  # (list.append is atomic)

    _each(one, items)


def get_many(store: Store, keys: Sequence[str]) -> list[bytes]:
    """Get every key, several at a time, in the order given."""
    return _each(store.get, keys)


def get_ranges(store: Store, ranges: Sequence[tuple[str, int, int]]) -> list[bytes]:
    """Get every (key, start, length) slice, several at a time, in the order given."""
    return _each(lambda r: store.get_range(*r), ranges)


def _each(call: Callable[[T], R], todo: Sequence[T]) -> list[R]:
    if len(todo) <= 1:
        return [call(t) for t in todo]
    return list(_pool().map(call, todo))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    """One pool for the process: threads made once (each new thread can give glibc's malloc
    another arena that keeps freed memory: RSS that grows with churn)."""
    return ThreadPoolExecutor(THREADS, thread_name_prefix="memnet-store")


def open_store(url: str | os.PathLike[str]) -> Store:
    """The store a MEMNET_SNAPSHOT_URL names (StoreError for a scheme memnet cannot use)."""
    text = os.fspath(url)
    scheme = urlparse(text).scheme
    if scheme == "s3":
        return ObjectStore(text)
    if scheme == "file":
        return DirectoryStore(urlparse(text).path)
    if scheme and len(scheme) > 1:  # (a one-letter scheme is a Windows drive)
        raise StoreError(f"{text}: unsupported snapshot URL (use a path, file://... or s3://...)")
    return DirectoryStore(text)


class DirectoryStore:
    """Keys are paths under root. Paths are plain strings throughout (os.path), never
    pathlib: pathlib interns every name it parses and the interned table keeps its size, so
    a blob name per memory would hold RAM that grows with the number of memories."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.url = os.path.abspath(os.fspath(root))
        self.root = Path(self.url)

    def _path(self, key: str) -> str:
        return os.path.join(self.url, key)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise NotFound(f"{path}: missing") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot read ({e})") from e

    def get_range(self, key: str, start: int, length: int) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                return f.read(length)
        except FileNotFoundError:
            raise NotFound(f"{path}: missing") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot read ({e})") from e

    def put(self, key: str, data: bytes) -> None:
        final = self._path(key)
        try:
            tmp = self._write_temporary(final, data)
            os.replace(tmp, final)
            fsync_path(os.path.dirname(final))
        except OSError as e:
            raise StoreError(f"{final}: cannot write ({e})") from e

    def create(self, key: str, data: bytes) -> None:
        final = self._path(key)
        try:
            tmp = self._write_temporary(final, data)
            try:
                os.link(tmp, final)  # fails if the name exists: atomic create
            except FileExistsError:
                raise AlreadyExists(f"{final}: already exists") from None
            finally:
                _unlink(tmp)
            fsync_path(os.path.dirname(final))
        except AlreadyExists:
            raise
        except OSError as e:
            raise StoreError(f"{final}: cannot write ({e})") from e

    @staticmethod
    def _write_temporary(final: str, data: bytes) -> str:
        parent = os.path.dirname(final)
        _make_dirs(parent)
        tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink(tmp)
            raise
        return tmp

    def list(self, prefix: str) -> list[Listed]:
        """Keys under prefix, a directory path ending in '/' (temporary files excluded).
        Plain strings, not pathlib: pathlib interns every name it parses, and the interned
        table keeps its size, so listing a million blobs would hold ~100 MB for good."""
        top = os.path.join(self.url, prefix)
        skip = len(self.url) + 1
        out: list[Listed] = []
        try:
            stack = [top] if os.path.isdir(top) else []
            while stack:
                try:
                    entries = os.scandir(stack.pop())
                except FileNotFoundError:  # (removed since it was listed)
                    continue
                with entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif not entry.name.startswith(".tmp-"):
                            try:
                                st = entry.stat()
                            except FileNotFoundError:  # deleted while this lists (a prune,
                                continue  # a retention): not listed, as a moment later
                            key = entry.path[skip:].replace(os.sep, "/")
                            out.append(Listed(key, st.st_size, st.st_mtime))
        except OSError as e:
            raise StoreError(f"{top}: cannot list ({e})") from e
        return out

    def delete(self, keys: Iterable[str]) -> None:
        parents = set()
        try:
            for key in keys:
                path = self._path(key)
                _unlink(path)
                parents.add(os.path.dirname(path))
            for parent in parents:
                if os.path.isdir(parent):
                    fsync_path(parent)
        except OSError as e:
            raise StoreError(f"{self.url}: cannot delete ({e})") from e

    def remove_temporary(self, prefix: str) -> None:
        """Leftovers of writes a crash interrupted (call when taking a partition over)."""
        top = self._path(prefix)
        for parent, _, names in os.walk(top):
            for name in names:
                if name.startswith(".tmp-"):
                    _unlink(os.path.join(parent, name))


def _make_dirs(path: str) -> None:
    """os.makedirs, each directory it makes fsynced in its parent: the first snapshot's
    manifest is durable only with its directory's entry (the input is trimmed after it)."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        _make_dirs(parent)
    with contextlib.suppress(FileExistsError):  # (another writer made it meanwhile)
        os.mkdir(path)
    fsync_path(parent)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class ObjectStore:
    """An S3-compatible bucket through obstore; credentials and endpoint from the AWS
    variables. Requests time out after 30 s and are retried for up to 60 s in all, so a
    snapshot against an unreachable store fails within a minute (and is retried later)."""

    def __init__(self, url: str) -> None:
        from obstore.store import from_url

        self.url = _masked(url)  # (in every message; credentials in the URL are not shown)
        try:
            self._store = from_url(
                url,
                client_options={
                    "timeout": "30s",
                    "connect_timeout": "5s",
                    "allow_http": os.environ.get("AWS_ALLOW_HTTP", "").lower() == "true",
                },
                retry_config={
                    "max_retries": 5,
                    "retry_timeout": timedelta(seconds=60),
                    "backoff": {
                        "init_backoff": timedelta(milliseconds=100),
                        "max_backoff": timedelta(seconds=5),
                        "base": 2.0,
                    },
                },
            )
        except Exception as e:  # obstore's configuration errors: a bad URL or variable
            raise StoreError(f"{self.url}: cannot open ({_short(e)})") from e

    def get(self, key: str) -> bytes:
        import obstore

        try:
            return bytes(obstore.get(self._store, key).bytes())
        except FileNotFoundError:
            raise NotFound(f"{self.url}/{key}: missing") from None
        except Exception as e:
            raise StoreError(f"{self.url}/{key}: cannot read ({_short(e)})") from e

    def get_range(self, key: str, start: int, length: int) -> bytes:
        import obstore

        try:
            return bytes(obstore.get_range(self._store, key, start=start, length=length))
        except FileNotFoundError:
            raise NotFound(f"{self.url}/{key}: missing") from None
        except Exception as e:
            raise StoreError(f"{self.url}/{key}: cannot read ({_short(e)})") from e

    def put(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self._store, key, data)
        except Exception as e:
            raise StoreError(f"{self.url}/{key}: cannot write ({_short(e)})") from e

    def create(self, key: str, data: bytes) -> None:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        for attempt in range(CREATE_TRIES):
            try:
                obstore.put(self._store, key, data, mode="create")
                return
            except (AlreadyExistsError, PreconditionError):
                # 412: the object exists. 409 (which obstore reports the same way): another
                # request on the key is in progress (this client's own retry after a
                # timeout, say), and S3 asks to try again: only an object there says which.
                if self._exists(key):
                    raise AlreadyExists(f"{self.url}/{key}: already exists") from None
                time.sleep(0.1 * 2**attempt)
            except Exception as e:
                raise StoreError(f"{self.url}/{key}: cannot write ({_short(e)})") from e
        raise StoreError(
            f"{self.url}/{key}: cannot write (requests in conflict, {CREATE_TRIES} tries)"
        )

    def _exists(self, key: str) -> bool:
        import obstore

        try:
            obstore.head(self._store, key)
        except FileNotFoundError:
            return False
        except Exception as e:
            raise StoreError(f"{self.url}/{key}: cannot read ({_short(e)})") from e
        return True

    def list(self, prefix: str) -> list[Listed]:
        import obstore

        try:
            return [
                Listed(meta["path"], meta["size"], meta["last_modified"].timestamp())
                for page in obstore.list(self._store, prefix)
                for meta in page
            ]
        except Exception as e:
            raise StoreError(f"{self.url}/{prefix}: cannot list ({_short(e)})") from e

    def delete(self, keys: Iterable[str]) -> None:
        import obstore

        todo = list(keys)
        try:
            for start in range(0, len(todo), 1000):  # one request per 1,000 keys
                obstore.delete(self._store, todo[start : start + 1000])
        except Exception as e:
            raise StoreError(f"{self.url}: cannot delete ({_short(e)})") from e

    def remove_temporary(self, prefix: str) -> None:
        """Nothing to do: an interrupted S3 PUT leaves no object."""


def _short(e: Exception) -> str:
    """obstore's messages carry the whole request debug dump: keep its first line (with
    any credentials of a URL in it masked: an endpoint from AWS_ENDPOINT_URL may carry them)."""
    return _masked(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


_CREDENTIALS = re.compile(r"(//[^/@\s:]*:)\S*@")  # (to the last @: a password may hold @)


def _masked(text: str) -> str:
    """text with the password of each user:password@ in a URL replaced by *** (from the
    first ":" after the user to the URL's last "@": more than the password where a path
    holds "@", never less)."""
    return _CREDENTIALS.sub(r"\1***@", text)
