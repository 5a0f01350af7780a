"""The node agent's process: install the bundle, keep our entry chained, repair, serve readiness and health.

It runs as the DaemonSet's main process with the host's CNI bin and conf
dirs mounted. It starts the CNI server (`--agent-socket`, on by default)
before our entry names the socket, so the first ADD finds it listening.

Upgrades without a gap (the DaemonSet surges: the new pod starts before the
old one stops): the new agent renames its socket over the shared path, so
every new connection reaches it, installs its bundle, then writes its token
into `<bin dir>/.cni-redirect-owner` and adopts the entry. The old agent sees
the token change, stops editing anything and stops answering probes; on
SIGTERM it drains its socket and exits, leaving entry and bundle in place.

Uninstall: SIGTERM while the token is still ours (and none appears within
`--handover-wait` seconds) removes our entry, then, after a grace period (a
runtime that loaded the old config may still exec the plugin), the bundle,
the backups, the token and the socket.
"""

from __future__ import annotations

import errno
import http.server
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import wire
from ..errors import CniRedirectError, SettingsError
from ..logs import JsonLog
from . import REPAIR_MODES
from .bundle import Bundle
from .chain import ChainInstaller, load_entry_settings
from .files import write_atomic
from .options import Options
from .watch import DirWatch

OWNER_FILE = ".cni-redirect-owner"

if TYPE_CHECKING:
    from ..cniserver import CniServer
    from .metrics import Metrics
    from .repair import Repairer


def check_agent_socket(path: str) -> str:
    """The front only talks to sockets it can trust: root's directory, a plain path."""
    if not wire.trusted_socket_path(path):
        raise SettingsError(f"--agent-socket {path!r} must be a .sock path under {' or '.join(wire.SOCKET_DIRS)}")
    return path


class NodeAgent:
    """The bundle and the chain on one node, reconciled together, and who owns them."""

    def __init__(self, options: Options, log: Callable[..., None], entry: dict) -> None:
        self.options = options
        self.log = log
        self.bundle = Bundle(options.plugin_source, options.cni_bin_dir, log)
        self.chain = ChainInstaller(options.cni_conf_dir, entry, log, options.conf_file, options.wait_log_interval)
        self.token = secrets.token_hex(8)
        self.owner_file = options.cni_bin_dir / OWNER_FILE
        self.problem = ""  # the last iteration's failure (a reinstall on a full disk, EROFS, EIO): unready, retried

    @property
    def ready_reason(self) -> str:
        return self.problem or self.chain.ready_reason

    def install(self) -> None:
        self.bundle.install()

    def claim(self) -> None:
        """From now on this agent owns the node's install; a predecessor sees it and hands over."""
        write_atomic(self.owner_file, self.token.encode() + b"\n", mode=0o644)

    def superseded(self) -> bool:
        """Whether a newer agent has claimed the node since we did."""
        try:
            return self.owner_file.read_bytes().strip() != self.token.encode()
        except FileNotFoundError:
            return False

    def wait_for_successor(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            if self.superseded():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def reconcile(self) -> bool:
        """One pass: the plugin in the bin dir and our entry in the primary config. Returns readiness.

        A failure is this iteration's, not the agent's: it is logged once, makes the agent unready with the
        reason, and the next iteration tries again. It never leaves the loop (leaving it means uninstalling)."""
        try:
            self.bundle.ensure()
            ready = self.chain.reconcile()
        except Exception as exc:  # a full disk, EROFS, EIO, or a bug: never a reason to uninstall
            problem = f"cannot keep the plugin installed: {type(exc).__name__}: {exc}"
            if problem != self.problem:
                self.log("error", problem)
            self.problem = problem
            return False
        if self.problem:
            self.log("info", "recovered", was=self.problem)
        self.problem = ""
        return ready

    def uninstall(self) -> None:
        """Our entry out, then, after the grace period, the bundle and our token: unless a config still names us."""
        self.chain.uninstall()
        # A runtime that loaded the old conflist may still exec us for a moment.
        time.sleep(self.options.uninstall_grace)
        still = self.chain.files_naming_us()
        if still:
            self.log(
                "warning",
                "left the plugin in the bin dir: configs still name cni-redirect, and every pod would fail without it",
                files=still,
            )
            return
        self.bundle.remove()
        if not self.superseded():
            self.owner_file.unlink(missing_ok=True)


class _SharedPortServer(http.server.ThreadingHTTPServer):
    """Old and new agent share the node's port during a surge (SO_REUSEPORT); the old one closes first.

    Dual-stack: one IPv6 socket with IPV6_V6ONLY off answers IPv4 (as ::ffff:a.b.c.d) and IPv6, so
    probes and scrapes reach it on IPv4, IPv6 single-stack and dual-stack clusters alike."""

    daemon_threads = True
    address_family = socket.AF_INET6
    #: At most this many connections are served at once (a thread each); more are closed at once.
    max_connections = 16
    request_queue_size = 128  # a burst of connects waits in the kernel, not in SYN retries

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.slots = threading.BoundedSemaphore(self.max_connections)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

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


def serve_readiness(
    agent: NodeAgent, port: int, server: CniServer | None = None, metrics=None
) -> http.server.ThreadingHTTPServer:
    """/readyz: installed and chained. /healthz: the process can do its job (its CNI server, if any, serves).
    /metrics: Prometheus text (node/metrics.py)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 5  # seconds a connection may take to send its request: an idle one is closed then

        def do_GET(self) -> None:
            warning = ""
            content_type = "text/plain"
            if self.path == "/readyz":
                reason, warning = agent.ready_reason, agent.chain.warning
            elif self.path == "/healthz":
                reason = server.problem() if server is not None else ""
            elif self.path == "/metrics" and metrics is not None:
                self._answer(200, metrics.render(), metrics.CONTENT_TYPE)
                return
            else:
                self.send_error(404)
                return
            body = (reason or "ok" + (f"\nwarning: {warning}" if warning else "")).encode() + b"\n"
            self._answer(200 if not reason else 503, body, content_type)

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    http_server = _bind_with_retry(lambda: _probe_server(port, Handler), agent.log, port)
    threading.Thread(target=http_server.serve_forever, name="readyz", daemon=True).start()
    return http_server


def _bind_with_retry(make, log: Callable[..., None], port: int, seconds: float = 30.0):
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


def checked_entry(options: Options) -> dict:
    """Our conflist entry from the admin's settings and flags, or SettingsError naming what is wrong."""
    ours = load_entry_settings(options.entry_file)
    if options.agent_socket is not None:
        ours["agent_socket"] = check_agent_socket(str(options.agent_socket))
    if options.repair not in REPAIR_MODES:
        raise SettingsError(f"--repair {options.repair!r} must be one of {', '.join(REPAIR_MODES)}")
    return ours


def run(options: Options, log: Callable[..., None] | None = None, stop: threading.Event | None = None) -> int:
    """The node agent's main loop; returns the exit code."""
    log = log or JsonLog()
    stop = stop or threading.Event()
    try:
        ours = checked_entry(options)
    except CniRedirectError as exc:
        message = getattr(exc, "msg", None) or str(exc)
        log("error", "invalid plugin settings; nothing installed", entry_file=str(options.entry_file), error=message)
        return 2
    agent = NodeAgent(options, log, ours)
    services = _Services(options, log, agent)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    try:
        agent.install()
    except OSError as exc:
        log("error", "cannot install the plugin binary", error=str(exc))
        services.stop_server()
        return 1
    agent.claim()
    services.start()
    watch = DirWatch((options.cni_conf_dir, options.cni_bin_dir), options.recheck_interval, options.poll_interval)

    def wake_on_stop() -> None:
        stop.wait()
        watch.wake()

    threading.Thread(target=wake_on_stop, name="stop-waker", daemon=True).start()
    log("info", "agent started", bin_dir=str(options.cni_bin_dir), conf_dir=str(options.cni_conf_dir))
    try:
        while not stop.is_set():
            if agent.superseded():
                services.hand_over()
            else:
                services.reconcile()
            watch.wait()  # a change in the conf or bin dir, a stop, or the periodic re-check
    finally:
        services.finish()
        watch.close()
        log("info", "agent stopped")
    return 0


class _Services:
    """What the agent runs beside its loop: the CNI server, probes and metrics, the repair thread."""

    def __init__(self, options: Options, log: Callable[..., None], agent: NodeAgent) -> None:
        self.options, self.log, self.agent = options, log, agent
        self.metrics: Metrics | None = _metrics() if options.readiness_port else None
        self.server: CniServer | None = None
        self.http_server: http.server.ThreadingHTTPServer | None = None
        self.repairer: Repairer | None = None
        self.repair_stop, self.repair_wake = threading.Event(), threading.Event()
        self.superseded = False
        if options.agent_socket is not None:
            from ..cniserver import CniServer

            observe = self.metrics.observe if self.metrics else None
            self.server = CniServer(options.agent_socket, log, observe=observe)
            self.server.start()  # before our entry names it: the first ADD must find it listening

    def start(self) -> None:
        """Probes, metrics and repair: once this agent has claimed the node."""
        server, metrics = self.server, self.metrics
        if metrics is not None:
            metrics.agent_up.set_function(
                lambda: 0 if self.superseded or (server is not None and server.problem()) else 1
            )
        if self.options.readiness_port:
            self.http_server = serve_readiness(self.agent, self.options.readiness_port, server, metrics)
        self.repairer = _start_repair(self.options, self.log, server, self.repair_stop, self.repair_wake, metrics)

    def reconcile(self) -> None:
        chain = self.agent.chain
        writes = chain.writes
        self.agent.reconcile()
        if chain.writes != writes:
            self.repair_wake.set()  # pods may have started while our entry was gone
            if writes and self.metrics is not None:  # not the first insert: the entry had gone
                self.metrics.reinsertions.inc(chain.writes - writes)

    def hand_over(self) -> None:
        """A newer agent claimed the node: stop repairing and answering probes (they reach it now)."""
        if self.superseded:
            return
        self.log("info", "a newer node agent took over this node: handing over")
        self.superseded = True
        self.repair_stop.set()
        self._close_http()

    def finish(self) -> None:
        """SIGTERM: hand over to a successor that appears in time, else uninstall."""
        self.repair_stop.set()
        self.repair_wake.set()
        if not self.superseded:
            self.superseded = self.agent.wait_for_successor(self.options.handover_wait)
        if self.superseded:
            self.log("info", "stopping: a newer agent runs this node; entry and plugin stay in place")
            if self.server is not None:
                self.server.drain()
        else:
            self.log("info", "stopping: uninstalling")
            self.agent.uninstall()  # the CNI server keeps serving through the grace period
            self.stop_server()
        if self.repairer is not None:
            self.repairer.close()
        self._close_http()

    def stop_server(self) -> None:
        if self.server is not None:
            self.server.stop()

    def _close_http(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None


def _metrics() -> Metrics:
    from .metrics import Metrics

    return Metrics()


def _start_repair(
    options: Options,
    log: Callable[..., None],
    server: CniServer | None,
    stop: threading.Event,
    wake: threading.Event,
    metrics: Metrics | None = None,
) -> Repairer | None:
    if options.repair == "off":
        return None
    from ..cri import CriClient
    from .repair import PassResult, Repairer
    from .survey import kernel_sessions

    def passed(result: PassResult) -> None:
        if metrics is not None and result.chained:  # before the first insert (the agent's start) is no failure
            metrics.pass_done(result.states, result.reasons, result.error, result.failed)

    repairer = Repairer(
        CriClient(options.cri_socket),
        options.cni_conf_dir,
        log,
        mode=options.repair,
        conf_file=options.conf_file,
        sessions=kernel_sessions(server.locks if server is not None else None),
        on_pass=passed,
    )
    thread = threading.Thread(
        target=repairer.loop, args=(stop, wake, options.repair_interval), name="repair", daemon=True
    )
    thread.start()
    return repairer
