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
from .netlink import NETLINK_NETFILTER, attrs, query

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (big-endian, 0 here)
WHAT = "the nftables generation"


def ruleset_generation() -> int:
    """The netns's nftables generation id."""
    request_type = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN
    kind, payload = query(NETLINK_NETFILTER, request_type, _NFGEN.pack(socket.AF_UNSPEC, 0, 0), WHAT)
    return generation_of(kind, payload)


def generation_of(kind: int, payload: bytes) -> int:
    """The generation id in a NEWGEN reply (the message's type and its payload after the netlink header)."""
    if kind != (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN:
        raise KernelError(f"reading {WHAT} failed", f"unexpected reply type {kind:#x}")
    for attr, value in attrs(payload, _NFGEN.size):
        if attr == NFTA_GEN_ID and len(value) >= 4:
            return int(struct.unpack_from("!I", value)[0])
    raise KernelError(f"reading {WHAT} failed", "no NFTA_GEN_ID in the reply")
