"""The CNI server: the warm side of the fast path, serving the thin front's requests on a UNIX socket.

It already has pyroute2, pydantic and libnftables loaded, so a request costs
what the work costs: validate, setns, one transaction. It runs the same
dispatcher and plugin as the in-process path; only the way to the netns
differs: the pod netns arrives as a file descriptor (SCM_RIGHTS), so the
server needs no access to the runtime's netns directory.

The node agent (`cni-redirect install`) starts one when it is given
`--agent-socket`; `cni-redirect agent` runs one alone.

Threads: each request runs in a worker thread that enters the pod netns and
returns to the server's own before it finishes (`netns.entered`). A worker
that could not return is fatal: the process exits rather than keep a thread
in a pod's namespace.
"""

from __future__ import annotations

import io
import os
import socket
import stat
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from . import wire
from .backend import Backend, KernelBackend
from .logs import EventLog
from .netns import own_netns, received_fd
from .plugin import RedirectPlugin
from .skel import dispatch


def kernel_backend(netns_fd: int | None) -> Backend:
    """The real backend, reaching the netns through the fd the front handed over."""
    return KernelBackend(received_fd(netns_fd))


class CniServer:
    """Accept loop plus one worker thread per request, bounded."""

    def __init__(
        self,
        path: Path,
        log: Callable[..., None],
        max_workers: int = 64,
        backend_factory: Callable[[int | None], Backend] = kernel_backend,
    ) -> None:
        self.path = path
        self.log = log
        self.slots = threading.BoundedSemaphore(max_workers)
        self.backend_factory = backend_factory
        self.home = own_netns()
        self.sock: socket.socket | None = None
        self.created_dir = False
        self.served = 0
        self.failed = 0

    def start(self) -> None:
        # Load now what every request needs, so the first pod does not pay for it.
        import nftables  # noqa: F401
        from pyroute2.netns import setns  # noqa: F401

        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()  # a stale socket from a previous server
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: root only
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(256)
        self.sock = sock
        threading.Thread(target=self._accept_loop, name="cni-server", daemon=True).start()
        self.log("info", "agent serving CNI requests", socket=str(self.path))

    def stop(self) -> None:
        if self.sock is not None:
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        with suppress(FileNotFoundError):
            self.path.unlink()
        if self.created_dir:
            with suppress(OSError):
                self.path.parent.rmdir()

    def _accept_loop(self) -> None:
        while self.sock is not None:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.slots.acquire()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            with conn:
                conn.settimeout(30)
                uid = wire.peer_uid(conn)
                if uid != 0:
                    self.log("warning", "refused a request from a non-root peer", uid=uid)
                    return
                env, stdin, fds = wire.read_request(conn)
                code, out, err = self.handle(env, stdin, fds[0] if fds else None)
                conn.sendall(wire.encode_reply(code, out, err))
            self.served += 1
        except Exception as exc:  # a broken request must never take the server down
            self.failed += 1
            self.log("error", "request failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
            self.slots.release()
            if own_netns() != self.home:  # pragma: no cover - entered() returns or raises
                self.log("error", "a worker is stuck in a pod network namespace; exiting")
                os._exit(70)

    def handle(self, env: dict[str, str], stdin: bytes, netns_fd: int | None) -> tuple[int, bytes, bytes]:
        """Run one CNI command exactly as the in-process path would; return code, stdout, stderr."""
        out, err = io.StringIO(), io.StringIO()
        plugin = RedirectPlugin(self.backend_factory(netns_fd), EventLog(err))
        code = dispatch(plugin, env, stdin, out, err)
        return code, out.getvalue().encode(), err.getvalue().encode()
