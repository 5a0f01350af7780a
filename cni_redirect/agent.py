"""The warm side of the fast path: serve CNI requests from the thin front over a UNIX socket.

The agent already has pyroute2, pydantic and libnftables loaded, so a request
costs what the work costs: validate, setns, one transaction. It runs the same
dispatcher and plugin as the in-process path; only the backend differs: the
pod netns arrives as a file descriptor (SCM_RIGHTS), so the agent needs no
access to the runtime's netns directory.

Threads: each request runs in a worker thread that enters the pod netns and
returns to the agent's own before it finishes (`netns.entered`). A worker
that could not return is fatal: the process exits rather than keep a thread
in a pod's namespace.
"""

from __future__ import annotations

import io
import os
import socket
import stat
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from .backend import KernelBackend
from .front import MAGIC
from .logs import EventLog
from .netns import vet_netns_fd
from .plugin import RedirectPlugin
from .skel import dispatch

MAX_REQUEST = 64 * 1024 * 1024  # a config with 1 000 000 set elements stays well below this
HEADER = len(MAGIC) + 16


class FdBackend(KernelBackend):
    """The kernel backend, for a netns handed over as an fd instead of a path."""

    def __init__(self, netns_fd: int | None) -> None:
        self.netns_fd = netns_fd

    def _open(self, netns: str) -> int:
        if self.netns_fd is None:
            from .netns import NetnsGone

            raise NetnsGone(f'CNI_NETNS "{netns}" could not be opened by the plugin')
        fd = os.dup(self.netns_fd)
        try:
            vet_netns_fd(fd, netns)
        except BaseException:
            os.close(fd)
            raise
        return fd


def _own_netns() -> tuple[int, int]:
    st = os.stat("/proc/thread-self/ns/net")
    return st.st_dev, st.st_ino


class AgentServer:
    """Accept loop plus one worker thread per request, bounded."""

    def __init__(
        self,
        path: Path,
        log: Callable[..., None],
        max_workers: int = 64,
        backend_factory: Callable[[int | None], KernelBackend] = FdBackend,
    ) -> None:
        self.path = path
        self.log = log
        self.slots = threading.BoundedSemaphore(max_workers)
        self.backend_factory = backend_factory
        self.home = _own_netns()
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
                self.path.unlink()  # a stale socket from a previous agent
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: root only
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(256)
        self.sock = sock
        threading.Thread(target=self._accept_loop, name="cni-agent", daemon=True).start()
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
                uid = _peer_uid(conn)
                if uid != 0:
                    self.log("warning", "refused a request from a non-root peer", uid=uid)
                    return
                env, stdin, fds = _read_request(conn)
                code, out, err = self.handle(env, stdin, fds[0] if fds else None)
                conn.sendall(bytes([code]) + len(out).to_bytes(8, "big") + out + err)
            self.served += 1
        except Exception as exc:  # a broken request must never take the agent down
            self.failed += 1
            self.log("error", "request failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            for fd in fds:
                os.close(fd)
            self.slots.release()
            if _own_netns() != self.home:  # pragma: no cover - entered() returns or raises
                self.log("error", "a worker is stuck in a pod network namespace; exiting")
                os._exit(70)

    def handle(self, env: dict[str, str], stdin: bytes, netns_fd: int | None) -> tuple[int, bytes, bytes]:
        """Run one CNI command exactly as the in-process path would; return code, stdout, stderr."""
        out, err = io.StringIO(), io.StringIO()
        plugin = RedirectPlugin(self.backend_factory(netns_fd), EventLog(err))
        code = dispatch(plugin, env, stdin, out, err)
        return code, out.getvalue().encode(), err.getvalue().encode()


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder)


def _read_request(conn: socket.socket) -> tuple[dict[str, str], bytes, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, HEADER, 4)
    while len(data) < HEADER:
        more = conn.recv(HEADER - len(data))
        if not more:
            raise ValueError("truncated request header")
        data += more
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a cni-redirect request")
    env_len = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "big")
    stdin_len = int.from_bytes(data[len(MAGIC) + 8 : HEADER], "big")
    if env_len + stdin_len > MAX_REQUEST:
        raise ValueError(f"request of {env_len + stdin_len} bytes is too large")
    body = bytearray()
    while len(body) < env_len + stdin_len:
        chunk = conn.recv(min(1 << 20, env_len + stdin_len - len(body)))
        if not chunk:
            raise ValueError("truncated request body")
        body.extend(chunk)
    env = {}
    for item in bytes(body[:env_len]).split(b"\0"):
        key, sep, value = item.decode("utf-8", "replace").partition("=")
        if sep and key.startswith("CNI_"):
            env[key] = value
    return env, bytes(body[env_len:]), list(fds)
