"""Which pod netns had an nftables transaction since a pass read it: heard in the node's netns, not read in each.

A remembered repair pass used to cost, per pod, a netns entry and one netlink round trip for the nftables
generation: most of an idle agent's CPU (docs/benchmarks.md §8). The kernel can say it instead. A netlink
socket in the node's netns, in the nftables multicast group with NETLINK_LISTEN_ALL_NSID, hears the messages
of every committed nftables transaction (NEWGEN ends each) in every netns that has an id in the node's netns,
with that id attached. A veth pair across two netns gives the pod's netns an id: the bridge and ptp plugins'
pods, and most primaries', have one.

So a pod netns that has an id, is still the same netns (the inode behind its path), and sent nothing since a
pass read its generation has had no transaction: the pass need not enter it. The kernel queues the message
before the transaction's syscall returns, so a transaction that a read could see was queued before the read,
or is taken in by the next pass, which then reads that pod. Everything else is read as before:

- a netns without an id (we never assign one to a pod's netns: that would be a change in the node's netns);
- every pod, once, after the socket's buffer overflowed (ENOBUFS: messages were lost);
- every pod, always, on a kernel that does not deliver across netns: `open` proves delivery first, with a
  netns of our own (made, given an id, written to once and gone again, in a few milliseconds).

Only the repair loop of the node agent uses it; stdlib only (ctypes for unshare).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from ...errors import KernelError
from ...netlink import NETLINK_NETFILTER, NETLINK_ROUTE, SOL_NETLINK, attr, attrs, change, query, transaction
from ...nftgen import NFNL_SUBSYS_NFTABLES

NFNLGRP_NFTABLES = 7
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_LISTEN_ALL_NSID = 8
RTM_NEWNSID, RTM_GETNSID = 88, 90
NETNSA_NSID, NETNSA_FD = 1, 3
NFT_MSG_NEWTABLE = 0
NFTA_TABLE_NAME = 1
SO_RCVBUFFORCE = 33  # socket(7): root may exceed rmem_max; the socket module does not name it
RECEIVE_BUFFER = 4 << 20  # ~20 000 messages: a node's worth of pod starts between two passes
PROBE_TABLE = b"cni_redirect_probe\0"
_RTGEN = struct.Struct("=B3x")  # struct rtgenmsg, padded as the kernel reads it
_NFGEN = struct.Struct("=BBH")


@dataclass(frozen=True)
class Heard:
    """A pod netns as the events name it (`nsid`, in the node's netns) and as itself (its nsfs inode)."""

    nsid: int
    inode: tuple[int, int]


class TransactionEvents(Protocol):
    """What the survey asks: the pass's number, a netns's name in the events, and whether it was quiet."""

    def advance(self) -> int:
        """Take in every message that arrived; the new pass's number (reads in it come after these messages)."""

    def identify(self, netns: str) -> Heard | None:
        """How the events name that netns; None when they cannot (no id, or gone)."""

    def quiet(self, netns: str, heard: Heard, read_in: int) -> bool:
        """Still that netns, and no transaction in it since a read made in pass `read_in`."""


def inode_of(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def nsid_of(fd: int) -> int | None:
    """The id the node's netns (the calling thread's) has for the netns behind `fd`; None when it has none."""
    kind, payload = query(NETLINK_ROUTE, RTM_GETNSID, _RTGEN.pack(socket.AF_UNSPEC) + attr(NETNSA_FD, _u32(fd)),
                          "a netns's id")  # fmt: skip
    if kind != RTM_NEWNSID:
        return None
    for kind, value in attrs(payload, _RTGEN.size):
        if kind == NETNSA_NSID and len(value) >= 4:
            nsid = int(struct.unpack_from("=i", value)[0])
            return nsid if nsid >= 0 else None
    return None


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


class NftablesEvents:
    """The socket, and when each netns id was last heard from (by pass number)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pass_number = 0
        self.heard_in: dict[int, int] = {}  # nsid -> the pass that took in its last message
        self.lost_in = 0  # the pass that found messages lost: reads before it prove nothing
        self.messages = 0

    @classmethod
    def open(cls) -> NftablesEvents:
        """The socket, with delivery across netns proven on this kernel; KernelError saying why when it is not."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                             NETLINK_NETFILTER)  # fmt: skip
        try:
            sock.bind((0, 0))
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECEIVE_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            sock.setsockopt(SOL_NETLINK, NETLINK_LISTEN_ALL_NSID, 1)
            events = cls(sock)
            events.prove()
        except OSError as exc:
            sock.close()
            raise KernelError("listening for nftables transactions failed", str(exc), exc.errno) from None
        except BaseException:
            sock.close()
            raise
        return events

    def close(self) -> None:
        self.sock.close()

    def prove(self, timeout: float = 2.0) -> None:
        """A netns of our own, an id for it, one transaction in it: its message must arrive here with that id."""
        nsid = _transaction_in_a_netns_of_our_own()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if nsid in self._take_in():  # taken in here, never recorded: the probe's netns is no pod's
                return
            time.sleep(0.01)
        why = "a transaction in another netns was not heard (a kernel without cross-netns delivery)"
        raise KernelError("listening for nftables transactions failed", why)

    def advance(self) -> int:
        self.pass_number += 1
        for nsid in self._take_in():
            self.heard_in[nsid] = self.pass_number
        return self.pass_number

    def _take_in(self) -> set[int]:
        """The ids of the netns that sent messages since the last call (ENOBUFS marks this pass as lossy)."""
        heard: set[int] = set()
        while True:
            try:
                _data, ancillary, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(4))
            except BlockingIOError:
                return heard
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.lost_in = self.pass_number  # reads of this pass come after the loss; earlier ones prove nothing
                continue
            self.messages += 1
            for level, kind, value in ancillary:
                if level == SOL_NETLINK and kind == NETLINK_LISTEN_ALL_NSID and len(value) >= 4:
                    heard.add(int(struct.unpack_from("=i", value)[0]))
            # no id attached: the node's own netns, which is never a pod's

    def identify(self, netns: str) -> Heard | None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            nsid = nsid_of(fd)
        except (OSError, KernelError):
            return None
        finally:
            os.close(fd)
        return None if nsid is None else Heard(nsid, (st.st_dev, st.st_ino))

    def quiet(self, netns: str, heard: Heard, read_in: int) -> bool:
        """The inode check makes the id safe: a netns keeps its id while it lives, and the path pins it."""
        return (
            read_in >= self.lost_in and self.heard_in.get(heard.nsid, 0) <= read_in and inode_of(netns) == heard.inode
        )


def _transaction_in_a_netns_of_our_own() -> int:
    """In a thread of its own: a new netns, an id for it in the node's netns (auto), a table created there.
    Returns the id. The netns goes when the thread ends and its fd is closed, and its id with it."""
    nsids: list[int] = []
    errors: list[BaseException] = []

    def probe() -> None:
        try:
            nsids.append(_probe_in_this_thread())
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    thread = threading.Thread(target=probe, name="nft-events-probe", daemon=True)
    thread.start()
    thread.join(10)
    if nsids:
        return nsids[0]
    error = errors[0] if errors else "it did not end within 10 s"
    raise KernelError("listening for nftables transactions failed", f"the delivery probe failed: {error}")


def _probe_in_this_thread() -> int:
    import ctypes

    from ...netns import CLONE_NEWNET, entered, libc

    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    probe_fd = -1
    try:
        # This thread only: a netns nobody else is in.
        if libc().unshare(CLONE_NEWNET) != 0:  # type: ignore[no-untyped-call]
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        probe_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        with entered(home):  # back home for the id: it is the node's netns's name for the probe netns
            change(NETLINK_ROUTE, RTM_NEWNSID, 0,
                   _RTGEN.pack(socket.AF_UNSPEC) + attr(NETNSA_FD, _u32(probe_fd)) + attr(NETNSA_NSID, _i32(-1)),
                   "an id for the probe netns")  # fmt: skip
            nsid = nsid_of(probe_fd)
        if nsid is None:
            raise KernelError("listening for nftables transactions failed", "the probe netns got no id")
        body = _NFGEN.pack(socket.AF_INET, 0, 0) + attr(NFTA_TABLE_NAME, PROBE_TABLE)
        transaction(NFNL_SUBSYS_NFTABLES, (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWTABLE, body, "the probe table")
        return nsid
    finally:
        if probe_fd >= 0:
            os.close(probe_fd)
        os.close(home)


def _i32(value: int) -> bytes:
    return struct.pack("=i", value)
