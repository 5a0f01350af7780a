"""Helpers run inside network namespaces for the datapath benchmark (a separate process each).

python tools.py sink NETNS UID PORT            accept, read to EOF, close; forever
python tools.py connect NETNS UID HOST PORT SECONDS   count connections opened and closed
python tools.py stream NETNS UID HOST PORT MEGABYTES  one connection, report MB/s
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys
import time

CLONE_NEWNET = 0x40000000


def enter(netns: str, uid: int) -> None:
    fd = os.open(netns, os.O_RDONLY)
    if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")
    os.close(fd)
    if uid:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def sink(port: int) -> None:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen(1024)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        with conn:
            try:
                while conn.recv(1 << 20):
                    pass
            except ConnectionResetError:
                pass  # the connection benchmark closes with RST (no TIME_WAIT pile-up)


def connect(host: str, port: int, seconds: float) -> None:
    count, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        with socket.create_connection((host, port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        count += 1
    print(count / seconds)


def stream(host: str, port: int, megabytes: int) -> None:
    block = b"\0" * (1 << 20)
    start = time.perf_counter()
    with socket.create_connection((host, port)) as sock:
        for _ in range(megabytes):
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    print(megabytes / (time.perf_counter() - start))


if __name__ == "__main__":
    mode, netns, uid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    enter(netns, uid)
    if mode == "sink":
        sink(int(sys.argv[4]))
    elif mode == "connect":
        connect(sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
    else:
        stream(sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
