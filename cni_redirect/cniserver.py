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
in a pod's namespace. Requests for the same netns run one at a time.

The accept loop survives transient errors (EMFILE, ENOMEM, ECONNABORTED):
it logs, backs off up to a second, and goes on. `problem()` says when the
server is really dead (the loop ended, the socket was taken away), so the
node agent's /healthz fails and kubelet restarts it.
"""

from __future__ import annotations

import io
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from . import wire
from .backend import Backend, KernelBackend
from .logs import EventLog
from .netns import own_netns, received_fd
from .plugin import RedirectPlugin
from .skel import Reply, answer
from .threads import NamedThread


def kernel_backend(netns_fd: int | None) -> Backend:
    """The real backend, reaching the netns through the fd the front handed over."""
    return KernelBackend(received_fd(netns_fd))


MAX_BACKOFF = 1.0


def _hung_up(conn: socket.socket) -> bool:
    poller = select.poll()
    poller.register(conn, select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


class NetnsLocks:
    """One lock per network namespace (by device and inode of its fd), alive while someone holds it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[tuple[int, int], list] = {}

    @contextmanager
    def held(self, netns_fd: int | None) -> Iterator[None]:
        if netns_fd is None:
            yield
            return
        st = os.fstat(netns_fd)
        key = (st.st_dev, st.st_ino)
        with self._mutex:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._mutex:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


class CniServer:
    """Accept loop plus one worker thread per request, bounded."""

    def __init__(
        self,
        path: Path,
        log: Callable[..., None],
        max_workers: int = 64,
        backend_factory: Callable[[int | None], Backend] = kernel_backend,
        observe: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.path = path
        self.log = log
        self.slots = threading.BoundedSemaphore(max_workers)
        self.backend_factory = backend_factory
        self.observe = observe  # (command, CNI code, seconds) of each answered request: metrics
        self.home = own_netns()
        self.sock: socket.socket | None = None
        self.created_dir = False
        self.served = 0
        self.failed = 0
        self.accept_errors = 0
        self.abandoned = 0
        self.in_flight = 0
        self.last_accept = 0.0
        self._counts = threading.Lock()
        self.locks = NetnsLocks()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._bound: tuple[int, int] | None = None
        self._staging: Path | None = None

    def start(self) -> None:
        self.bind()
        self.publish()

    def bind(self) -> None:
        """Listen under a private temp name: serving, but nobody reaches it yet (the node agent publishes it
        only once it can do its job, so a successor that fails to install never takes the shared path)."""
        # Load now what every request needs, so the first pod does not pay for it.
        import nftables  # noqa: F401
        from pyroute2.netns import setns  # noqa: F401

        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)  # kubelet's DirectoryOrCreate makes it 0755: root only, as documented
        # A random name (every agent in a container is PID 1): bind() creates it exclusively.
        staging = self.path.with_name(f".{self.path.name}.{secrets.token_hex(8)}.tmp")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: root only
        try:
            sock.bind(str(staging))
        finally:
            os.umask(old_umask)
        os.chmod(staging, 0o600)
        sock.listen(256)
        st = staging.stat()
        self._bound = (st.st_dev, st.st_ino)
        self._staging = staging
        self.sock = sock
        self._stopping.clear()
        self._thread = NamedThread(self._accept_loop, "cni-server")
        self._thread.start()

    def publish(self) -> None:
        """Rename over the shared path: a predecessor's socket is replaced in one step, so every new
        connection reaches this server and none finds no socket."""
        if self._staging is None:
            raise RuntimeError("publish() before bind()")
        os.replace(self._staging, self.path)
        self._staging = None
        self.log("info", "agent serving CNI requests", socket=str(self.path))

    def take_path(self) -> None:
        """Make the shared path ours: publish what is bound, or, if a successor replaced our socket and went
        away (its dead socket, or none, is there), bind a new one and publish it."""
        if self.sock is not None and self._staging is None and self.owns_path():
            return
        if self._staging is None:
            self.stop()
            self.bind()
        self.publish()

    def owns_path(self) -> bool:
        """Whether the socket path is still the socket this server bound (not removed, not replaced)."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._bound

    def problem(self, own_path: bool = True) -> str:
        """Why the server cannot serve, or "" when it can: for the node agent's health probe. `own_path` False:
        the shared path is expected to be another agent's (a standby agent)."""
        if self.sock is None or self._thread is None:
            return "CNI server not started"
        if not self._thread.is_alive():
            return "CNI server accept loop has stopped"
        if own_path and self._staging is None and not self.owns_path():
            return f"CNI server socket {self.path} is gone or was replaced"
        return ""

    def drain(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """A successor took the path: serve what was queued on our socket and what is in flight, then stop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.in_flight == 0 and time.monotonic() - self.last_accept >= quiet:
                break
            time.sleep(0.05)
        self.stop()

    def stop(self) -> None:
        self._stopping.set()
        if self.sock is not None:
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
            self.sock = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._staging is not None:  # never published: the shared path is another agent's, or nobody's
            with suppress(FileNotFoundError):
                self._staging.unlink()
            self._staging = None
        elif self.owns_path():  # never a path another agent has taken since
            self.path.unlink()
        if self.created_dir:
            with suppress(OSError):
                self.path.parent.rmdir()

    def _accept_loop(self) -> None:
        backoff = 0.0
        while not self._stopping.is_set():
            sock = self.sock
            if sock is None:
                return
            try:
                conn, _ = sock.accept()
                self.last_accept = time.monotonic()
                backoff = 0.0
                self.slots.acquire()
                try:
                    NamedThread(self._serve, "cni-request", (conn,)).start()
                except BaseException:
                    self.slots.release()
                    conn.close()
                    raise
            except Exception as exc:  # EMFILE, ENOMEM, ECONNABORTED, no thread: transient, never fatal
                if self._stopping.is_set():
                    return
                self.accept_errors += 1
                backoff = min(MAX_BACKOFF, max(0.01, backoff * 2))
                self.log(
                    "error", "CNI server could not accept a connection; retrying", error=str(exc), retry_in=backoff
                )
                self._stopping.wait(backoff)

    def _serve(self, conn: socket.socket) -> None:
        """Serve one request. The connection closes last: a front that sees its reply end
        (EOF) may rely on the request's fds being closed and the request being counted."""
        fds: list[int] = []
        with self._counts:
            self.in_flight += 1
        try:
            conn.settimeout(30)
            uid = wire.peer_uid(conn)
            if uid != 0:
                self.log("warning", "refused a request from a non-root peer", uid=uid)
                return
            env, stdin, fds = wire.read_request(conn)
            netns_fd = fds[0] if fds else None
            with self.locks.held(netns_fd):  # two ADDs for one pod never interleave
                if _hung_up(conn):  # the front timed out and did the work itself: never run it late
                    self.log("warning", "skipped a request its front gave up on", command=env.get("CNI_COMMAND"))
                    with self._counts:
                        self.abandoned += 1
                    return
                started = time.monotonic()
                reply, out, err = self.handle(env, stdin, netns_fd)
            conn.sendall(wire.encode_reply(reply.exit_code, out, err))
            if self.observe is not None:
                self.observe(env.get("CNI_COMMAND", ""), reply.cni_code, time.monotonic() - started)
            with self._counts:
                self.served += 1
        except Exception as exc:  # a broken request must never take the server down
            with self._counts:
                self.failed += 1
            self.log("error", "request failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
            with self._counts:
                self.in_flight -= 1
            conn.close()
            self.slots.release()
            if own_netns() != self.home:  # pragma: no cover - entered() returns or raises
                self.log("error", "a worker is stuck in a pod network namespace; exiting")
                os._exit(70)

    def handle(self, env: dict[str, str], stdin: bytes, netns_fd: int | None) -> tuple[Reply, bytes, bytes]:
        """Run one CNI command exactly as the in-process path would; return how it ended, stdout, stderr."""
        out, err = io.StringIO(), io.StringIO()
        plugin = RedirectPlugin(self.backend_factory(netns_fd), EventLog(err), via="cni-server")
        reply = answer(plugin, env, stdin, out, err)
        return reply, out.getvalue().encode(), err.getvalue().encode()
