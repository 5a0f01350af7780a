"""Routing in the pod netns: TPROXY's policy rule and route (through pyroute2), and `loopback-mss`'s advmss on the
pod's own routes (raw netlink: each route replaced with itself plus or minus one metric).

TPROXY marks a packet and hands it to a transparent socket; the mark sends it
to routing table 133, whose only route is `local default dev lo`, so it is
delivered locally whatever its destination. `ip rule` / `ip route` equivalents:

    ip rule add fwmark 0x539 lookup 133            (and ip -6)
    ip route add local default dev lo table 133    (and ip -6)

Objects are in `PolicyRouting.objects()` form. Only rules with our mark and
table, and routes in our table, are ever read or deleted. Call these only
inside the pod netns (backend.KernelBackend enters it first): the netlink
socket opens in the calling thread's netns.

`loopback-mss`: a captured connection's SYN takes its MSS from the route its
socket looked up, the pod's eth0 route, although NAT sends it over loopback.
`advmss` on the pod's main-table routes makes it offer loopback's; the table's
postrouting clamp lowers every SYN that leaves the pod back to its path. Each
unicast route without an advmss of its own is sent back to the kernel as
RTM_NEWROUTE with NLM_F_REPLACE, its own attributes and metrics plus ours;
taking it off sends it back without. A route with an advmss of its own, and a
multipath route, are left as they are. At most `MAX_ROUTES` routes are read.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from .errors import KernelError
from .netlink import NETLINK_ROUTE, attr, attrs, change, dump
from .ruleset import TPROXY_MARK, TPROXY_TABLE, describe

_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6}
_DEFAULT = {"inet": "0.0.0.0/0", "inet6": "::/0"}
RTN_LOCAL = 2
RT_SCOPE_HOST = 254


class Routes(Protocol):
    """What TableOps needs from a netns's routing: read, add and delete our objects."""

    def ipv6(self) -> bool:
        """True if the netns has IPv6 on lo (a pod with IPv6 disabled gets IPv4 routing only)."""

    def read(self) -> list[dict]:
        """Our rules and routes present, in `PolicyRouting.objects()` form."""

    def any_rule(self) -> bool:
        """Cheap probe for DEL: is our IPv4 rule there? (added first, removed last)."""

    def add(self, objects: list[dict]) -> list[dict]:
        """Add each in order (one already there is fine); return what this call added. On a failure,
        delete what this call added and raise."""

    def delete(self, objects: list[dict]) -> None:
        """Delete each; one already gone is fine."""

    def without_mss(self) -> list[str]:
        """The pod's main-table unicast routes that have no advmss (`loopback-mss`'s drift), described."""

    def set_mss(self, advmss: dict[str, int]) -> int:
        """Our advmss (per family) on each main-table unicast route without one; how many were changed."""

    def clear_mss(self, advmss: dict[str, int]) -> int:
        """Our advmss off each route that holds exactly ours; how many were changed."""


class KernelRoutes:
    """The pod netns's routing through pyroute2 (imported here: only TPROXY paths and DEL pay for it)."""

    @contextmanager
    def _netlink(self) -> Iterator[Any]:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            with IPRoute() as ipr:
                yield ipr
        except NetlinkError as exc:
            raise KernelError("policy routing for TPROXY failed in the pod netns", str(exc), exc.code) from None

    def ipv6(self) -> bool:
        try:
            with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6") as flag:  # this thread's netns
                return flag.read().strip() == "0"
        except OSError:
            return False  # no IPv6 in this kernel or netns

    def read(self) -> list[dict]:
        """Streamed (`netlink.dump`): a pod may hold 40 000 rules of its own; only ours are kept."""
        found: list[dict] = []
        try:
            lo = socket.if_nametoindex("lo")
        except OSError:
            lo = 0
        for family, af in _FAMILIES.items():
            if af == socket.AF_INET6 and not self.ipv6():
                continue
            if any(True for _ in _our_rules(af)):
                found.append({"rule": {"family": family, "fwmark": TPROXY_MARK, "table": TPROXY_TABLE}})
            for rtype, dst_len, oif in _our_routes(af):
                if rtype == RTN_LOCAL and dst_len == 0:
                    dev = "lo" if lo and oif == lo else str(oif)
                    body = {"family": family, "dst": _DEFAULT[family], "type": "local", "dev": dev}
                    found.append({"route": {**body, "table": TPROXY_TABLE}})
        return found

    def any_rule(self) -> bool:
        return any(True for _ in _our_rules(socket.AF_INET))

    def add(self, objects: list[dict]) -> list[dict]:
        from pyroute2.netlink.exceptions import NetlinkError

        done: list[dict] = []
        with self._netlink() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            try:
                for obj in objects:
                    try:
                        self._change(ipr, "add", obj, lo)
                    except NetlinkError as exc:
                        if exc.code != errno.EEXIST:
                            raise
                        continue  # there already (an earlier ADD that died half-way): not ours to roll back
                    done.append(obj)
            except NetlinkError as exc:
                for obj in reversed(done):
                    self._quietly(ipr, "del", obj, lo)
                raise KernelError(
                    "policy routing for TPROXY could not be added in the pod netns", f"{describe(obj)}: {exc}", exc.code
                ) from None
        return done

    def delete(self, objects: list[dict]) -> None:
        with self._netlink() as ipr:
            lo = ipr.link_lookup(ifname="lo")
            for obj in reversed(objects):
                self._quietly(ipr, "del", obj, lo[0] if lo else 0)

    @staticmethod
    def _change(ipr: Any, verb: str, obj: dict, lo: int) -> None:
        ((kind, body),) = obj.items()
        af = _FAMILIES[body["family"]]
        if kind == "rule":
            ipr.rule(verb, family=af, fwmark=body["fwmark"], table=body["table"])
        else:
            ipr.route(verb, family=af, dst=body["dst"], type="local", scope=RT_SCOPE_HOST, table=body["table"], oif=lo)

    def without_mss(self) -> list[str]:
        found = []
        for family, af in self._families():
            for message in main_routes(af):
                if message.multipath or message.advmss is not None:
                    continue
                found.append(f"{message.describe()} ({family})")
        return found

    def set_mss(self, advmss: dict[str, int]) -> int:
        changed = 0
        for family, af in self._families():
            for message in main_routes(af):
                if message.multipath or message.advmss is not None:
                    continue
                _replace(message, advmss[family])
                changed += 1
        return changed

    def clear_mss(self, advmss: dict[str, int]) -> int:
        changed = 0
        for family, af in self._families():
            for message in main_routes(af):
                if message.multipath or message.advmss != advmss[family]:
                    continue
                _replace(message, None)
                changed += 1
        return changed

    def _families(self) -> list[tuple[str, int]]:
        return [(f, af) for f, af in _FAMILIES.items() if af == socket.AF_INET or self.ipv6()]

    def _quietly(self, ipr: Any, verb: str, obj: dict, lo: int) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self._change(ipr, verb, obj, lo)
        except NetlinkError as exc:
            if exc.code not in (errno.ENOENT, errno.ESRCH):
                raise


RTM_GETRULE, RTM_GETROUTE = 34, 26
FRA_FWMARK, FRA_TABLE = 10, 15
RTA_OIF, RTA_TABLE = 4, 15
_RULE_HDR = struct.Struct("=BBBBBBBBI")  # struct fib_rule_hdr
_RTMSG = struct.Struct("=BBBBBBBBI")  # struct rtmsg


def _our_rules(af: int) -> Iterator[None]:
    """One item per rule with our mark and table, from a streamed dump of the family's rules."""
    request = _RULE_HDR.pack(af, 0, 0, 0, 0, 0, 0, 0, 0)
    for _kind, payload in dump(NETLINK_ROUTE, RTM_GETRULE, request, "the pod's policy rules"):
        if len(payload) < _RULE_HDR.size:
            continue
        table, fwmark = payload[4], None
        for kind, value in attrs(payload, _RULE_HDR.size):
            if kind == FRA_FWMARK and len(value) >= 4:
                (fwmark,) = struct.unpack_from("=I", value)
            elif kind == FRA_TABLE and len(value) >= 4:
                (table,) = struct.unpack_from("=I", value)
        if fwmark == TPROXY_MARK and table == TPROXY_TABLE:
            yield None


def _our_routes(af: int) -> Iterator[tuple[int, int, int]]:
    """(type, dst_len, oif) of each route in our table; the kernel filters the dump by table (strict check)."""
    request = _RTMSG.pack(af, 0, 0, 0, TPROXY_TABLE, 0, 0, 0, 0) + attr(RTA_TABLE, struct.pack("=I", TPROXY_TABLE))
    for _kind, payload in dump(NETLINK_ROUTE, RTM_GETROUTE, request, "the pod's routes", strict=True):
        if len(payload) < _RTMSG.size:
            continue
        table, oif = payload[4], 0
        for kind, value in attrs(payload, _RTMSG.size):
            if kind == RTA_TABLE and len(value) >= 4:
                (table,) = struct.unpack_from("=I", value)
            elif kind == RTA_OIF and len(value) >= 4:
                (oif,) = struct.unpack_from("=I", value)
        if table == TPROXY_TABLE:
            yield payload[7], payload[1], oif


# --- loopback-mss: advmss on the pod's own routes ---

RTM_NEWROUTE = 24
NLM_F_REPLACE = 0x100
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTA_DST, RTA_METRICS, RTA_MULTIPATH, RTA_CACHEINFO = 1, 8, 9, 12
RTAX_ADVMSS = 8
RTNH_F_ONLINK = 4
#: The most main-table routes read for `loopback-mss`: a pod has a handful; one that made thousands is not walked.
MAX_ROUTES = 256


class RouteMessage:
    """One main-table route as the kernel dumped it: its rtmsg and attributes, to send it back as it is."""

    def __init__(self, af: int, payload: bytes) -> None:
        self.af, self.header = af, payload[: _RTMSG.size]
        self.attrs = list(attrs(payload, _RTMSG.size))
        self.metrics = [item for kind, value in self.attrs if kind == RTA_METRICS for item in attrs(value)]
        self.multipath = any(kind == RTA_MULTIPATH for kind, _ in self.attrs)

    @property
    def advmss(self) -> int | None:
        for kind, value in self.metrics:
            if kind == RTAX_ADVMSS and len(value) >= 4:
                return int(struct.unpack_from("=I", value)[0])
        return None

    def describe(self) -> str:
        dst = next((value for kind, value in self.attrs if kind == RTA_DST), b"")
        length = self.header[1]
        if not dst:
            return "default"
        return f"{socket.inet_ntop(self.af, dst)}/{length}"

    def body(self, advmss: int | None) -> bytes:
        """The route again, its metrics with `advmss` (None: without ours); what the kernel reports only (the
        cache info) left out."""
        metrics = b"".join(attr(kind, value) for kind, value in self.metrics if kind != RTAX_ADVMSS)
        if advmss is not None:
            metrics += attr(RTAX_ADVMSS, struct.pack("=I", advmss))
        kept = b"".join(attr(kind, value) for kind, value in self.attrs if kind not in (RTA_METRICS, RTA_CACHEINFO))
        *fields, flags = _RTMSG.unpack(self.header)
        header = _RTMSG.pack(*fields, flags & RTNH_F_ONLINK)  # the rest (linkdown, dead) the kernel only reports
        return header + kept + (attr(RTA_METRICS, metrics) if metrics else b"")


def main_routes(af: int) -> Iterator[RouteMessage]:
    """The family's unicast routes in the main table, at most MAX_ROUTES (the kernel filters by table)."""
    request = _RTMSG.pack(af, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0) + attr(RTA_TABLE, struct.pack("=I", RT_TABLE_MAIN))
    for count, (_kind, payload) in enumerate(
        dump(NETLINK_ROUTE, RTM_GETROUTE, request, "the pod's routes", strict=True), 1
    ):
        if count > MAX_ROUTES:
            return
        if len(payload) < _RTMSG.size or payload[7] != RTN_UNICAST:
            continue
        table = payload[4]
        for kind, value in attrs(payload, _RTMSG.size):
            if kind == RTA_TABLE and len(value) >= 4:
                (table,) = struct.unpack_from("=I", value)
        if table == RT_TABLE_MAIN:
            yield RouteMessage(af, payload)


def _replace(message: RouteMessage, advmss: int | None) -> None:
    try:
        change(NETLINK_ROUTE, RTM_NEWROUTE, NLM_F_REPLACE, message.body(advmss), f"the route {message.describe()}")
    except KernelError as error:
        if error.errno not in (errno.ENOENT, errno.ESRCH):  # gone meanwhile: nothing to put our MSS on
            raise
