"""The agent's HTTP endpoints (setting ``http.address``): ``/metrics``, ``/healthz``, ``/readyz``.

- ``/metrics``: Prometheus text (or OpenMetrics when asked for), from
  :class:`har_edge.agent.metrics.OutboxCollector` plus the process figures
  of prometheus-client;
- ``/healthz``: 200 while the process serves (liveness);
- ``/readyz``: 200 when the outbox takes writes, the model is loaded (it was
  verified when loaded: sha256, shapes, golden windows) and the disk budget has
  not paused ingestion; 503 with the reasons otherwise.

A threaded stdlib server on a daemon thread: a scrape never blocks the agent
loop, and the loop never waits for a scrape.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

from har_edge.agent.errors import ConfigError, HarEdgeError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from har_edge.agent.daemon import Agent

log = logging.getLogger(__name__)

SETTING = "http.address (HAR_EDGE_HTTP__ADDRESS)"


def parse_address(value: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` too) -> (host, port); empty -> None (off). Raises ValueError."""
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464, 0.0.0.0:9464); empty turns it off")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host:
        raise ValueError(f"{value!r} has no host: write 0.0.0.0:{port} to listen on every interface")
    return host, int(port)


#: a readiness check: None when fine, else the reason
Check = Callable[[], str | None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    checks: list[Check]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("http %s - " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                from prometheus_client.exposition import choose_encoder

                encoder, ctype = choose_encoder(self.headers.get("Accept", ""))
                self._send(200, encoder(self.server.registry), ctype)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                problems = [p for p in (_run_check(c) for c in self.server.checks) if p]
                if problems:
                    self._send(503, ("not ready: " + "; ".join(problems) + "\n").encode())
                else:
                    self._send(200, b"ready\n")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")
        except (BrokenPipeError, ConnectionResetError):
            log.debug("http: the client of %s went away", path)
        except Exception:  # a scrape must never take the agent down
            log.exception("http: %s failed", path)
            with contextlib.suppress(OSError):
                self._send(500, b"internal error (see the agent's log)\n")


def _run_check(check: Check) -> str | None:
    try:
        return check()
    except (HarEdgeError, OSError) as exc:
        return str(exc)


class HttpEndpoints:
    """The running server; ``stop()`` closes it."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="har-edge-http", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(address: str, registry: CollectorRegistry, checks: list[Check]) -> HttpEndpoints | None:
    """Start serving on ``address`` (None when it is empty); a port in use is a ConfigError naming the setting."""
    parsed = parse_address(address)
    if parsed is None:
        return None
    host, port = parsed
    try:
        server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{SETTING} = {address}: the port is already in use (another agent?): "
                "set another port, or an empty value to turn the endpoints off"
            ) from None
        raise ConfigError(f"{SETTING} = {address}: cannot listen there: {os.strerror(exc.errno or 0)}") from None
    server.registry = registry
    server.checks = checks
    endpoints = HttpEndpoints(server)
    h, p = endpoints.address
    log.info("serving /metrics, /healthz and /readyz on http://%s:%d", f"[{h}]" if ":" in h else h, p)
    return endpoints


# -- the agent's endpoints -------------------------------------------------------------


def agent_registry(agent: Agent) -> CollectorRegistry:
    """The metrics of ``agent``: its outbox, its model, its budget, and the process."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    from har_edge.agent.metrics import OutboxCollector

    s = agent.settings
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(
        OutboxCollector(
            s.outbox_path,
            model=lambda: agent.models.model.manifest if agent.models.model is not None else None,
            paused=lambda: bool(getattr(agent, "_paused", False)),
            budget_bytes=s.agent.outbox_max_mb * 1e6,
            data_dir=s.data_dir,
        )
    )
    return registry


def agent_checks(agent: Agent) -> list[Check]:
    """The readiness checks of ``agent`` (the same conditions as ``har-edge health``, plus the budget)."""
    import sqlite3

    from har_edge.agent.modelstore import read_pointer, running_other_than_chosen

    def outbox() -> str | None:
        try:
            conn = sqlite3.connect(agent.settings.outbox_path, timeout=5.0, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")  # takes the write lock, changes nothing
                conn.execute("ROLLBACK")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            return f"outbox {agent.settings.outbox_path} takes no writes: {exc}"
        return None

    def model() -> str | None:
        m = agent.models.model
        if m is None:
            return "model: not loaded yet"
        if running_other_than_chosen(agent.settings.models_dir, agent.settings.agent.model_dir, m):
            return (
                f"model: models/current ({read_pointer(agent.settings.models_dir)}) is not loadable; running {m.label}"
            )
        return None

    def budget() -> str | None:
        # what the loop last decided (Agent.over_budget()); asking again here would wait on the outbox's lock
        if getattr(agent, "_paused", False):
            return f"outbox over agent.outbox_max_mb = {agent.settings.agent.outbox_max_mb:g}: ingestion paused"
        return None

    return [outbox, model, budget]


def start_agent_endpoints(agent: Agent) -> HttpEndpoints | None:
    """Serve the agent's endpoints on ``http.address`` (None when it is empty)."""
    return serve(agent.settings.http.address, agent_registry(agent), agent_checks(agent))
