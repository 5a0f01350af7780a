"""The pod's nftables ruleset as data: the model, its JSON forms, and the kinds of rule.

`build.build_ruleset(spec)` makes a `Ruleset`; nothing here touches the kernel.
The same value renders three ways:

- `create_batch()` / `replace_batch()`: the libnftables JSON transactions we apply
  (`add_batch()`: the table's objects as add commands, for `render --json`);
- `objects()`: the table as `nft -j list table` prints it, minus handles, so
  CHECK can compare the kernel's state with what the spec requires;
- `to_text()`: an `nft -f` script, for `cni-redirect render` and the docs (nfttext.py).

Every rule has a `RuleKind`, and its comment is that kind's text, so a rule
read back from the kernel says what it is (`rule_kind`), and the counters
behind `inspect` and `/metrics` are derived from kinds (`COUNTED`), never
from matching text. `normalize()` makes a listing comparable with `objects()`.

Table contract (documented in the README): one `table inet cni_redirect`,
base chains `output` (hook output) and `prerouting` (hook prerouting), both
`type nat` at priority -100 (dstnat), and with TPROXY inbound
(`tproxy_prerouting`: `type filter hook prerouting` at priority -150, mangle), every rule with a
counter and a comment. A TPROXY table also needs policy routing in the pod
netns (`Ruleset.routing`): the backend adds it with the table and removes it
with the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from typing import Union

from .nfttext import TCP_MSS_TO_PATH, nft_text

FAMILY = "inet"
TABLE = "cni_redirect"
NAT_PRIORITY = -100  # dstnat: the priority nat redirection belongs at
MANGLE_PRIORITY = -150  # mangle: TPROXY runs before conntrack's nat hooks
TPROXY_MARK = 0x539  # 1337, as Istio marks: packets for a transparent proxy socket
TPROXY_TABLE = 133  # the routing table marked packets look up: `local default dev lo`
PROXY_PASSTHROUGH_V4 = "127.0.0.6"
PROXY_PASSTHROUGH_V6 = "::6"


# --- values that can stand on the right of a match ---


@dataclass(frozen=True)
class Prefix:
    addr: str
    length: int


@dataclass(frozen=True)
class Range:
    low: int
    high: int


@dataclass(frozen=True)
class SetRef:
    name: str


@dataclass(frozen=True)
class AnonSet:
    items: tuple[int, ...]


@dataclass(frozen=True)
class Symbol:
    """A number nft can print by name. JSON carries the number: a node without
    /etc/protocols (a bare bundle) lists `6`, never `tcp`, so CHECK compares numbers."""

    number: int
    name: str


TCP = Symbol(6, "tcp")

Value = Union[int, str, Prefix, Range, SetRef, AnonSet, Symbol]


@dataclass(frozen=True)
class Selector:
    """The left side of a match, as libnftables JSON writes it."""

    json: dict


def _meta(key: str) -> Selector:
    return Selector({"meta": {"key": key}})


def _payload(protocol: str, name: str) -> Selector:
    return Selector({"payload": {"protocol": protocol, "field": name}})


SOCKET_TRANSPARENT = Selector({"socket": {"key": "transparent"}})
OIFNAME = _meta("oifname")
IIFNAME = _meta("iifname")
SKUID = _meta("skuid")
SKGID = _meta("skgid")
L4PROTO = _meta("l4proto")
NFPROTO = _meta("nfproto")  # the packet's family in an inet table: "ipv4" or "ipv6"
IP_SADDR = _payload("ip", "saddr")
IP_DADDR = _payload("ip", "daddr")
IP6_SADDR = _payload("ip6", "saddr")
IP6_DADDR = _payload("ip6", "daddr")
TCP_DPORT = _payload("tcp", "dport")
UDP_DPORT = _payload("udp", "dport")
#: `tcp flags & (syn | rst) == syn`: a SYN (or SYN-ACK), never a reset.
TCP_SYN = Selector({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]})
#: `tcp flags & (syn | ack) == syn`: a new connection's first packet (a SYN, not a SYN-ACK).
TCP_SYN_ONLY = Selector({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]})


def masked_mark(mask: int) -> Selector:
    """`meta mark & MASK` (`meta mark` alone for a full mask), compared with a mark."""
    mark = {"meta": {"key": "mark"}}
    return Selector(mark if mask == 0xFFFFFFFF else {"&": [mark, mask]})


@dataclass(frozen=True)
class Match:
    selector: Selector
    value: Value
    negate: bool = False


@dataclass(frozen=True)
class Redirect:
    port: int


@dataclass(frozen=True)
class MarkAccept:
    """Mark the packet for the TPROXY routing table and accept it."""

    mark: int


@dataclass(frozen=True)
class ClampMss:
    """Set a SYN's MSS option to what the route it leaves by carries (`tcp option maxseg size set rt mtu`): a SYN
    that offered loopback's MSS goes out offering its path's. The kernel only ever lowers an MSS here."""


@dataclass(frozen=True)
class TProxy:
    """Hand the packet to the transparent socket on `port` (family "ip" or "ip6"), mark it, accept it."""

    port: int
    family: str
    mark: int


RETURN = None  # the `return` verdict; a Redirect otherwise
Verdict = Union[Redirect, MarkAccept, TProxy, ClampMss, None]


class RuleKind(Enum):
    """What a rule is for. The value is the rule's comment in the kernel: a stable contract."""

    IPV6_NOT_CAPTURED = "ipv6 not captured"
    EXCLUDED_INTERFACE = "excluded interface"
    EXCLUDED_OUTBOUND_PORTS = "excluded outbound ports"
    EXCLUDED_OUTBOUND_PORTS_UDP = "excluded outbound ports udp"
    PROXY_PASSTHROUGH = "proxy inbound passthrough"
    OWN_IP_VIA_PROXY_UID = "pod to own ip via proxy uid: inbound"
    OWN_IP_VIA_PROXY_GID = "pod to own ip via proxy gid: inbound"
    LOOPBACK_INTERFACE = "loopback interface"
    PROXY_UID = "proxy uid"
    PROXY_GID = "proxy gid"
    EXCLUDED_UIDS = "excluded uids"
    DNS_UDP = "dns udp"
    DNS_TCP = "dns tcp"
    LOOPBACK_DESTINATION = "loopback destination"
    EXCLUDED_IPV4_CIDRS = "excluded ipv4 cidrs"
    EXCLUDED_IPV6_CIDRS = "excluded ipv6 cidrs"
    CAPTURE_OUTBOUND_PORTS = "capture outbound ports"
    CAPTURE_OUTBOUND = "capture outbound"
    CAPTURE_OUTBOUND_IPV4 = "capture outbound ipv4"
    CAPTURE_OUTBOUND_IPV6 = "capture outbound ipv6"
    REROUTED_OUTBOUND = "rerouted interface: outbound"
    REROUTED_OUTBOUND_IPV4 = "rerouted interface: outbound ipv4"
    REROUTED_OUTBOUND_IPV6 = "rerouted interface: outbound ipv6"
    REROUTED_INTERFACE = "rerouted interface"
    EXCLUDED_INBOUND_SOURCES = "excluded inbound sources"
    EXCLUDED_INBOUND_PORTS = "proxy and excluded inbound ports"
    ESTABLISHED_INBOUND = "established inbound: to its proxy socket"
    CAPTURE_INBOUND = "capture inbound"
    CAPTURE_INBOUND_IPV4 = "capture inbound ipv4"
    CAPTURE_INBOUND_IPV6 = "capture inbound ipv6"
    PROXY_MARK = "proxy mark"
    OWN_IP_VIA_PROXY_MARK = "pod to own ip via proxy mark: inbound"
    MSS_TO_PATH = "syn mss to its path"


#: Which kinds' counters say what, for `inspect` and `/metrics`. nat rules see a connection's first
#: packet only, so their packets count connections (and UDP flows).
COUNTED: dict[RuleKind, str] = {
    RuleKind.CAPTURE_OUTBOUND_PORTS: "outbound_redirected",
    RuleKind.CAPTURE_OUTBOUND: "outbound_redirected",
    RuleKind.CAPTURE_OUTBOUND_IPV4: "outbound_redirected",
    RuleKind.CAPTURE_OUTBOUND_IPV6: "outbound_redirected",
    RuleKind.CAPTURE_INBOUND: "inbound_redirected",
    RuleKind.CAPTURE_INBOUND_IPV4: "inbound_redirected",
    RuleKind.CAPTURE_INBOUND_IPV6: "inbound_redirected",
    RuleKind.OWN_IP_VIA_PROXY_UID: "inbound_redirected",
    RuleKind.OWN_IP_VIA_PROXY_GID: "inbound_redirected",
    RuleKind.DNS_UDP: "dns_redirected",
    RuleKind.DNS_TCP: "dns_redirected",
    RuleKind.PROXY_UID: "proxy_exempt",
    RuleKind.PROXY_GID: "proxy_exempt",
    RuleKind.PROXY_MARK: "proxy_exempt",
    RuleKind.OWN_IP_VIA_PROXY_MARK: "inbound_redirected",
}
COUNTER_NAMES: tuple[str, ...] = tuple(dict.fromkeys(COUNTED.values()))


def rule_kind(comment: object) -> RuleKind | None:
    """The kind of a rule read back from the kernel; None for a comment we never write."""
    try:
        return RuleKind(comment)
    except ValueError:
        return None


def counters(listing: list[dict] | None) -> dict[str, dict[str, int]]:
    """Packets and bytes per counted kind in a table's listing ({} when there is no table)."""
    if listing is None:
        return {}
    totals = {name: {"packets": 0, "bytes": 0} for name in COUNTER_NAMES}
    for obj in listing:
        rule = obj.get("rule")
        if not isinstance(rule, dict):
            continue
        kind = rule_kind(rule.get("comment"))
        if kind is None or kind not in COUNTED:
            continue
        for expr in rule.get("expr", ()):
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict):
                totals[COUNTED[kind]]["packets"] += counter.get("packets", 0)
                totals[COUNTED[kind]]["bytes"] += counter.get("bytes", 0)
    return totals


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...]
    verdict: Verdict
    kind: RuleKind

    @property
    def comment(self) -> str:
        return self.kind.value


@dataclass(frozen=True)
class PolicyRouting:
    """What TPROXY needs beside the table: marked packets route to a table that delivers everything locally."""

    mark: int = TPROXY_MARK
    table: int = TPROXY_TABLE
    ipv6: bool = True  # False with `capture-ipv6: false`: IPv4 only

    def objects(self, ipv6: bool = True) -> list[dict]:
        """Our rules and routes, in the canonical form the routing backends read back; `ipv6` says whether the
        netns has IPv6 at all."""
        families = ("inet", "inet6") if ipv6 and self.ipv6 else ("inet",)
        rules = [{"rule": {"family": f, "fwmark": self.mark, "table": self.table}} for f in families]
        dst = {"inet": "0.0.0.0/0", "inet6": "::/0"}
        routes = [
            {"route": {"family": f, "dst": dst[f], "type": "local", "dev": "lo", "table": self.table}} for f in families
        ]
        return rules + routes


#: The MSS a SYN offers over loopback (MTU 65536): what `advmss` on the pod's routes makes a captured connection's
#: SYN offer, as if it went to the proxy directly. IPv4: 65536 - 40 capped at 65535 - 40; IPv6: 65536 - 60.
LOOPBACK_ADVMSS = {"inet": 65495, "inet6": 65476}


@dataclass(frozen=True)
class RouteMss:
    """`loopback-mss`: `advmss` on the pod's main-table routes (the postrouting clamp in the table lowers every SYN
    that leaves the pod to its path's MTU). Only routes without an advmss of their own get ours, and only ours
    (that value) is taken off again."""

    advmss: tuple[tuple[str, int], ...] = tuple(LOOPBACK_ADVMSS.items())


def describe(obj: dict) -> str:
    """A policy routing object as `ip` would print it, for CHECK's messages."""
    ((kind, body),) = obj.items()
    ip = "ip -6" if body["family"] == "inet6" else "ip"
    if kind == "rule":
        return f"{ip} rule fwmark {body['fwmark']:#x} lookup {body['table']}"
    return f"{ip} route local default dev {body['dev']} table {body['table']}"


@dataclass(frozen=True)
class NamedSet:
    name: str
    type: str
    interval: bool
    elements: tuple[Value, ...]


@dataclass(frozen=True)
class Chain:
    name: str
    hook: str
    rules: tuple[Rule, ...]
    priority: int = NAT_PRIORITY
    type: str = "nat"


@dataclass(frozen=True)
class Ruleset:
    sets: tuple[NamedSet, ...]
    chains: tuple[Chain, ...]
    table: str = TABLE
    family: str = FAMILY
    routing: PolicyRouting | None = None
    route_mss: RouteMss | None = None
    sysctls: tuple[tuple[str, str], ...] = ()  # (name under /proc/sys, value) the pod's netns must hold

    # --- JSON, as libnftables takes and prints it ---

    def objects(self) -> list[dict]:
        """The table's objects in `nft -j list table` form, without handles."""
        ident = {"family": self.family, "table": self.table}
        objects: list[dict] = [{"table": {"family": self.family, "name": self.table}}]
        for named in self.sets:
            body: dict = {**ident, "name": named.name, "type": named.type}
            if named.interval:
                body["flags"] = ["interval"]
            if named.elements:
                body["elem"] = [_value_json(v) for v in named.elements]
            objects.append({"set": body})
        for chain in self.chains:
            objects.append(
                {
                    "chain": {
                        **ident,
                        "name": chain.name,
                        "type": chain.type,
                        "hook": chain.hook,
                        "prio": chain.priority,
                        "policy": "accept",
                    }
                }
            )
        for chain in self.chains:
            for rule in chain.rules:
                objects.append({"rule": {**ident, "chain": chain.name, **_rule_json(rule)}})
        return objects

    def add_batch(self) -> dict:
        """One transaction creating the whole table; for a netns without it."""
        return {"nftables": [{"add": obj} for obj in self.objects()]}

    def create_batch(self) -> dict:
        """One transaction creating the table, failing (EEXIST) if it exists: for a netns without it."""
        first, *rest = self.add_batch()["nftables"]
        return {"nftables": [{"create": first["add"]}, *rest]}

    def replace_batch(self) -> dict:
        """One transaction replacing the table whether or not it exists: add (a no-op if present), delete, add all."""
        table = {"table": {"family": self.family, "name": self.table}}
        return {"nftables": [{"add": table}, {"delete": table}, *self.add_batch()["nftables"]]}

    # --- nft syntax ---

    def to_text(self) -> str:
        """An `nft -f` script that programs exactly what `add_batch()` does."""
        return nft_text(self.objects())


@dataclass(frozen=True)
class Observed:
    """What a pod netns holds of ours: the table as listed (counters included; None if absent),
    our policy routing objects, and whether the netns has IPv6 (TPROXY's routing is per family)."""

    listing: list[dict] | None
    routing: tuple[dict, ...] = ()
    ipv6: bool = True
    oversized: str = ""  # the table is there but too large to list (and so not listed): why
    without_mss: tuple[str, ...] = ()  # `loopback-mss`: the pod's routes that lack an advmss (read when wanted)
    sysctls: tuple[tuple[str, str], ...] = ()  # the values of the sysctls the ruleset sets (read when it sets any)


def normalize(objects: list[dict]) -> list[dict]:
    """Make a listing comparable with `Ruleset.objects()`: no handles, counters zeroed, hash-set elements sorted."""
    out = []
    for obj in objects:
        ((kind, body),) = obj.items()
        if kind == "metainfo":
            continue
        body = {key: value for key, value in body.items() if key != "handle"}
        if "elem" in body:
            body["elem"] = sorted(body["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        if "expr" in body:
            body["expr"] = [{"counter": {"packets": 0, "bytes": 0}} if "counter" in e else e for e in body["expr"]]
        out.append({kind: body})
    return out


def _value_json(value: Value) -> object:
    if isinstance(value, Prefix):
        return {"prefix": {"addr": value.addr, "len": value.length}}
    if isinstance(value, Range):
        return {"range": [value.low, value.high]}
    if isinstance(value, SetRef):
        return f"@{value.name}"
    if isinstance(value, AnonSet):
        return {"set": list(value.items)}
    if isinstance(value, Symbol):
        return value.number
    return value


def _rule_json(rule: Rule) -> dict:
    expr: list[dict] = [
        {
            "match": {
                "op": "!=" if m.negate else "==",
                "left": m.selector.json,
                "right": _value_json(m.value),
            }
        }
        for m in rule.matches
    ]
    counter = {"counter": {"packets": 0, "bytes": 0}}
    verdict = rule.verdict
    if isinstance(verdict, ClampMss):
        expr += [{"mangle": dict(TCP_MSS_TO_PATH)}, counter]
        return {"expr": expr, "comment": rule.comment}
    if isinstance(verdict, TProxy):
        # tproxy first: it does not match a packet of the other family, which then is not counted here either
        expr.append({"tproxy": {"family": verdict.family, "port": verdict.port}})
        expr += [counter, _mark(verdict.mark), {"accept": None}]
    elif isinstance(verdict, MarkAccept):
        expr += [counter, _mark(verdict.mark), {"accept": None}]
    elif isinstance(verdict, Redirect):
        expr += [counter, {"redirect": {"port": verdict.port}}]
    else:
        expr += [counter, {"return": None}]
    return {"expr": expr, "comment": rule.comment}


def _mark(mark: int) -> dict:
    return {"mangle": {"key": {"meta": {"key": "mark"}}, "value": mark}}
