"""The node agent's HTTP port: /readyz, /healthz and /metrics, for people and Prometheus.

The port is on the node's network and shared by the old and new agent during a surge (SO_REUSEPORT). Each
connection is held to a deadline for the whole exchange and a few slots at once: a slow or idle client costs a
close, never a thread for long. The loop sleeps until a connection or its shutdown. It knows nothing of the agent:
it is given callables for the answers.
"""

from __future__ import annotations

import errno
import http.server
import io
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...threads import NamedThread

if TYPE_CHECKING:
    from .metrics import Metrics


class _SharedPortServer(http.server.ThreadingHTTPServer):
    """Old and new agent share the node's port during a surge (SO_REUSEPORT); the old one closes first.

    Dual-stack: one IPv6 socket with IPV6_V6ONLY off answers IPv4 (as ::ffff:a.b.c.d) and IPv6, so
    probes and scrapes reach it on IPv4, IPv6 single-stack and dual-stack clusters alike."""

    daemon_threads = True
    address_family = socket.AF_INET6
    #: At most this many connections are served at once (a thread each); more are closed at once.
    max_connections = 16
    request_queue_size = 128  # a burst of connects waits in the kernel, not in SYN retries

    timeout = 0  # handle_request() never waits: serve_forever() calls it only once the socket is ready

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.slots = threading.BoundedSemaphore(self.max_connections)
        self._stopping = False
        self._stopped = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's loop wakes every `poll_interval` to look for a shutdown: twice a second, for nothing,
        the largest share of an idle agent's CPU (py-spy). This one sleeps until a connection or `shutdown()`."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stopping:
                    for key, _ in selector.select():
                        if key.fileobj is self and not self._stopping:
                            self.handle_request()
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        self._stopping = True
        os.write(self._wake_w, b"x")
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # an idle flood costs a close, never a thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client cut off at its deadline, or gone mid-answer: nothing to report, and no traceback on stderr."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _SharedPortServerV4(_SharedPortServer):
    """For a kernel without IPv6 (ipv6.disable=1): IPv4 only, as before."""

    address_family = socket.AF_INET


def _probe_server(port: int, handler: type) -> http.server.ThreadingHTTPServer:
    try:
        return _SharedPortServer(("::", port), handler)
    except OSError as exc:
        if exc.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
            raise
        return _SharedPortServerV4(("", port), handler)


REQUEST_DEADLINE = 10.0


class _DeadlineReader(io.RawIOBase):
    """A connection's reads, each waiting at most `idle` seconds and all of them together at most `deadline`:
    no thread of its own, the slot is free when the time is up (the handler answers a timeout by closing)."""

    def __init__(self, sock: socket.socket, idle: float, deadline: float) -> None:
        self.sock, self.idle = sock, idle
        self.end = time.monotonic() + deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request took longer than its deadline")
        self.sock.settimeout(min(self.idle, left))  # also bounds the answer's write (sendall's total time)
        return self.sock.recv_into(buffer)


def serve_readiness(
    port: int,
    answer: Callable[[str], str],
    warning: Callable[[], str],
    log: Callable[..., None],
    metrics: Metrics | None = None,
) -> http.server.ThreadingHTTPServer:
    """/readyz: installed and chained. /healthz: the process can do its job (its CNI server, if any, serves).
    /metrics: Prometheus text (node/agent/metrics.py). The port is shared by every agent on the node (host network):
    the DaemonSet probes each pod's own agent with `cni-redirect ready|healthy` instead; these are for people."""

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5  # seconds between two reads of the request: an idle connection is closed then
        #: seconds a whole exchange may take, however the client paces it: a request line dripped a byte every
        #: 2 s passes every read's timeout, and would hold one of the few slots for as long as it likes.
        deadline = REQUEST_DEADLINE

        def setup(self) -> None:
            super().setup()
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.timeout, self.deadline))

        def do_GET(self) -> None:
            note = ""
            content_type = "text/plain"
            if self.path == "/readyz":
                reason, note = answer("ready"), warning()
            elif self.path == "/healthz":
                reason = answer("healthy")
            elif self.path == "/metrics" and metrics is not None:
                self._answer(200, metrics.render(), metrics.CONTENT_TYPE)
                return
            else:
                self.send_error(404)
                return
            body = (reason or "ok" + (f"\nwarning: {note}" if note else "")).encode() + b"\n"
            self._answer(200 if not reason else 503, body, content_type)

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    http_server = _bind_with_retry(lambda: _probe_server(port, Handler), log, port)
    NamedThread(http_server.serve_forever, "readyz").start()
    return http_server


def _bind_with_retry(
    make: Callable[[], http.server.ThreadingHTTPServer], log: Callable[..., None], port: int, seconds: float = 30.0
) -> http.server.ThreadingHTTPServer:
    """A predecessor without SO_REUSEPORT holds the port until it exits: wait for it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return make()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            log("info", "readiness port in use, retrying", port=port)
            time.sleep(0.5)
