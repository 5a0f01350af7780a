"""Netlink dumps read as a stream: what a pod netns holds is read message by message, never whole.

A pod with NET_ADMIN in its own netns can fill it (300 000 set elements, 40 000
`ip rule`s). Libraries that return a dump as a list of parsed objects make the
reader's memory grow with whatever the pod put there. Here a dump is a
generator over (message type, payload) read 64 KiB at a time, so a caller that
keeps only what is ours, or stops at a bound, uses bounded memory. pyroute2
stays how we enter a netns and write routes, but its reads cannot stay within
the bound: in a netns holding 40 006 `ip rule`s, `IPRoute().get_rules()` peaked
at 168 MiB (14.8 s), 30.5 MiB with a fwmark `match`; this module's read of the
same, 97 KiB (0.53 s) (docs/reliability.md). Call inside
the netns to read: the socket opens in the calling thread's netns. Stdlib only.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

from .errors import KernelError

NETLINK_ROUTE = 0
NETLINK_NETFILTER = 12
NETLINK_GET_STRICT_CHK = 12
SOL_NETLINK = 270
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
HEADER = struct.Struct("=IHHII")  # struct nlmsghdr: len, type, flags, seq, pid
ATTR = struct.Struct("=HH")  # struct nlattr: len, type
NLA_TYPE_MASK = 0x3FFF


def attr(kind: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    raw = ATTR.pack(ATTR.size + len(value), kind) + value
    return raw + b"\0" * (-len(raw) % 4)


def attrs(payload: bytes, offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each attribute in `payload` from `offset`."""
    while offset + ATTR.size <= len(payload):
        size, kind = ATTR.unpack_from(payload, offset)
        if size < ATTR.size or offset + size > len(payload):
            return
        yield kind & NLA_TYPE_MASK, payload[offset + ATTR.size : offset + size]
        offset += (size + 3) & ~3


def messages(data: bytes, what: str) -> Iterator[tuple[int, bytes]]:
    """The messages in one buffer the kernel sent, as (type, payload after the header), up to NLMSG_DONE; an error
    message raises KernelError (an acknowledgement, error 0, is skipped). The one parser of netlink framing."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = HEADER.unpack_from(data, offset)
        if length < HEADER.size or offset + length > len(data):
            return  # a broken or cut message: what follows cannot be framed
        payload = data[offset + HEADER.size : offset + length]
        offset += (length + 3) & ~3
        if kind == NLMSG_DONE:
            yield kind, b""
            return
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", payload) if len(payload) >= 4 else (0,)
            if code == 0:
                continue
            raise KernelError(f"reading {what} failed", f"netlink error {-code}", -code)
        yield kind, payload


def _socket(protocol: int, what: str) -> socket.socket:
    try:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol)
    except OSError as exc:
        raise KernelError(f"reading {what} failed", str(exc), exc.errno) from None


def query(protocol: int, msg_type: int, body: bytes, what: str) -> tuple[int, bytes]:
    """One request, its one reply message (type, payload): a GET that is not a dump."""
    request = HEADER.pack(HEADER.size + len(body), msg_type, NLM_F_REQUEST, 1, 0) + body
    with _socket(protocol, what) as sock:
        try:
            sock.settimeout(5)
            sock.sendto(request, (0, 0))
            data = sock.recv(65536)
        except OSError as exc:
            raise KernelError(f"reading {what} failed", str(exc), exc.errno) from None
    for kind, payload in messages(data, what):
        return kind, payload
    raise KernelError(f"reading {what} failed", f"short reply ({len(data)} bytes)")


def change(protocol: int, msg_type: int, flags: int, body: bytes, what: str) -> None:
    """One change request (NLM_F_ACK added); returns once the kernel acknowledged it, KernelError if it refused."""
    request = HEADER.pack(HEADER.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK | flags, 1, 0) + body
    with _socket(protocol, what) as sock:
        try:
            sock.settimeout(5)
            sock.sendto(request, (0, 0))
            data = sock.recv(65536)
        except OSError as exc:
            raise KernelError(f"changing {what} failed", str(exc), exc.errno) from None
    try:
        for _ in messages(data, what):
            pass
    except KernelError as error:
        raise KernelError(f"changing {what} failed", error.details, error.errno) from None


def transaction(subsystem: int, msg_type: int, body: bytes, what: str) -> None:
    """One change through nfnetlink's batch (begin, the message asking for an acknowledgement, end); returns when
    the kernel acknowledged it, raises KernelError with its errno when it refused."""
    unspec = struct.pack("=BBH", 0, 0, socket.htons(subsystem))  # nfgenmsg: the batch's subsystem in res_id
    request = (
        HEADER.pack(HEADER.size + len(unspec), NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 1, 0) + unspec
        + HEADER.pack(HEADER.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_ACK, 2, 0) + body
        + HEADER.pack(HEADER.size + len(unspec), NFNL_MSG_BATCH_END, NLM_F_REQUEST, 3, 0) + unspec
    )  # fmt: skip
    with _socket(NETLINK_NETFILTER, what) as sock:
        try:
            sock.settimeout(30)  # a table of a million chains takes the kernel a while
            sock.sendto(request, (0, 0))
            data = sock.recv(65536)
        except OSError as exc:
            raise KernelError(f"changing {what} failed", str(exc), exc.errno) from None
    try:
        for _ in messages(data, what):  # an error message raises; the acknowledgement is skipped
            pass
    except KernelError as error:
        raise KernelError(f"changing {what} failed", error.details, error.errno) from None


def dump(protocol: int, msg_type: int, body: bytes, what: str, strict: bool = False) -> Iterator[tuple[int, bytes]]:
    """Each message of one dump request, as (type, payload after the header), until NLMSG_DONE.
    A caller may stop early: the socket closes when the generator does."""
    request = HEADER.pack(HEADER.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body
    with _socket(protocol, what) as sock:
        try:
            sock.settimeout(10)
            if strict:  # the kernel filters the dump by the request's fields (a route table)
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            sock.sendto(request, (0, 0))
        except OSError as exc:
            raise KernelError(f"reading {what} failed", str(exc), exc.errno) from None
        while True:
            try:
                data = sock.recv(65536)
            except OSError as exc:
                raise KernelError(f"reading {what} failed", str(exc), exc.errno) from None
            if not data:
                return
            for kind, payload in messages(data, what):
                if kind == NLMSG_DONE:
                    return
                yield kind, payload
