"""The node agent's process: install the bundle, keep our entry chained, serve readiness and health.

It runs as the DaemonSet's main process with the host's CNI bin and conf
dirs mounted. With `--agent-socket` it also starts the CNI server, before our
entry names the socket, so the first ADD finds it listening. On SIGTERM it
removes only what it added, then, after a grace period (a runtime that
loaded the old config may still exec the plugin), the bundle.
"""

from __future__ import annotations

import http.server
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import wire
from ..errors import SettingsError
from ..logs import JsonLog
from .bundle import Bundle
from .chain import Chain, load_entry

if TYPE_CHECKING:
    from ..cniserver import CniServer


@dataclass
class Options:
    cni_bin_dir: Path = Path("/host/opt/cni/bin")
    cni_conf_dir: Path = Path("/host/etc/cni/net.d")
    conf_file: str | None = None
    plugin_source: Path = Path("/opt/cni-redirect/bundle/cni-redirect")
    entry_file: Path | None = None
    readiness_port: int = 0  # 0: no readiness endpoint
    poll_interval: float = 0.2
    wait_log_interval: float = 5.0
    uninstall_on_exit: bool = True
    uninstall_grace: float = 2.0
    agent_socket: Path | None = None  # serve CNI requests here (the warm fast path)


def check_agent_socket(path: str) -> str:
    """The front only talks to sockets it can trust: root's directory, a plain path."""
    if not wire.trusted_socket_path(path):
        raise SettingsError(f"--agent-socket {path!r} must be a .sock path under {' or '.join(wire.SOCKET_DIRS)}")
    return path


class NodeAgent:
    """The bundle and the chain on one node, reconciled together."""

    def __init__(self, options: Options, log: Callable[..., None], entry: dict) -> None:
        self.options = options
        self.log = log
        self.bundle = Bundle(options.plugin_source, options.cni_bin_dir, log)
        self.chain = Chain(options.cni_conf_dir, entry, log, options.conf_file, options.wait_log_interval)

    @property
    def ready_reason(self) -> str:
        return self.chain.ready_reason

    def install(self) -> None:
        self.bundle.install()

    def reconcile(self) -> bool:
        """One pass: the plugin in the bin dir and our entry in the primary config. Returns readiness."""
        self.bundle.ensure()
        return self.chain.reconcile()

    def uninstall(self) -> None:
        """Our entry out, then, after the grace period, the bundle: unless a config still names us."""
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


def serve_readiness(agent: NodeAgent, port: int, server: CniServer | None = None) -> http.server.ThreadingHTTPServer:
    """/readyz: installed and chained. /healthz: the process can do its job (its CNI server, if any, serves)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            warning = ""
            if self.path == "/readyz":
                reason, warning = agent.ready_reason, agent.chain.warning
            elif self.path == "/healthz":
                reason = server.problem() if server is not None else ""
            else:
                self.send_error(404)
                return
            body = (reason or "ok" + (f"\nwarning: {warning}" if warning else "")).encode() + b"\n"
            self.send_response(200 if not reason else 503)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    http_server = http.server.ThreadingHTTPServer(("", port), Handler)
    threading.Thread(target=http_server.serve_forever, name="readyz", daemon=True).start()
    return http_server


def run(options: Options, log: Callable[..., None] | None = None, stop: threading.Event | None = None) -> int:
    """The node agent's main loop; returns the exit code."""
    log = log or JsonLog()
    stop = stop or threading.Event()
    try:
        ours = load_entry(options.entry_file)
        if options.agent_socket is not None:
            ours["agent_socket"] = check_agent_socket(str(options.agent_socket))
    except Exception as exc:
        message = getattr(exc, "msg", None) or str(exc)
        log("error", "invalid plugin settings; nothing installed", entry_file=str(options.entry_file), error=message)
        return 2
    agent = NodeAgent(options, log, ours)
    server = None
    if options.agent_socket is not None:
        from ..cniserver import CniServer

        server = CniServer(options.agent_socket, log)
        server.start()  # before our entry names it: the first ADD must find it listening
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    http_server = serve_readiness(agent, options.readiness_port, server) if options.readiness_port else None
    try:
        agent.install()
    except OSError as exc:
        log("error", "cannot install the plugin binary", error=str(exc))
        if server is not None:
            server.stop()
        if http_server:
            http_server.shutdown()
        return 1
    log("info", "agent started", bin_dir=str(options.cni_bin_dir), conf_dir=str(options.cni_conf_dir))
    try:
        while not stop.is_set():
            agent.reconcile()
            stop.wait(options.poll_interval)
    finally:
        if options.uninstall_on_exit:
            log("info", "stopping: uninstalling")
            agent.uninstall()  # the CNI server keeps serving through the grace period
        if server is not None:
            server.stop()
        if http_server:
            http_server.shutdown()
        log("info", "agent stopped")
    return 0
