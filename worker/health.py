"""A worker's HTTP endpoints: ``/metrics`` (Prometheus) and ``/healthz`` (is the loop alive).

``GET /healthz`` answers 200 ``ok`` while the worker loop's last pass (``last_progress()``,
``time.monotonic()`` seconds; None while starting up or stopping) is at most ``within_s``
old, else 503 with a one-line reason; ``GET /metrics`` the Prometheus text; anything else
404. A worker whose loop is stuck stops renewing its leases (worker/leases.py), so /healthz
going 503 is the same signal its peers act on.

Bound to MEMNET_METRICS_HOST (default 127.0.0.1: set 0.0.0.0 for a scraper on another host)
on MEMNET_METRICS_PORT; served by daemon threads, so it never holds up the worker or its exit.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

TEXT = "text/plain; charset=utf-8"


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        last_progress: Callable[[], float | None],
        within_s: float,
        registry: CollectorRegistry,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.last_progress = last_progress
        self.within_s = within_s
        self.registry = registry
        super().__init__(address, _Handler)

    def health(self) -> tuple[int, str]:
        """(HTTP status, one line) for /healthz."""
        try:
            last = self.last_progress()
        except Exception as e:  # a health check must answer, whatever it reads
            return 503, f"health check failed: {type(e).__name__}: {e}"
        if last is None:
            return 503, "worker not serving (starting up or stopping)"
        age = time.monotonic() - last
        if age <= self.within_s:
            return 200, "ok"
        return 503, (
            f"worker loop stalled: last pass {age:.1f} s ago (limit {self.within_s:g} s, "
            "after which its leases are not renewed)"
        )


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer
    server_version = "memnet"
    sys_version = ""

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            status, line = self.server.health()
            status, body, kind = status, (line + "\n").encode(), TEXT
        elif path == "/metrics":
            status, body, kind = 200, generate_latest(self.server.registry), CONTENT_TYPE_LATEST
        else:
            status, body, kind = 404, b"not found: this server has /metrics and /healthz\n", TEXT
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def start(
    host: str,
    port: int,
    last_progress: Callable[[], float | None],
    within_s: float,
    registry: CollectorRegistry = REGISTRY,
) -> tuple[HealthServer, int]:
    """Serve /metrics and /healthz on host:port (0: any free port) from a daemon thread;
    returns the server (``shutdown()`` then ``server_close()`` stops it) and the bound port.
    Raises OSError naming host:port if it cannot bind."""
    try:
        server = HealthServer((host, port), last_progress, within_s, registry)
    except OSError as e:
        error = OSError(
            f"cannot serve metrics and health on {host}:{port}: {e.strerror or e} "
            "(MEMNET_METRICS_HOST, MEMNET_METRICS_PORT or PORT)"
        )
        error.errno = e.errno  # EADDRINUSE and the like, for callers that tell them apart
        raise error from e
    actual = int(server.server_address[1])
    threading.Thread(target=server.serve_forever, name="metrics-health", daemon=True).start()
    shown = f"[{host}]" if ":" in host else host
    log.info("metrics and health on http://%s:%d (/metrics, /healthz)", shown, actual)
    return server, actual
