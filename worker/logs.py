"""Structured logs: one JSON object per line on stderr. Configured only by entry points."""

from __future__ import annotations

import json
import logging
import sys
import time

from worker.faults import Throttled


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class LibraryLinesThrottled(logging.Filter):
    """redis-py's cluster client logs each failed refresh of the cluster's topology at ERROR
    level, at every call while a node is out of reach: several lines a second, for a fault
    the worker tells itself once a minute. A library's line (a logger outside memnet's) goes
    through once a minute per kind (its first 48 characters), with a count of those held
    back."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self._window = Throttled(logging.getLogger(__name__), every_s)  # (its periods only)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in ("worker", "memnet", "__main__"):
            return True
        self._window.bound(1000)  # (kinds are few; bounded whatever a library logs)
        held = self._window.admit(f"{record.name}: {record.getMessage()[:48]}")
        if held:
            record.msg, record.args = f"{record.getMessage()} ({held} like it held back)", None
        return held is not None


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LibraryLinesThrottled())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
