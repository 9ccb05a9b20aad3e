"""Exceptions of the memnet library: one root, and the few kinds a caller acts on."""


class MemnetError(Exception):
    """Root of every error this library raises on purpose."""


class ModelFileError(MemnetError):
    """A model file or model config is unusable; the message names what is wrong."""


class InvalidInput(MemnetError):
    """An event's content cannot be applied (wrong vector length, non-finite values, ...).

    Raised before anything is changed, so the memory is untouched.
    """


class SnapshotError(MemnetError):
    """A snapshot cannot be written or was refused on load; the message names the file."""


class StaleSnapshot(SnapshotError):
    """A snapshot of a newer epoch exists: this writer has been superseded."""


class SnapshotAborted(SnapshotError):
    """A snapshot was abandoned on request (a stopping worker out of time); nothing written."""


class CorruptBlob(SnapshotError):
    """A stored memory failed its checksum and was moved aside: loading again falls back to
    a snapshot that does not need it."""
