"""From a validated CaptureSpec to the pod's `Ruleset`: a pure function, a phase per chain.

`build_ruleset(spec)` declares the named sets the spec needs (`_declare`),
then builds each base chain from them: `tproxy_prerouting` (TPROXY inbound),
`prerouting` (rerouted interfaces, REDIRECT inbound) and `output`. The order
of rules is docs/contracts.md's "Rule order", the order real sidecars rely on: the
first matching rule wins.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .ruleset import (
    IIFNAME,
    IP6_DADDR,
    IP6_SADDR,
    IP_DADDR,
    IP_SADDR,
    L4PROTO,
    MANGLE_PRIORITY,
    NFPROTO,
    OIFNAME,
    PROXY_PASSTHROUGH_V4,
    PROXY_PASSTHROUGH_V6,
    RETURN,
    SKGID,
    SKUID,
    SOCKET_TRANSPARENT,
    TCP,
    TCP_DPORT,
    TCP_SYN,
    TCP_SYN_ONLY,
    TPROXY_MARK,
    UDP_DPORT,
    Chain,
    ClampMss,
    MarkAccept,
    Match,
    NamedSet,
    PolicyRouting,
    Prefix,
    Range,
    Redirect,
    RouteMss,
    Rule,
    RuleKind,
    Ruleset,
    Selector,
    SetRef,
    TProxy,
    Value,
    masked_mark,
)
from .spec import CaptureSpec
from .values import ALL, Network, PortRange, merge_ranges

DNS_PORT = 53
K = RuleKind
DADDR = {4: IP_DADDR, 6: IP6_DADDR}


def build_ruleset(spec: CaptureSpec) -> Ruleset:
    """Render a validated spec into the pod's table. Pure: same spec, same ruleset."""
    sets = _declare(spec)
    first = [] if spec.capture_ipv6 else [Rule((Match(NFPROTO, "ipv6"),), RETURN, K.IPV6_NOT_CAPTURED)]
    chains = []
    nat_in = _reroute(spec, sets) + ([] if spec.tproxy or not spec.captures_inbound else _redirect_inbound(spec, sets))
    if nat_in:
        chains.append(Chain("prerouting", "prerouting", (*first, *nat_in)))
    if spec.tproxy:
        tproxy = (*first, *_tproxy_inbound(spec, sets))
        chains.append(Chain("tproxy_prerouting", "prerouting", tproxy, MANGLE_PRIORITY, "filter"))
    chains.append(Chain("output", "output", (*first, *_output(spec, sets))))
    if spec.loopback_mss:
        clamp = Rule((Match(TCP_SYN, "syn"),), ClampMss(), K.MSS_TO_PATH)
        chains.append(Chain("postrouting", "postrouting", (clamp,), MANGLE_PRIORITY, "filter"))
    routing = PolicyRouting(ipv6=spec.capture_ipv6) if spec.tproxy else None
    sysctls = tuple(
        (f"net/ipv4/{name}", " ".join(map(str, sizes)))
        for name, sizes in (("tcp_rmem", spec.tcp_rmem), ("tcp_wmem", spec.tcp_wmem))
        if sizes
    )
    route_mss = RouteMss() if spec.loopback_mss else None
    return Ruleset(tuple(sets.declared), tuple(chains), routing=routing, route_mss=route_mss, sysctls=sysctls)


# --- the named sets ---


@dataclass
class _Sets:
    """The named sets a spec needs, each a reference (None when it would be empty), in declaration order."""

    declared: list[NamedSet] = field(default_factory=list)
    exclude_ifaces: SetRef | None = None
    reroute_ifaces: SetRef | None = None
    exclude_uids: SetRef | None = None
    in_exclude_ports: SetRef | None = None
    in_include_ports: SetRef | None = None
    in_exclude_src: list[tuple[Selector, SetRef]] = field(default_factory=list)
    out_exclude_ports: SetRef | None = None
    out_include_ports: SetRef | None = None
    out_capture_ports: SetRef | None = None
    families: tuple[int, ...] = (4, 6)  # the IP versions captured: (4,) with `capture-ipv6: false`
    out_exclude: dict[int, SetRef | None] = field(default_factory=dict)
    out_include: dict[int, SetRef | None] = field(default_factory=dict)
    loopback: dict[int, Value | None] = field(default_factory=dict)

    def named(self, name: str, type_: str, elements: tuple[Value, ...], interval: bool = True) -> SetRef | None:
        """Declare a named set if it has elements; return a reference to it, or None."""
        if not elements:
            return None
        self.declared.append(NamedSet(name, type_, interval, elements))
        return SetRef(name)


def _declare(spec: CaptureSpec) -> _Sets:
    s = _Sets(families=(4, 6) if spec.capture_ipv6 else (4,))

    def networks(cidrs: Iterable[Network], version: int) -> tuple[Value, ...]:
        return _networks(cidrs, version) if version in s.families else ()

    s.exclude_ifaces = s.named("exclude_ifaces", "ifname", tuple(spec.exclude_interfaces), interval=False)
    s.reroute_ifaces = s.named("reroute_ifaces", "ifname", tuple(spec.reroute_interfaces), interval=False)
    s.exclude_uids = s.named("exclude_uids", "uid", tuple(spec.exclude_uids), interval=False)
    proxy_and_excluded = merge_ranges([(p, p) for p in spec.proxy_ports] + list(spec.exclude_inbound_ports))
    s.in_exclude_ports = s.named("in_exclude_ports", "inet_service", _ports(proxy_and_excluded))
    if spec.include_inbound_ports != ALL:
        s.in_include_ports = s.named("in_include_ports", "inet_service", _ports(spec.include_inbound_ports))
    for saddr, v in ((IP_SADDR, 4), (IP6_SADDR, 6)):
        ref = s.named(f"in_exclude_src_v{v}", f"ipv{v}_addr", networks(spec.exclude_inbound_cidrs, v))
        if ref is not None:
            s.in_exclude_src.append((saddr, ref))
    s.out_exclude_ports = s.named("out_exclude_ports", "inet_service", _ports(spec.exclude_outbound_ports))
    if spec.include_outbound_ports != ALL:
        s.out_include_ports = s.named("out_include_ports", "inet_service", _ports(spec.include_outbound_ports))
    s.out_capture_ports = s.named("out_capture_ports", "inet_service", _ports(spec.capture_outbound_ports))
    for v in (4, 6):
        s.out_exclude[v] = s.named(f"out_exclude_v{v}", f"ipv{v}_addr", networks(spec.exclude_outbound_cidrs, v))
    for v in (4, 6):
        include = spec.include_outbound_cidrs
        s.out_include[v] = (
            None if include == ALL else s.named(f"out_include_v{v}", f"ipv{v}_addr", networks(include, v))
        )
    for v in (4, 6):
        s.loopback[v] = _one_or_set(s, v, spec) if v in s.families else None
    return s


def _ports(ranges: Iterable[PortRange]) -> tuple[Value, ...]:
    return tuple(low if low == high else Range(low, high) for low, high in ranges)


def _networks(networks: Iterable[Network], version: int) -> tuple[Value, ...]:
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


def _one_or_set(s: _Sets, version: int, spec: CaptureSpec) -> Value | None:
    """The loopback destinations of one family: inline when one CIDR (the common case), else a set."""
    elements = _networks(spec.loopback_cidrs, version)
    if len(elements) <= 1:
        return elements[0] if elements else None
    return s.named(f"loopback_v{version}", f"ipv{version}_addr", elements)


# --- inbound: prerouting ---


def _inbound_exclusions(spec: CaptureSpec, s: _Sets) -> list[Rule]:
    """What inbound capture never takes: excluded interfaces and sources, the proxy's and excluded ports."""
    rules: list[Rule] = []
    if s.exclude_ifaces:
        rules.append(Rule((Match(IIFNAME, s.exclude_ifaces),), RETURN, K.EXCLUDED_INTERFACE))
    if spec.tproxy:
        rules.append(Rule((Match(IIFNAME, "lo"),), RETURN, K.LOOPBACK_INTERFACE))
        if s.reroute_ifaces:
            rules.append(Rule((Match(IIFNAME, s.reroute_ifaces),), RETURN, K.REROUTED_INTERFACE))
    rules += [Rule((Match(saddr, ref),), RETURN, K.EXCLUDED_INBOUND_SOURCES) for saddr, ref in s.in_exclude_src]
    assert s.in_exclude_ports is not None  # the proxy's own ports are always in it
    rules.append(Rule((Match(TCP_DPORT, s.in_exclude_ports),), RETURN, K.EXCLUDED_INBOUND_PORTS))
    return rules


def _inbound_ports(s: _Sets) -> Match:
    return Match(TCP_DPORT, s.in_include_ports) if s.in_include_ports else Match(L4PROTO, TCP)


def _redirect_inbound(spec: CaptureSpec, s: _Sets) -> list[Rule]:
    """REDIRECT inbound (nat prerouting): the proxy sees the pod's address as its local one."""
    capture = Rule((_inbound_ports(s),), Redirect(spec.inbound_port), K.CAPTURE_INBOUND)
    return [*_inbound_exclusions(spec, s), capture]


def _tproxy_inbound(spec: CaptureSpec, s: _Sets) -> tuple[Rule, ...]:
    """TPROXY inbound (mangle prerouting): established flows to their socket, new ones to the proxy's port.

    A new connection's SYN never takes the established path, even when a socket matches it: the proxy's
    accepted socket lingers in TIME_WAIT with the dialled address as its own (transparent), and a client that
    reuses its source port would match it, be routed locally untouched, and reach the app's own listener
    through the TIME_WAIT: uncaptured (tests/integration/test_port_reuse.py)."""
    established = (Match(TCP_SYN_ONLY, "syn", negate=True), Match(SOCKET_TRANSPARENT, 1))  # TCP: the flags say so
    rules = [*_inbound_exclusions(spec, s), Rule(established, MarkAccept(TPROXY_MARK), K.ESTABLISHED_INBOUND)]
    for version, family, kind in ((4, "ip", K.CAPTURE_INBOUND_IPV4), (6, "ip6", K.CAPTURE_INBOUND_IPV6)):
        if version in s.families:
            rules.append(Rule((_inbound_ports(s),), TProxy(spec.inbound_port, family, TPROXY_MARK), kind))
    return tuple(rules)


def _reroute(spec: CaptureSpec, s: _Sets) -> list[Rule]:
    """Traffic arriving on a rerouted interface (a VM's tap) is the pod's outbound: to the outbound port."""
    if not s.reroute_ifaces:
        return []
    redirect = Redirect(spec.outbound_port)
    tcp = Match(L4PROTO, TCP)
    if spec.include_outbound_cidrs == ALL:
        return [Rule((Match(IIFNAME, s.reroute_ifaces), tcp), redirect, K.REROUTED_OUTBOUND)]
    rules = []
    for v, kind in ((4, K.REROUTED_OUTBOUND_IPV4), (6, K.REROUTED_OUTBOUND_IPV6)):
        ref = s.out_include[v]
        if ref:
            rules.append(Rule((Match(IIFNAME, s.reroute_ifaces), Match(DADDR[v], ref), tcp), redirect, kind))
    return rules


# --- outbound: output ---


def _output(spec: CaptureSpec, s: _Sets) -> tuple[Rule, ...]:
    return (
        *_output_exclusions(spec, s),
        *_own_ip_inbound(spec, s),
        *_exemptions(spec, s),
        *_dns(spec),  # before lo's return: an app's DNS to a resolver on loopback goes to the proxy, as in Istio
        Rule((Match(OIFNAME, "lo"),), RETURN, K.LOOPBACK_INTERFACE),
        *_destination_exclusions(s),
        *_outbound_capture(spec, s),
    )


def _owners(spec: CaptureSpec) -> list[tuple[Selector, int, RuleKind, RuleKind]]:
    """The proxy's identities: (selector, id, its exemption kind, its own-IP kind)."""
    owners = [(SKUID, spec.proxy_uid, K.PROXY_UID, K.OWN_IP_VIA_PROXY_UID)]
    if spec.proxy_gid is not None:
        owners.append((SKGID, spec.proxy_gid, K.PROXY_GID, K.OWN_IP_VIA_PROXY_GID))
    if spec.proxy_mark is not None:
        mark, mask = spec.proxy_mark
        owners.append((masked_mark(mask), mark, K.PROXY_MARK, K.OWN_IP_VIA_PROXY_MARK))
    return owners


def _output_exclusions(spec: CaptureSpec, s: _Sets) -> list[Rule]:
    rules: list[Rule] = []
    if s.exclude_ifaces:
        rules.append(Rule((Match(OIFNAME, s.exclude_ifaces),), RETURN, K.EXCLUDED_INTERFACE))
    if s.out_exclude_ports:
        rules.append(Rule((Match(TCP_DPORT, s.out_exclude_ports),), RETURN, K.EXCLUDED_OUTBOUND_PORTS))
        if spec.capture_dns:
            rules.append(Rule((Match(UDP_DPORT, s.out_exclude_ports),), RETURN, K.EXCLUDED_OUTBOUND_PORTS_UDP))
    for version, saddr, passthrough in ((4, IP_SADDR, PROXY_PASSTHROUGH_V4), (6, IP6_SADDR, PROXY_PASSTHROUGH_V6)):
        if version in s.families:
            rules.append(Rule((Match(OIFNAME, "lo"), Match(saddr, passthrough)), RETURN, K.PROXY_PASSTHROUGH))
    return rules


def _own_ip_inbound(spec: CaptureSpec, s: _Sets) -> list[Rule]:
    """The proxy reaching its own pod's IP over lo is inbound traffic: to the inbound port."""
    if not (spec.captures_inbound and spec.capture_own_ip):
        return []
    assert s.in_exclude_ports is not None
    rules = []
    for selector, owner, _, kind in _owners(spec):
        for family in s.families:
            matches = [Match(OIFNAME, "lo")]
            loopback = s.loopback[family]
            if loopback is not None:
                matches.append(Match(DADDR[family], loopback, negate=True))
            matches += [
                Match(selector, owner),
                Match(TCP_DPORT, DNS_PORT, negate=True),
                Match(TCP_DPORT, s.in_exclude_ports, negate=True),
            ]
            if s.in_include_ports:
                matches.append(Match(TCP_DPORT, s.in_include_ports))
            rules.append(Rule(tuple(matches), Redirect(spec.inbound_port), kind))
    return rules


def _exemptions(spec: CaptureSpec, s: _Sets) -> list[Rule]:
    rules = [Rule((Match(selector, owner),), RETURN, kind) for selector, owner, kind, _ in _owners(spec)]
    if s.exclude_uids:
        rules.append(Rule((Match(SKUID, s.exclude_uids),), RETURN, K.EXCLUDED_UIDS))
    return rules


def _dns(spec: CaptureSpec) -> list[Rule]:
    if not spec.capture_dns:
        return []
    return [
        Rule((Match(UDP_DPORT, DNS_PORT),), Redirect(spec.dns_port), K.DNS_UDP),
        Rule((Match(TCP_DPORT, DNS_PORT),), Redirect(spec.dns_port), K.DNS_TCP),
    ]


def _destination_exclusions(s: _Sets) -> list[Rule]:
    rules = []
    for family in (4, 6):
        loopback = s.loopback[family]
        if loopback is not None:
            rules.append(Rule((Match(DADDR[family], loopback),), RETURN, K.LOOPBACK_DESTINATION))
    for family, kind in ((4, K.EXCLUDED_IPV4_CIDRS), (6, K.EXCLUDED_IPV6_CIDRS)):
        excluded = s.out_exclude[family]
        if excluded:
            rules.append(Rule((Match(DADDR[family], excluded),), RETURN, kind))
    return rules


def _outbound_capture(spec: CaptureSpec, s: _Sets) -> list[Rule]:
    """The final redirect rules: only TCP, only included ports and CIDRs."""
    redirect = Redirect(spec.outbound_port)
    rules = []
    if s.out_capture_ports:
        rules.append(Rule((Match(TCP_DPORT, s.out_capture_ports),), redirect, K.CAPTURE_OUTBOUND_PORTS))
    if spec.include_outbound_ports != ALL and s.out_include_ports is None:
        return rules  # the include list is empty: no outbound capture beyond the capture ports
    ports = Match(TCP_DPORT, s.out_include_ports) if s.out_include_ports else Match(L4PROTO, TCP)
    if spec.include_outbound_cidrs == ALL:
        return [*rules, Rule((ports,), redirect, K.CAPTURE_OUTBOUND)]
    for v, kind in ((4, K.CAPTURE_OUTBOUND_IPV4), (6, K.CAPTURE_OUTBOUND_IPV6)):
        include = s.out_include[v]
        if include:
            rules.append(Rule((Match(DADDR[v], include), ports), redirect, kind))
    return rules
