"""The nftables ruleset generation of the calling thread's netns: one netlink round trip, no libnftables.

The kernel counts every committed nftables transaction in a netns (its
generation id, `NFT_MSG_GETGEN`). Repair remembers the generation it last
compared a pod's table at: an unchanged generation means no transaction ran
in that netns since, so the table is as it was, and nothing needs listing.
Call it inside the pod netns (a session entered it): the socket opens in the
calling thread's netns. Stdlib only.
"""

from __future__ import annotations

import socket
import struct

from .errors import KernelError
from .netlink import ATTR as _ATTR
from .netlink import HEADER as _HEADER
from .netlink import NETLINK_NETFILTER, NLM_F_REQUEST, NLMSG_ERROR

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (big-endian, 0 here)


def ruleset_generation() -> int:
    """The netns's nftables generation id."""
    request_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    message = _HEADER.pack(_HEADER.size + len(body), request_type, NLM_F_REQUEST, 1, 0) + body
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER) as nl:
            nl.settimeout(5)
            nl.sendto(message, (0, 0))
            reply = nl.recv(4096)
    except OSError as exc:
        raise KernelError("reading the nftables generation failed", str(exc), exc.errno) from None
    return _parse(reply)


def _parse(reply: bytes) -> int:
    if len(reply) < _HEADER.size:
        raise KernelError("reading the nftables generation failed", f"short reply ({len(reply)} bytes)")
    length, kind, _flags, _seq, _pid = _HEADER.unpack_from(reply)
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", reply, _HEADER.size)
        raise KernelError("reading the nftables generation failed", f"netlink error {-code}", -code)
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
        raise KernelError("reading the nftables generation failed", f"unexpected reply type {kind:#x}")
    offset = _HEADER.size + _NFGEN.size
    while offset + _ATTR.size <= min(length, len(reply)):
        size, attr = _ATTR.unpack_from(reply, offset)
        if size < _ATTR.size:
            break
        if attr & 0x3FFF == NFTA_GEN_ID and size >= _ATTR.size + 4:
            (generation,) = struct.unpack_from("!I", reply, offset + _ATTR.size)
            return int(generation)
        offset += (size + 3) & ~3
    raise KernelError("reading the nftables generation failed", "no NFTA_GEN_ID in the reply")
