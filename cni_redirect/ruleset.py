"""The pod's nftables ruleset as data, built from a CaptureSpec by a pure function.

`build_ruleset(spec)` returns a `Ruleset`; nothing here touches the kernel.
The same value renders three ways:

- `create_batch()` / `replace_batch()`: the libnftables JSON transactions we apply
  (`add_batch()`: the table's objects as add commands, for `render --json`);
- `objects()`: the table as `nft -j list table` prints it, minus handles, so
  CHECK can compare the kernel's state with what the spec requires;
- `to_text()`: an `nft -f` script, for `cni-redirect render` and the docs.

Table contract (documented in the README): one `table inet cni_redirect`,
base chains `output` (hook output) and `prerouting` (hook prerouting), both
`type nat` at priority -100 (dstnat), and with TPROXY inbound
(`tproxy_prerouting`: `type filter hook prerouting` at priority -150, mangle), every rule with a
counter and a comment. A TPROXY table also needs policy routing in the pod
netns (`Ruleset.routing`): the backend adds it with the table and removes it
with the table.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

from .spec import ALL, CaptureSpec, Network, PortRange, merge_ranges

FAMILY = "inet"
TABLE = "cni_redirect"
NAT_PRIORITY = -100  # dstnat: the priority nat redirection belongs at
MANGLE_PRIORITY = -150  # mangle: TPROXY runs before conntrack's nat hooks
TPROXY_MARK = 0x539  # 1337, as Istio marks: packets for a transparent proxy socket
TPROXY_TABLE = 133  # the routing table marked packets look up: `local default dev lo`
DNS_PORT = 53
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
PROTOCOL_NAMES = {6: "tcp", 17: "udp"}

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
IP_SADDR = _payload("ip", "saddr")
IP_DADDR = _payload("ip", "daddr")
IP6_SADDR = _payload("ip6", "saddr")
IP6_DADDR = _payload("ip6", "daddr")
TCP_DPORT = _payload("tcp", "dport")
UDP_DPORT = _payload("udp", "dport")


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
class TProxy:
    """Hand the packet to the transparent socket on `port` (family "ip" or "ip6"), mark it, accept it."""

    port: int
    family: str
    mark: int


RETURN = None  # the `return` verdict; a Redirect otherwise
Verdict = Union[Redirect, MarkAccept, TProxy, None]


@dataclass(frozen=True)
class Rule:
    matches: tuple[Match, ...]
    verdict: Verdict
    comment: str


@dataclass(frozen=True)
class PolicyRouting:
    """What TPROXY needs beside the table: marked packets route to a table that delivers everything locally."""

    mark: int = TPROXY_MARK
    table: int = TPROXY_TABLE

    def objects(self, ipv6: bool = True) -> list[dict]:
        """Our rules and routes, in the canonical form the routing backends read back."""
        families = ("inet", "inet6") if ipv6 else ("inet",)
        rules = [{"rule": {"family": f, "fwmark": self.mark, "table": self.table}} for f in families]
        dst = {"inet": "0.0.0.0/0", "inet6": "::/0"}
        routes = [
            {"route": {"family": f, "dst": dst[f], "type": "local", "dev": "lo", "table": self.table}} for f in families
        ]
        return rules + routes


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


# --- nft syntax, from the JSON objects: one renderer for `render`, the docs and the fake's dump ---


def _selector_text(left: dict) -> str:
    if "socket" in left:
        return f"socket {left['socket']['key']}"
    if "meta" in left:
        key = left["meta"]["key"]
        return key if key in ("iifname", "oifname") else f"meta {key}"
    payload = left["payload"]
    return f"{payload['protocol']} {payload['field']}"


def _json_value_text(value: object, quoted: bool = False, protocol: bool = False) -> str:
    if isinstance(value, dict):
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "range" in value:
            low, high = value["range"]
            return f"{low}-{high}"
        if "set" in value:
            return "{ " + ", ".join(_json_value_text(item) for item in value["set"]) + " }"
        raise ValueError(f"no nft syntax for value {value!r}")
    if isinstance(value, str):
        return f'"{value}"' if quoted and not value.startswith("@") else value
    if protocol and value in PROTOCOL_NAMES:
        return PROTOCOL_NAMES[value]
    return str(value)


def _statement_text(expr: dict, with_counters: bool = False) -> str:
    ((kind, body),) = expr.items()
    if kind == "match":
        left = body["left"]
        quoted = left.get("meta", {}).get("key") in ("iifname", "oifname")
        protocol = left.get("meta", {}).get("key") == "l4proto"
        op = "" if body["op"] == "==" else f"{body['op']} "
        return f"{_selector_text(left)} {op}{_json_value_text(body['right'], quoted, protocol)}"
    if kind == "counter":
        if with_counters and isinstance(body, dict):
            return f"counter packets {body.get('packets', 0)} bytes {body.get('bytes', 0)}"
        return "counter"
    if kind in ("return", "accept"):
        return kind
    if kind == "redirect":
        return f"redirect to :{body['port']}"
    if kind == "tproxy":
        return f"tproxy {body['family']} to :{body['port']}"
    if kind == "mangle" and body["key"] == {"meta": {"key": "mark"}}:
        return f"meta mark set {body['value']:#x}"
    raise ValueError(f"no nft syntax for statement {expr!r}")


def nft_text(objects: list[dict], with_counters: bool = False) -> str:
    """Render a table's objects (`Ruleset.objects()` or a listing of the same shape) as an nft script;
    `with_counters` shows each rule's packets and bytes, as `nft list table` does."""
    blocks: list[list[str]] = []
    rules: dict[str, list[str]] = {}
    header = ""
    for obj in objects:
        ((kind, body),) = obj.items()
        if kind == "table":
            header = f"table {body['family']} {body['name']} {{"
        elif kind == "set":
            block = [f"\tset {body['name']} {{", f"\t\ttype {body['type']}"]
            if "interval" in body.get("flags", ()):
                block.append("\t\tflags interval")
            if body.get("elem"):
                quoted = body["type"] == "ifname"
                block.append("\t\telements = { " + ", ".join(_json_value_text(e, quoted) for e in body["elem"]) + " }")
            block.append("\t}")
            blocks.append(block)
        elif kind == "chain":
            rules[body["name"]] = []
            blocks.append(
                [
                    f"\tchain {body['name']} {{",
                    f"\t\ttype {body['type']} hook {body['hook']} priority {body['prio']}; policy {body['policy']};",
                ]
            )
        elif kind == "rule":
            text = " ".join(_statement_text(expr, with_counters) for expr in body["expr"])
            if body.get("comment"):
                text += f' comment "{body["comment"]}"'
            rules[body["chain"]].append(f"\t\t{text}")
    for block in blocks:
        if block[0].startswith("\tchain "):
            name = block[0].split()[1]
            block += rules[name]
            block.append("\t}")
    lines = [header]
    for index, block in enumerate(blocks):
        if index:
            lines.append("")
        lines += block
    lines.append("}")
    return "\n".join(lines) + "\n"


# --- from spec to ruleset ---


def _port_elements(ranges: Iterable[PortRange]) -> tuple[Value, ...]:
    return tuple(low if low == high else Range(low, high) for low, high in ranges)


def _network_elements(networks: Iterable[Network], version: int) -> tuple[Value, ...]:
    elements: list[Value] = []
    for net in networks:
        if net.version != version:
            continue
        if getattr(net.network_address, "scope_id", None):  # validated away in spec; never let text through
            raise ValueError(f"{net}: a scoped address cannot be rendered")
        if net.prefixlen == net.max_prefixlen:
            elements.append(str(net.network_address))
        else:
            elements.append(Prefix(str(net.network_address), net.prefixlen))
    return tuple(elements)


@dataclass
class _Builder:
    sets: list[NamedSet] = field(default_factory=list)

    def named(self, name: str, type_: str, elements: tuple[Value, ...], interval: bool = True) -> SetRef | None:
        """Declare a named set if it has elements; return a reference to it, or None."""
        if not elements:
            return None
        self.sets.append(NamedSet(name, type_, interval, elements))
        return SetRef(name)


def build_ruleset(spec: CaptureSpec) -> Ruleset:
    """Render a validated spec into the pod's table. Pure: same spec, same ruleset.

    The order of rules follows docs in the README ("Rule order") and is the
    order real sidecars rely on; the first matching rule wins.
    """
    b = _Builder()
    ifaces = b.named("exclude_ifaces", "ifname", tuple(spec.exclude_interfaces), interval=False)
    reroute = b.named("reroute_ifaces", "ifname", tuple(spec.reroute_interfaces), interval=False)
    uids = b.named("exclude_uids", "uid", tuple(spec.exclude_uids), interval=False)
    in_exclude = b.named(
        "in_exclude_ports",
        "inet_service",
        _port_elements(merge_ranges([(p, p) for p in spec.proxy_ports] + list(spec.exclude_inbound_ports))),
    )
    in_include = (
        None
        if spec.include_inbound_ports == ALL
        else b.named("in_include_ports", "inet_service", _port_elements(spec.include_inbound_ports))
    )
    in_exclude_src = [
        (saddr, b.named(f"in_exclude_src_v{v}", f"ipv{v}_addr", _network_elements(spec.exclude_inbound_cidrs, v)))
        for saddr, v in ((IP_SADDR, 4), (IP6_SADDR, 6))
    ]
    out_exclude_ports = b.named("out_exclude_ports", "inet_service", _port_elements(spec.exclude_outbound_ports))
    out_include_ports = (
        None
        if spec.include_outbound_ports == ALL
        else b.named("out_include_ports", "inet_service", _port_elements(spec.include_outbound_ports))
    )
    out_capture_ports = b.named("out_capture_ports", "inet_service", _port_elements(spec.capture_outbound_ports))
    out_exclude_v4 = b.named("out_exclude_v4", "ipv4_addr", _network_elements(spec.exclude_outbound_cidrs, 4))
    out_exclude_v6 = b.named("out_exclude_v6", "ipv6_addr", _network_elements(spec.exclude_outbound_cidrs, 6))
    include_cidrs = spec.include_outbound_cidrs
    out_include_v4 = (
        None if include_cidrs == ALL else b.named("out_include_v4", "ipv4_addr", _network_elements(include_cidrs, 4))
    )
    out_include_v6 = (
        None if include_cidrs == ALL else b.named("out_include_v6", "ipv6_addr", _network_elements(include_cidrs, 6))
    )
    loopback = {v: _one_or_set(b, f"loopback_v{v}", v, spec) for v in (4, 6)}
    daddr_of = {4: IP_DADDR, 6: IP6_DADDR}

    owners = [(SKUID, spec.proxy_uid, "proxy uid")]
    if spec.proxy_gid is not None:
        owners.append((SKGID, spec.proxy_gid, "proxy gid"))

    out: list[Rule] = []
    if ifaces:
        out.append(Rule((Match(OIFNAME, ifaces),), RETURN, "excluded interface"))
    if out_exclude_ports:
        out.append(Rule((Match(TCP_DPORT, out_exclude_ports),), RETURN, "excluded outbound ports"))
        if spec.capture_dns:
            out.append(Rule((Match(UDP_DPORT, out_exclude_ports),), RETURN, "excluded outbound ports udp"))
    out.append(Rule((Match(OIFNAME, "lo"), Match(IP_SADDR, PROXY_PASSTHROUGH_V4)), RETURN, "proxy inbound passthrough"))
    out.append(
        Rule((Match(OIFNAME, "lo"), Match(IP6_SADDR, PROXY_PASSTHROUGH_V6)), RETURN, "proxy inbound passthrough")
    )
    if spec.captures_inbound and spec.capture_own_ip:
        for selector, owner, label in owners:
            for family in (4, 6):
                matches = [Match(OIFNAME, "lo")]
                if loopback[family] is not None:
                    matches.append(Match(daddr_of[family], loopback[family], negate=True))
                matches += [
                    Match(selector, owner),
                    Match(TCP_DPORT, DNS_PORT, negate=True),
                    Match(TCP_DPORT, in_exclude, negate=True),
                ]
                if in_include:
                    matches.append(Match(TCP_DPORT, in_include))
                out.append(Rule(tuple(matches), Redirect(spec.inbound_port), f"pod to own ip via {label}: inbound"))
    out.append(Rule((Match(OIFNAME, "lo"),), RETURN, "loopback interface"))
    for selector, owner, label in owners:
        out.append(Rule((Match(selector, owner),), RETURN, label))
    if uids:
        out.append(Rule((Match(SKUID, uids),), RETURN, "excluded uids"))
    if spec.capture_dns:
        out.append(Rule((Match(UDP_DPORT, DNS_PORT),), Redirect(spec.dns_port), "dns udp"))
        out.append(Rule((Match(TCP_DPORT, DNS_PORT),), Redirect(spec.dns_port), "dns tcp"))
    for family in (4, 6):
        if loopback[family] is not None:
            out.append(Rule((Match(daddr_of[family], loopback[family]),), RETURN, "loopback destination"))
    if out_exclude_v4:
        out.append(Rule((Match(IP_DADDR, out_exclude_v4),), RETURN, "excluded ipv4 cidrs"))
    if out_exclude_v6:
        out.append(Rule((Match(IP6_DADDR, out_exclude_v6),), RETURN, "excluded ipv6 cidrs"))
    if out_capture_ports:
        out.append(Rule((Match(TCP_DPORT, out_capture_ports),), Redirect(spec.outbound_port), "capture outbound ports"))
    out += _outbound_capture(spec, include_cidrs == ALL, out_include_v4, out_include_v6, out_include_ports)

    chains = [Chain("output", "output", tuple(out))]
    nat_in: list[Rule] = []
    if reroute:
        nat_in += _reroute(spec, reroute, include_cidrs == ALL, out_include_v4, out_include_v6)
    exclusions: list[Rule] = []
    if ifaces:
        exclusions.append(Rule((Match(IIFNAME, ifaces),), RETURN, "excluded interface"))
    if spec.tproxy:
        exclusions.append(Rule((Match(IIFNAME, "lo"),), RETURN, "loopback interface"))
        if reroute:
            exclusions.append(Rule((Match(IIFNAME, reroute),), RETURN, "rerouted interface"))
    exclusions += [Rule((Match(ip, ref),), RETURN, "excluded inbound sources") for ip, ref in in_exclude_src if ref]
    exclusions.append(Rule((Match(TCP_DPORT, in_exclude),), RETURN, "proxy and excluded inbound ports"))
    port_match = Match(TCP_DPORT, in_include) if in_include else Match(L4PROTO, TCP)
    routing = None
    if spec.tproxy:
        established = (Match(L4PROTO, TCP), Match(SOCKET_TRANSPARENT, 1))
        tproxy = list(exclusions)
        tproxy.append(Rule(established, MarkAccept(TPROXY_MARK), "established inbound: to its proxy socket"))
        for family in ("ip", "ip6"):
            verdict = TProxy(spec.inbound_port, family, TPROXY_MARK)
            tproxy.append(Rule((port_match,), verdict, f"capture inbound {'ipv4' if family == 'ip' else 'ipv6'}"))
        chains.insert(0, Chain("tproxy_prerouting", "prerouting", tuple(tproxy), MANGLE_PRIORITY, "filter"))
        routing = PolicyRouting()
    elif spec.captures_inbound:
        nat_in += exclusions
        nat_in.append(Rule((port_match,), Redirect(spec.inbound_port), "capture inbound"))
    if nat_in:
        chains.insert(0, Chain("prerouting", "prerouting", tuple(nat_in)))
    return Ruleset(tuple(b.sets), tuple(chains), routing=routing)


def _one_or_set(b: _Builder, name: str, version: int, spec: CaptureSpec) -> Value | None:
    """The loopback destinations of one family: inline when one CIDR (the common case), else a set."""
    elements = _network_elements(spec.loopback_cidrs, version)
    if len(elements) <= 1:
        return elements[0] if elements else None
    return b.named(name, f"ipv{version}_addr", elements)


def _reroute(
    spec: CaptureSpec, ifaces: SetRef, all_cidrs: bool, include_v4: SetRef | None, include_v6: SetRef | None
) -> list[Rule]:
    """Traffic arriving on a rerouted interface (a VM's tap) is the pod's outbound: to the outbound port."""
    redirect = Redirect(spec.outbound_port)
    if all_cidrs:
        return [Rule((Match(IIFNAME, ifaces), Match(L4PROTO, TCP)), redirect, "rerouted interface: outbound")]
    rules = []
    for daddr, ref, label in ((IP_DADDR, include_v4, "ipv4"), (IP6_DADDR, include_v6, "ipv6")):
        if ref:
            matches = (Match(IIFNAME, ifaces), Match(daddr, ref), Match(L4PROTO, TCP))
            rules.append(Rule(matches, redirect, f"rerouted interface: outbound {label}"))
    return rules


def _outbound_capture(
    spec: CaptureSpec,
    all_cidrs: bool,
    include_v4: SetRef | None,
    include_v6: SetRef | None,
    include_ports: SetRef | None,
) -> list[Rule]:
    """The final redirect rules: only TCP, only included ports and CIDRs."""
    if spec.include_outbound_ports != ALL and include_ports is None:
        return []  # include list is empty: no outbound capture
    port_match = Match(TCP_DPORT, include_ports) if include_ports else Match(L4PROTO, TCP)
    redirect = Redirect(spec.outbound_port)
    if all_cidrs:
        return [Rule((port_match,), redirect, "capture outbound")]
    rules = []
    if include_v4:
        rules.append(Rule((Match(IP_DADDR, include_v4), port_match), redirect, "capture outbound ipv4"))
    if include_v6:
        rules.append(Rule((Match(IP6_DADDR, include_v6), port_match), redirect, "capture outbound ipv6"))
    return rules
