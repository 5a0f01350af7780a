"""Probes that reach this agent and no other: a UNIX socket in the container's own filesystem.

The DaemonSet is host-network, so two agents on a node (old and new during a
surge) share every TCP port: kubelet's HTTP probe of the new pod could be
answered by the old agent. `cni-redirect ready` and `cni-redirect healthy`,
run by kubelet as exec probes inside the pod's container, ask the agent of that
container over `--probe-socket`, a path in the pod's private emptyDir, and exit
0 or 1 with the agent's own reason. The client side imports only `socket`:
it runs every few seconds.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from ...threads import NamedThread

QUESTIONS = ("ready", "healthy")
TIMEOUT = 3.0


def ask(path: str, question: str) -> tuple[bool, str]:
    """(answered ok, the agent's text); a socket nobody answers is (False, why)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(TIMEOUT)
            conn.connect(path)
            conn.sendall(question.encode() + b"\n")
            chunks = []
            while True:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
    except OSError as exc:
        return False, f"no agent answers on {path}: {exc.strerror or exc}"
    text = b"".join(chunks).decode(errors="replace")
    return text.startswith("ok"), text.rstrip("\n")


def main(argv: list[str]) -> int:
    """`cni-redirect ready|healthy [--probe-socket PATH]`: the exec probes' whole program."""
    question, rest = argv[0], argv[1:]
    path = os.environ.get("PROBE_SOCKET", "")
    if len(rest) == 2 and rest[0] == "--probe-socket":
        path = rest[1]
    elif len(rest) == 1 and rest[0].startswith("--probe-socket="):
        path = rest[0].split("=", 1)[1]
    elif rest or not path:
        os.write(2, f"usage: cni-redirect {question} --probe-socket PATH (or PROBE_SOCKET)\n".encode())
        return 2
    ok, text = ask(path, question)
    os.write(1 if ok else 2, text.encode() + b"\n")
    return 0 if ok else 1


class ProbeServer:
    """Answers `ready` and `healthy` from `answer(question)` ("" when all is well, else the reason)."""

    def __init__(self, path: Path, answer: Callable[[str], str]) -> None:
        self.path = path
        self.answer = answer
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            self.path.unlink()  # a private path: only this container's earlier agent left it
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.listen(16)
        self.sock = sock
        NamedThread(self._loop, "probe", (sock,)).start()

    def _loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                if self.sock is not sock:
                    return  # closed
                continue
            with conn:
                try:
                    conn.settimeout(2.0)
                    question = conn.recv(64).decode(errors="replace").strip()
                    if question not in QUESTIONS:
                        conn.sendall(b"unknown question\n")
                        continue
                    reason = self.answer(question)
                    conn.sendall(f"{reason}\n".encode() if reason else b"ok\n")
                except Exception:  # one broken probe connection is that probe's failure
                    continue

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            with suppress(FileNotFoundError):
                self.path.unlink()
