"""Policy routing for TPROXY in the pod netns, through pyroute2: the rule and route our TPROXY table needs.

TPROXY marks a packet and hands it to a transparent socket; the mark sends it
to routing table 133, whose only route is `local default dev lo`, so it is
delivered locally whatever its destination. `ip rule` / `ip route` equivalents:

    ip rule add fwmark 0x539 lookup 133            (and ip -6)
    ip route add local default dev lo table 133    (and ip -6)

Objects are in `PolicyRouting.objects()` form. Only rules with our mark and
table, and routes in our table, are ever read or deleted. Call these only
inside the pod netns (backend.KernelBackend enters it first): the netlink
socket opens in the calling thread's netns.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from .errors import KernelError
from .netlink import NETLINK_ROUTE, attr, attrs, dump
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
