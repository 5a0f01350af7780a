"""Test helper run as a subprocess: enter a netns, drop to a UID, then listen or connect.

    python nettools.py --netns PATH [--uid U --gid G] listen NAME PORT [--udp] [--bind ADDR]
    python nettools.py --netns PATH [--uid U --gid G] connect HOST PORT [--udp] [--source ADDR]
    python nettools.py --netns PATH --uid 1337 istio-validate      (exit 0, or 126 after 5 s)
    python nettools.py --netns PATH --uid 65534 linkerd-validate   (exit 0, or 95 after 10 s)

A TCP listener answers each connection with one JSON line: its NAME, the
peer, and SO_ORIGINAL_DST. NAME tells a test *which* listener accepted a
connection, the only proof of capture (conntrack answers SO_ORIGINAL_DST
for every connection). A UDP listener answers each datagram the same way,
without the original destination. `connect` prints the answer it got.
`--transparent` makes a TPROXY listener (IP_TRANSPARENT, needs root): its
answer adds `local`, the address the client dialled.

The two validators reproduce what the meshes' own init containers check
(Istio's istio-validation, Linkerd's linkerd-network-validator) so that a
test can show they pass on our rules; they are written here, not copied.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import secrets
import selectors
import signal
import socket
import string
import struct
import sys
import threading
import time
from typing import cast

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
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


def listen(name: str, port: int, udp: bool, bind: str, transparent: bool = False) -> None:
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
        if transparent and family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        elif transparent:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        sock.bind((address, port))
        if not udp:
            sock.listen(64)
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            sock = cast(socket.socket, key.fileobj)
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
                local = conn.getsockname()
                reply["local"] = (
                    f"[{local[0]}]:{local[1]}" if conn.family == socket.AF_INET6 else f"{local[0]}:{local[1]}"
                )
                conn.sendall(json.dumps(reply).encode() + b"\n")


def connect(host: str, port: int, udp: bool, source: str | None, timeout: float, mark: int | None = None) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    sock.settimeout(timeout)
    if mark is not None:  # as a proxy marks its own connections (SO_MARK: needs CAP_NET_ADMIN, so uid 0 here)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
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


def sniff_syns(interface: str) -> None:
    """Every TCP SYN (and SYN-ACK) on `interface`, as a JSON line: family, addresses, ports, whether it is a
    SYN-ACK, the MSS it offers. Ready once bound; runs until killed."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))  # ETH_P_ALL, no link header
    sock.bind((interface, 0))
    print("ready", flush=True)
    while True:
        packet, address = sock.recvfrom(65536)
        if address[2] == socket.PACKET_OUTGOING and interface != "lo":
            continue  # each frame once: as it arrives at this end
        found = _syn(packet)
        if found is not None:
            print(json.dumps(found), flush=True)


def _syn(packet: bytes) -> dict | None:
    version = packet[0] >> 4 if packet else 0
    if version == 4:
        offset, proto = (packet[0] & 0xF) * 4, packet[9]
        src, dst = socket.inet_ntop(socket.AF_INET, packet[12:16]), socket.inet_ntop(socket.AF_INET, packet[16:20])
    elif version == 6:
        offset, proto = 40, packet[6]
        src, dst = socket.inet_ntop(socket.AF_INET6, packet[8:24]), socket.inet_ntop(socket.AF_INET6, packet[24:40])
    else:
        return None
    tcp = packet[offset:]
    if proto != 6 or len(tcp) < 20 or not tcp[13] & 0x02:
        return None
    mss, options, i = None, tcp[20 : (tcp[12] >> 4) * 4], 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        length = options[i + 1] if i + 1 < len(options) else 0
        if kind == 2 and length == 4:
            mss = int.from_bytes(options[i + 2 : i + 4], "big")
        i += max(length, 2)
    sport, dport = int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")
    return {"family": version, "src": src, "dst": dst, "sport": sport, "dport": dport,
            "syn_ack": bool(tcp[13] & 0x10), "mss": mss}  # fmt: skip


def forward(port: int, source: str | None, timeout: float, transparent: bool = False, to: str | None = None) -> None:
    """A stand-in sidecar that forwards: accept a captured connection, dial its original destination (from
    `source`, Istio's 127.0.0.6 for inbound, else the pod's own address), relay the one line the server sends.
    One connection at a time."""
    servers = []
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if transparent:  # TPROXY hands connections to a transparent socket: the local address is the dialled one
            level, option = (
                (socket.SOL_IP, IP_TRANSPARENT) if family == socket.AF_INET else (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)
            )
            server.setsockopt(level, option, 1)
        server.bind((address, port))
        server.listen(512)
        servers.append(server)
    selector = selectors.DefaultSelector()
    for server in servers:
        selector.register(server, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            conn, _peer = cast(socket.socket, key.fileobj).accept()
            with conn:
                try:
                    local = conn.getsockname()
                    dialled = f"[{local[0]}]:{local[1]}" if conn.family == socket.AF_INET6 else f"{local[0]}:{local[1]}"
                    target = to or (dialled if transparent else original_dst(conn))
                    host, _, dport = target.rpartition(":")
                    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
                    with socket.socket(family, socket.SOCK_STREAM) as upstream:
                        upstream.settimeout(timeout)
                        if source:
                            upstream.bind((source, 0))
                        upstream.connect((host.strip("[]"), int(dport)))
                        line = upstream.makefile("rb").readline()
                    conn.sendall(line)
                except OSError as exc:  # the client sees its connection closed without a line: a failure it counts
                    print(json.dumps({"upstream": target, "error": errno.errorcode.get(exc.errno or 0, str(exc))}),
                          file=sys.stderr, flush=True)  # fmt: skip


def burst(host: str, port: int, count: int, timeout: float, rate: float = 0.0) -> None:
    """`count` short connections one after another (at most `rate` a second), each reading one line; a JSON
    summary of how they went (failures by errno name)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    failures: dict[str, int] = {}
    answered: dict[str, int] = {}  # by the address the answering listener saw the connection come from
    slow, start = 0, time.monotonic()
    for n in range(count):
        if rate:
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
        began = time.monotonic()
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect((host, port))
                line = sock.makefile("rb").readline()
                if not line:
                    raise ConnectionResetError("closed without a line")
                peer = str(json.loads(line).get("peer"))
                answered[peer] = answered.get(peer, 0) + 1
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            failures[name] = failures.get(name, 0) + 1
        slow += time.monotonic() - began > 0.5
    print(json.dumps({"count": count, "failed": sum(failures.values()), "failures": failures, "slow": slow,
                      "answered_from": answered, "seconds": round(time.monotonic() - start, 2)}))  # fmt: skip


def istio_validate(timeout: float = 5.0) -> int:
    """Istio's check: the proxy UID's connection to 127.0.0.6:15002 arrives on 15001 or 15006 with
    original destination port 15002 (the own-IP rule works). 0 on success, 126 (Istio's code) otherwise."""
    selector = selectors.DefaultSelector()
    for port in (15001, 15006):
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(8)
        selector.register(server, selectors.EVENT_READ)
    client = socket.socket()
    client.settimeout(timeout)
    try:
        client.connect(("127.0.0.6", 15002))
    except OSError as exc:
        print(json.dumps({"validator": "istio", "error": str(exc)}))
        return 126
    for key, _ in selector.select(timeout):
        listener = cast(socket.socket, key.fileobj)
        conn, _ = listener.accept()
        with conn:
            port = int(original_dst(conn).rsplit(":", 1)[1])
        accepted_on = listener.getsockname()[1]
        print(json.dumps({"validator": "istio", "accepted_on": accepted_on, "original_port": port}))
        return 0 if port == 15002 else 126
    print(json.dumps({"validator": "istio", "error": "no connection arrived"}))
    return 126


def linkerd_validate(timeout: float = 10.0, listen_addr=("0.0.0.0", 4140), connect_addr=("192.0.2.2", 1404)) -> int:
    """Linkerd's check: a connection to an unroutable address must reach our own server on the
    outbound port, proven by the random token that server sends. 0 on success, 95 otherwise."""
    token = ("".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(63)) + "\n").encode()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(listen_addr)
    server.listen(8)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            with conn:
                conn.sendall(token)

    threading.Thread(target=serve, daemon=True).start()
    client = socket.socket()
    client.settimeout(timeout)
    try:
        client.connect(connect_addr)
        data = b""
        while len(data) < len(token):
            chunk = client.recv(len(token) - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        print(json.dumps({"validator": "linkerd", "error": str(exc)}))
        return 95
    ok = data == token
    print(json.dumps({"validator": "linkerd", "token_echoed": ok}))
    return 0 if ok else 95


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
    lis.add_argument("--transparent", action="store_true")
    sub.add_parser("istio-validate").add_argument("--timeout", type=float, default=5.0)
    sub.add_parser("linkerd-validate").add_argument("--timeout", type=float, default=10.0)
    sub.add_parser("sniff-syns").add_argument("interface")
    fwd = sub.add_parser("forward")
    fwd.add_argument("port", type=int)
    fwd.add_argument("--source")
    fwd.add_argument("--timeout", type=float, default=2.0)
    fwd.add_argument("--transparent", action="store_true")
    fwd.add_argument("--to", help="HOST:PORT to dial for every connection (an explicit proxy)")
    bur = sub.add_parser("burst")
    bur.add_argument("host")
    bur.add_argument("port", type=int)
    bur.add_argument("count", type=int)
    bur.add_argument("--timeout", type=float, default=2.0)
    bur.add_argument("--rate", type=float, default=0.0)
    con = sub.add_parser("connect")
    con.add_argument("host")
    con.add_argument("port", type=int)
    con.add_argument("--udp", action="store_true")
    con.add_argument("--source")
    con.add_argument("--timeout", type=float, default=2.0)
    con.add_argument("--mark", type=lambda text: int(text, 0))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    enter(args.netns, args.uid, args.gid if args.gid is not None else args.uid)
    if args.mode == "listen":
        listen(args.name, args.port, args.udp, args.bind, args.transparent)
    elif args.mode == "istio-validate":
        sys.exit(istio_validate(args.timeout))
    elif args.mode == "linkerd-validate":
        sys.exit(linkerd_validate(args.timeout))
    elif args.mode == "sniff-syns":
        sniff_syns(args.interface)
    elif args.mode == "forward":
        forward(args.port, args.source, args.timeout, args.transparent, args.to)
    elif args.mode == "burst":
        burst(args.host, args.port, args.count, args.timeout, args.rate)
    else:
        connect(args.host, args.port, args.udp, args.source, args.timeout, args.mark)


if __name__ == "__main__":
    main()
