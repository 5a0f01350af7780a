"""Test helper run as a subprocess: enter a netns, drop to a UID, then listen or connect.

    python nettools.py --netns PATH [--uid U --gid G] listen NAME PORT [--udp] [--bind ADDR]
    python nettools.py --netns PATH [--uid U --gid G] connect HOST PORT [--udp] [--source ADDR]

A TCP listener answers each connection with one JSON line: its NAME, the
peer, and SO_ORIGINAL_DST. NAME tells a test *which* listener accepted a
connection, the only proof of capture (conntrack answers SO_ORIGINAL_DST
for every connection). A UDP listener answers each datagram the same way,
without the original destination. `connect` prints the answer it got.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import selectors
import signal
import socket
import struct
import sys

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
CLONE_NEWNET = 0x40000000


def enter(netns: str | None, uid: int | None, gid: int | None) -> None:
    if netns:
        fd = os.open(netns, os.O_RDONLY)
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {netns}")
        os.close(fd)
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def original_dst(conn: socket.socket) -> str:
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack_from("!H", raw, 2)[0]
        return f"[{socket.inet_ntop(socket.AF_INET6, raw[8:24])}]:{port}"
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return f"{socket.inet_ntoa(raw[4:8])}:{port}"


def listen(name: str, port: int, udp: bool, bind: str) -> None:
    """Listen on IPv4 and IPv6 with one socket each, so SO_ORIGINAL_DST is asked in the right family."""
    kind = socket.SOCK_DGRAM if udp else socket.SOCK_STREAM
    binds = (
        [(socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")]
        if bind == "any"
        else [(socket.AF_INET6 if ":" in bind else socket.AF_INET, bind)]
    )
    selector = selectors.DefaultSelector()
    for family, address in binds:
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        if not udp:
            sock.listen(64)
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = key.fileobj
            if udp:
                _, peer = sock.recvfrom(2048)
                reply = {"listener": name, "uid": os.getuid(), "peer": peer[0]}
                sock.sendto(json.dumps(reply).encode() + b"\n", peer)
                continue
            conn, peer = sock.accept()
            with conn:
                try:
                    orig = original_dst(conn)
                except OSError:
                    orig = None
                reply = {"listener": name, "uid": os.getuid(), "peer": peer[0], "original_dst": orig}
                conn.sendall(json.dumps(reply).encode() + b"\n")


def connect(host: str, port: int, udp: bool, source: str | None, timeout: float) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if source:
        sock.bind((source, 0))
    try:
        if udp:
            sock.sendto(b"query", (host, port))
            data = sock.recv(2048)
        else:
            sock.connect((host, port))
            data = sock.makefile("rb").readline()
    except OSError as exc:
        print(json.dumps({"error": type(exc).__name__, "detail": str(exc)}))
        return
    sys.stdout.write(data.decode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--netns")
    parser.add_argument("--uid", type=int)
    parser.add_argument("--gid", type=int)
    sub = parser.add_subparsers(dest="mode", required=True)
    lis = sub.add_parser("listen")
    lis.add_argument("name")
    lis.add_argument("port", type=int)
    lis.add_argument("--udp", action="store_true")
    lis.add_argument("--bind", default="any")
    con = sub.add_parser("connect")
    con.add_argument("host")
    con.add_argument("port", type=int)
    con.add_argument("--udp", action="store_true")
    con.add_argument("--source")
    con.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    enter(args.netns, args.uid, args.gid if args.gid is not None else args.uid)
    if args.mode == "listen":
        listen(args.name, args.port, args.udp, args.bind)
    else:
        connect(args.host, args.port, args.udp, args.source, args.timeout)


if __name__ == "__main__":
    main()
