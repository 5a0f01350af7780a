"""The catalogue and the validated capture spec.

`CaptureSpec` is the one source of truth for the catalogue: each field's
alias is its key (`cni-redirect.io/<key>` as an annotation, `<key>` in the
conflist entry's `defaults`), its default (a string, parsed like any
annotation) is the built-in default, and its metadata says whether it is a
list and whether it is the opt-in. `CATALOGUE` and `OPT_IN_KEY` are derived
from it. The value grammar is `values.py`; which source a value comes from
is `settings.py`; `build_spec` validates the layered settings, naming the
exact annotation or conflist field in every error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import InvalidConfig
from .values import (
    ALL,
    Bool,
    InboundMode,
    InterfaceList,
    NetworkList,
    NetworkSelection,
    OptionalGid,
    Port,
    PortList,
    PortSelection,
    ProxyMark,
    TcpBuffers,
    Uid,
    UidList,
    show,
)

__all__ = ["ALL", "ANNOTATION_PREFIX", "CATALOGUE", "DEFAULT_MAX_SET_ELEMENTS", "OPT_IN_KEY", "CaptureSpec"]

ANNOTATION_PREFIX = "cni-redirect.io/"
DEFAULT_MAX_SET_ELEMENTS = 16384


def _key(text: str, description: str, *, list_: bool = False, opt_in: bool = False) -> Any:
    """A catalogue entry: the built-in default as an annotation would spell it, what it does (the docs' catalogue
    table is generated from it: scripts/gen_docs.py), and what kind of key it is."""
    return Field(
        text, description=description, validate_default=True, json_schema_extra={"list": list_, "opt_in": opt_in}
    )


class CaptureSpec(BaseModel):
    """What one pod's capture must do, fully validated and canonical.

    Lists are sorted, de-duplicated and merged, so equal inputs give equal
    specs and the rendered ruleset is stable. Field order is catalogue order.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, alias_generator=lambda name: name.replace("_", "-")
    )

    enabled: Bool = _key("false", "`true` / `false`; only `true` programs rules", opt_in=True)
    proxy_uid: Uid = _key("1337", "UID whose traffic is never captured (the proxy)")
    proxy_gid: OptionalGid = _key("", "GID also exempt")
    exclude_uids: UidList = _key(
        "", "comma list of further exempt UIDs (init containers that need the network)", list_=True
    )
    outbound_port: Port = _key("15001", "port the proxy listens on for captured outbound traffic")
    inbound_port: Port = _key("15006", "port the proxy listens on for captured inbound traffic")
    inbound_mode: InboundMode = _key(
        "redirect",
        "`redirect` (nat) or `tproxy`: the proxy's transparent socket sees the connection as dialled",
    )
    include_outbound_ports: PortSelection = _key(
        "*", "`*` or ports and ranges, `80,443,8000-8100`; empty: no outbound capture", list_=True
    )
    exclude_outbound_ports: PortList = _key(
        "",
        (
            "ports and ranges never captured outbound (TCP, and UDP when DNS is captured: excluding 53 turns "
            "DNS capture off)"
        ),
        list_=True,
    )
    capture_outbound_ports: PortList = _key(
        "", "TCP ports captured whatever `include-outbound-cidrs` says (Istio's `includeOutboundPorts`)", list_=True
    )
    include_outbound_cidrs: NetworkSelection = _key(
        "*", "`*` or IPv4/IPv6 CIDRs; empty: no outbound capture", list_=True
    )
    exclude_outbound_cidrs: NetworkList = _key("", "CIDRs never captured", list_=True)
    include_inbound_ports: PortSelection = _key("*", "`*`, a list, or empty (no inbound capture)", list_=True)
    exclude_inbound_ports: PortList = _key("", "ports never captured inbound (e.g. kubelet probe ports)", list_=True)
    exclude_inbound_cidrs: NetworkList = _key(
        "", "source CIDRs whose inbound connections are never captured (Linkerd's `skip-subnets`)", list_=True
    )
    exclude_interfaces: InterfaceList = _key("", "interface names whose traffic is never captured", list_=True)
    reroute_interfaces: InterfaceList = _key(
        "",
        "TCP arriving on these interfaces (a VM's tap in KubeVirt) is the pod's outbound: it goes to the outbound port",
        list_=True,
    )
    loopback_cidrs: NetworkList = _key(
        "127.0.0.0/8,::1/128",
        (
            "destinations on `lo` that are the pod talking to itself; the proxy's traffic over `lo` to any "
            "other address goes inbound. Istio counts only `127.0.0.1/32,::1/128`"
        ),
        list_=True,
    )
    capture_own_ip: Bool = _key(
        "true", "`false`: the proxy calling its own pod's IP is not sent to the inbound port (Linkerd's behaviour)"
    )
    capture_ipv6: Bool = _key(
        "true",
        (
            "`false`: IPv6 is never captured, in or out (DNS included), and TPROXY routes IPv4 only: a "
            "dual-stack pod whose proxy listens on IPv4 alone (Istio without `ISTIO_DUAL_STACK`)"
        ),
    )
    capture_dns: Bool = _key("false", "`true`: UDP and TCP port 53 go to the DNS port")
    dns_port: Port = _key("15053", "the proxy's DNS port")
    proxy_mark: ProxyMark = _key(
        "",
        (
            "`MARK` or `MARK/MASK` (`0x539/0xfff`, as Istio ambient's ztunnel marks): traffic whose packet mark "
            "matches is never captured, beside the proxy UID, so a proxy whose UID is not unique can be exempt"
        ),
    )
    loopback_mss: Bool = _key(
        "false",
        (
            "`true`: a captured connection's SYN offers loopback's MSS (`advmss` on the pod's routes) and a "
            "postrouting clamp brings every SYN that leaves the pod back to its path's MTU: bulk traffic through "
            "capture as fast as to an explicit proxy. Off by default: it changes the primary CNI's routes"
        ),
    )
    tcp_rmem: TcpBuffers = _key(
        "", "`MIN DEFAULT MAX` bytes for the pod's `net.ipv4.tcp_rmem` (its TCP receive buffers); empty: unchanged"
    )
    tcp_wmem: TcpBuffers = _key(
        "", "`MIN DEFAULT MAX` bytes for the pod's `net.ipv4.tcp_wmem` (its TCP send buffers); empty: unchanged"
    )

    @field_validator("proxy_uid", "proxy_gid", "exclude_uids")
    @classmethod
    def _root_needs_consent(cls, value: Any, info: ValidationInfo) -> Any:
        ids = value if isinstance(value, tuple) else (value,)
        if 0 in ids and not (info.context or {}).get("allow_root_proxy_uid", False):
            raise ValueError(
                "0 (root) would exempt every root process from capture; "
                "set allow_root_proxy_uid: true in the conflist entry to allow it"
            )
        return value

    @field_validator(
        "exclude_uids",
        "include_outbound_ports",
        "exclude_outbound_ports",
        "capture_outbound_ports",
        "include_outbound_cidrs",
        "exclude_outbound_cidrs",
        "include_inbound_ports",
        "exclude_inbound_ports",
        "exclude_inbound_cidrs",
        "exclude_interfaces",
        "reroute_interfaces",
        "loopback_cidrs",
    )
    @classmethod
    def _bounded(cls, value: Any, info: ValidationInfo) -> Any:
        limit = (info.context or {}).get("max_set_elements", DEFAULT_MAX_SET_ELEMENTS)
        if value != ALL and len(value) > limit:
            raise ValueError(f"{len(value)} entries after merging exceed the limit of {limit} (max_set_elements)")
        return value

    @property
    def captures_inbound(self) -> bool:
        return self.include_inbound_ports == ALL or bool(self.include_inbound_ports)

    @property
    def tproxy(self) -> bool:
        """Inbound capture through TPROXY: the proxy sees the original destination as its local address."""
        return self.inbound_mode == "tproxy" and self.captures_inbound

    @property
    def proxy_ports(self) -> tuple[int, ...]:
        return tuple(sorted({self.inbound_port, self.outbound_port, self.dns_port}))


def _catalogue_where(flag: str) -> frozenset[str]:
    return frozenset(
        str(info.alias)
        for info in CaptureSpec.model_fields.values()
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get(flag)
    )


#: Every key, with the built-in default used when neither the pod nor the conflist sets it.
CATALOGUE: dict[str, str] = {str(info.alias): str(info.default) for info in CaptureSpec.model_fields.values()}
#: The key by which a pod opts in: under a restricted policy, the only one a pod may set (to "true").
(OPT_IN_KEY,) = _catalogue_where("opt_in")


def invalid_config(exc: ValidationError, where: Callable[[tuple, object], tuple[str, object]]) -> InvalidConfig:
    """One InvalidConfig from a pydantic error, naming the field and value of each problem.

    `where(loc, input)` names the field (annotation, conflist default, conflist field) and the value
    to show; the entry (config.py) and the annotations (here) both come through this.
    """
    problems = []
    for error in exc.errors(include_url=False):
        name, value = where(tuple(error["loc"]), error.get("input"))
        reason = str(error.get("ctx", {}).get("error", error["msg"]))
        problems.append(f"{name}: invalid value {show(value)}: {reason}" if value is not None else f"{name}: {reason}")
    return InvalidConfig(problems[0], "; ".join(problems[1:]))


class Sourced(Protocol):
    """A setting's value and the name of where it came from (settings.Setting)."""

    @property
    def value(self) -> str: ...

    @property
    def source(self) -> str: ...


def build_spec(
    settings: Mapping[str, Sourced],
    *,
    allow_root_proxy_uid: bool = False,
    max_set_elements: int = DEFAULT_MAX_SET_ELEMENTS,
) -> CaptureSpec:
    """Validate merged settings into a CaptureSpec; errors name the source and value."""
    data = {key: setting.value for key, setting in settings.items()}
    context = {"allow_root_proxy_uid": allow_root_proxy_uid, "max_set_elements": max_set_elements}

    def where(loc: tuple, _input: object) -> tuple[str, object]:
        key = str(loc[0]) if loc else ""
        setting = settings.get(key)
        return (key, None) if setting is None else (setting.source, setting.value)

    try:
        return CaptureSpec.model_validate(data, context=context)
    except ValidationError as exc:
        raise invalid_config(exc, where) from None
