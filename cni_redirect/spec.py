"""The annotation catalogue and the validated capture spec.

Every setting arrives as a string, from a pod annotation
(`cni-redirect.io/<key>`) or from the conflist entry's `defaults` block
(`<key>`), and the annotation wins. `merge_settings` decides which value
applies and remembers where it came from, so that `build_spec` can name the
exact annotation or conflist field in every error message.

`CaptureSpec` is the one source of truth for the catalogue: each field's
alias is its key, its default (a string, parsed like any annotation) is the
built-in default, and its metadata says whether it is a list and whether it
is the opt-in. `CATALOGUE`, `LIST_KEYS` and `OPT_IN_KEY` are derived from it.

Under `annotation_policy: restricted` a pod may only opt in (`enabled:
"true"` where the admin's default is false); every other annotation is
ignored, and logged, unless the admin lists its key in `pod_settable`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .errors import InvalidConfig

ANNOTATION_PREFIX = "cni-redirect.io/"
ALL: Literal["*"] = "*"

DEFAULT_MAX_SET_ELEMENTS = 16384
MAX_UID = 4294967294  # (uid_t)-1 means "no change" to the kernel, never a real UID
_MAX_SHOWN = 120  # characters of an offending value echoed back in a message

PortRange = tuple[int, int]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True)
class Setting:
    """One effective value, a human name for where it came from, and why (when a mesh profile decided it)."""

    value: str
    source: str
    why: str = ""


@dataclass(frozen=True)
class PeerSetting:
    """A catalogue setting read from a mesh's own annotation (profiles.py), before layering.

    `append` adds the value to what applies below it (Linkerd's `skip-inbound-ports` adds to the
    configured list) instead of replacing it.
    """

    key: str
    annotation: str
    value: str
    append: bool = False
    why: str = ""


class MeshProfile(Protocol):
    """What merge_settings needs from a profile: its defaults, what it reads, what it always adds."""

    name: str
    defaults: Mapping[str, str]
    always: Mapping[str, str]

    def read(self, annotations: Mapping[str, str]) -> list[PeerSetting]: ...


def annotation_name(key: str) -> str:
    return f"annotation {ANNOTATION_PREFIX}{key}"


def default_name(key: str) -> str:
    return f"conflist defaults.{key}"


def merge_settings(
    defaults: Mapping[str, str],
    annotations: Mapping[str, str],
    policy: Literal["open", "restricted"] = "open",
    pod_settable: Iterable[str] = (),
    profile: MeshProfile | None = None,
) -> tuple[dict[str, Setting], list[str]]:
    """Layer the sources, lowest first: built-in catalogue, the profile's defaults, conflist
    defaults, the mesh's own annotations, the profile's always-added values, our annotations.

    Returns the settings and the annotations a restricted policy ignored (for the log). Unknown
    keys in our own sources are an error, whatever the policy.
    """
    settings = {key: Setting(value, "built-in default") for key, value in CATALOGUE.items()}
    if profile is not None:
        for key, value in profile.defaults.items():
            settings[key] = Setting(value, f"{profile.name} profile default")
    for key, value in defaults.items():
        if key not in CATALOGUE:
            raise InvalidConfig(
                f"conflist defaults: unknown key {show(key)}",
                f"known keys: {', '.join(CATALOGUE)}",
            )
        settings[key] = Setting(value, default_name(key))
    settable = frozenset(pod_settable)
    ignored: list[str] = []

    def pod_may_set(key: str, value: str) -> bool:
        return policy != "restricted" or key in settable or _opts_in(key, value, settings)

    if profile is not None:
        for peer in profile.read(annotations):
            if not pod_may_set(peer.key, peer.value):
                ignored.append(peer.annotation)
                continue
            below = settings[peer.key]
            if peer.append and below.value.strip():
                settings[peer.key] = Setting(
                    f"{below.value},{peer.value}", f"annotation {peer.annotation} (added to {below.source})", peer.why
                )
            else:
                settings[peer.key] = Setting(peer.value, f"annotation {peer.annotation}", peer.why)
        for key, value in profile.always.items():
            below = settings[key]
            joined = f"{below.value},{value}" if below.value.strip() else value
            settings[key] = Setting(joined, f"{below.source}, plus {profile.name}'s always-set {value}", below.why)
    for name, value in annotations.items():
        if not name.startswith(ANNOTATION_PREFIX):
            continue
        key = name[len(ANNOTATION_PREFIX) :]
        if key not in CATALOGUE:
            raise InvalidConfig(
                f"annotation {show(name)}: unknown cni-redirect annotation",
                f"known keys: {', '.join(ANNOTATION_PREFIX + k for k in CATALOGUE)}",
            )
        if not pod_may_set(key, value):
            ignored.append(name)
            continue
        settings[key] = Setting(value, annotation_name(key))
    return settings, ignored


def _opts_in(key: str, value: str, settings: Mapping[str, Setting]) -> bool:
    """Under a restricted policy the one thing a pod may say for itself: capture me."""
    if key != OPT_IN_KEY:
        return False
    if value.strip().lower() != "true":
        return False
    return value.strip().lower() != settings[key].value.strip().lower()


def is_enabled(settings: Mapping[str, Setting]) -> bool:
    """The opt-in decision alone, so pods that did not opt in cost nothing more."""
    setting = settings["enabled"]
    try:
        return _parse_bool(setting.value)
    except ValueError as exc:
        raise InvalidConfig(f"{setting.source}: invalid value {show(setting.value)}: {exc}") from None


# --- value parsers: strings in, canonical values out, ValueError on bad input ---

_INT = re.compile(r"[0-9]{1,10}")
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,14}")


def show(value: object) -> str:
    """Quote a value for a message, cut short so hostile input cannot flood logs.

    Strings are shown in double quotes; anything else (a JSON number or list in the wrong place) as its repr.
    """
    text = value if isinstance(value, str) else repr(value)
    text = text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
    if not isinstance(value, str):
        return text.encode("unicode_escape").decode("ascii")
    return '"' + text.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def _items(value: str) -> list[str]:
    """Split a comma list; an empty string is an empty list, an empty item is an error."""
    text = value.strip()
    if not text:
        return []
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise ValueError("empty item in comma list")
    return items


def _parse_bool(value: str) -> bool:
    text = value.strip().lower()
    if text == "true":
        return True
    if text == "false":
        return False
    raise ValueError('must be "true" or "false"')


def _parse_int(text: str, what: str, low: int, high: int) -> int:
    if not _INT.fullmatch(text):
        raise ValueError(f"{show(text)} is not {what} ({low}-{high})")
    number = int(text)
    if not low <= number <= high:
        raise ValueError(f"{number} is out of range for {what} ({low}-{high})")
    return number


def _parse_port(value: str) -> int:
    return _parse_int(value.strip(), "a port", 1, 65535)


def _parse_uid(value: str) -> int:
    return _parse_int(value.strip(), "a UID", 0, MAX_UID)


def _parse_optional_gid(value: str) -> int | None:
    text = value.strip()
    return None if not text else _parse_int(text, "a GID", 0, MAX_UID)


def _parse_uid_list(value: str) -> tuple[int, ...]:
    return tuple(sorted({_parse_int(item, "a UID", 0, MAX_UID) for item in _items(value)}))


def merge_ranges(ranges: Iterable[PortRange]) -> tuple[PortRange, ...]:
    """Sort and merge overlapping or adjacent ranges: nft interval sets reject overlaps."""
    merged: list[PortRange] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def _parse_port_ranges(value: str) -> tuple[PortRange, ...]:
    ranges = []
    for item in _items(value):
        low_text, dash, high_text = item.partition("-")
        try:
            low = _parse_int(low_text.strip(), "a port", 1, 65535)
            high = _parse_int(high_text.strip(), "a port", 1, 65535) if dash else low
        except ValueError:
            raise ValueError(f"{show(item)} is not a port or port range (1-65535 or LOW-HIGH)") from None
        if low > high:
            raise ValueError(f"{show(item)} is an empty range: {low} > {high}")
        ranges.append((low, high))
    return merge_ranges(ranges)


def _parse_networks(value: str) -> tuple[Network, ...]:
    networks: list[Network] = []
    for item in _items(value):
        if "%" in item:  # ipaddress keeps any text after % (an IPv6 zone) and would carry it into the ruleset
            raise ValueError(f"{show(item)}: a zone or scope ID (%...) is not allowed in a CIDR")
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{show(item)} is not an IPv4 or IPv6 address or CIDR") from None
        networks.append(network)
    v4 = ipaddress.collapse_addresses(n for n in networks if n.version == 4)
    v6 = ipaddress.collapse_addresses(n for n in networks if n.version == 6)
    return (*v4, *v6)


def _parse_interfaces(value: str) -> tuple[str, ...]:
    names = set()
    for item in _items(value):
        if not _IFNAME.fullmatch(item) or item in (".", ".."):
            raise ValueError(
                f"{show(item)} is not an interface name (1-15 of A-Z a-z 0-9 _ . @ + -, not starting with a symbol)"
            )
        names.add(item)
    return tuple(sorted(names))


def _parse_inbound_mode(value: str) -> str:
    text = value.strip().lower()
    if text not in ("redirect", "tproxy"):
        raise ValueError('must be "redirect" or "tproxy"')
    return text


def _selection(parse):
    """Wrap a list parser so that a lone `*` means "everything"."""

    def parse_selection(value: str):
        if value.strip() == ALL:
            return ALL
        if ALL in _items(value):
            raise ValueError('"*" cannot be combined with other items')
        return parse(value)

    return parse_selection


def _no_wildcard(parse):
    def parse_exclusion(value: str):
        if ALL in _items(value):
            raise ValueError('"*" is only accepted by include-* keys')
        return parse(value)

    return parse_exclusion


def _strings_only(parse):
    """Reject non-string input before parsing, so a JSON number in the wrong place is named."""

    def parse_string(value: object):
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        return parse(value)

    return parse_string


Bool = Annotated[bool, BeforeValidator(_strings_only(_parse_bool))]
Port = Annotated[int, BeforeValidator(_strings_only(_parse_port))]
Uid = Annotated[int, BeforeValidator(_strings_only(_parse_uid))]
OptionalGid = Annotated[Union[int, None], BeforeValidator(_strings_only(_parse_optional_gid))]
UidList = Annotated[tuple[int, ...], BeforeValidator(_strings_only(_parse_uid_list))]
PortList = Annotated[tuple[PortRange, ...], BeforeValidator(_strings_only(_no_wildcard(_parse_port_ranges)))]
PortSelection = Annotated[
    Union[Literal["*"], tuple[PortRange, ...]], BeforeValidator(_strings_only(_selection(_parse_port_ranges)))
]
NetworkList = Annotated[tuple[Network, ...], BeforeValidator(_strings_only(_no_wildcard(_parse_networks)))]
NetworkSelection = Annotated[
    Union[Literal["*"], tuple[Network, ...]], BeforeValidator(_strings_only(_selection(_parse_networks)))
]
InterfaceList = Annotated[tuple[str, ...], BeforeValidator(_strings_only(_no_wildcard(_parse_interfaces)))]
InboundMode = Annotated[Literal["redirect", "tproxy"], BeforeValidator(_strings_only(_parse_inbound_mode))]


def _key(text: str, *, list_: bool = False, opt_in: bool = False):
    """A catalogue entry: the built-in default as an annotation would spell it, and what kind of key it is."""
    return Field(text, validate_default=True, json_schema_extra={"list": list_, "opt_in": opt_in})


class CaptureSpec(BaseModel):
    """What one pod's capture must do, fully validated and canonical.

    Lists are sorted, de-duplicated and merged, so equal inputs give equal
    specs and the rendered ruleset is stable. Field order is catalogue order.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, alias_generator=lambda name: name.replace("_", "-")
    )

    enabled: Bool = _key("false", opt_in=True)
    proxy_uid: Uid = _key("1337")
    proxy_gid: OptionalGid = _key("")
    exclude_uids: UidList = _key("", list_=True)
    outbound_port: Port = _key("15001")
    inbound_port: Port = _key("15006")
    inbound_mode: InboundMode = _key("redirect")
    include_outbound_ports: PortSelection = _key("*", list_=True)
    exclude_outbound_ports: PortList = _key("", list_=True)
    capture_outbound_ports: PortList = _key("", list_=True)
    include_outbound_cidrs: NetworkSelection = _key("*", list_=True)
    exclude_outbound_cidrs: NetworkList = _key("", list_=True)
    include_inbound_ports: PortSelection = _key("*", list_=True)
    exclude_inbound_ports: PortList = _key("", list_=True)
    exclude_inbound_cidrs: NetworkList = _key("", list_=True)
    exclude_interfaces: InterfaceList = _key("", list_=True)
    reroute_interfaces: InterfaceList = _key("", list_=True)
    loopback_cidrs: NetworkList = _key("127.0.0.0/8,::1/128", list_=True)
    capture_own_ip: Bool = _key("true")
    capture_dns: Bool = _key("false")
    dns_port: Port = _key("15053")

    @field_validator("proxy_uid", "proxy_gid", "exclude_uids")
    @classmethod
    def _root_needs_consent(cls, value, info: ValidationInfo):
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
    def _bounded(cls, value, info: ValidationInfo):
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
        str(info.alias) for info in CaptureSpec.model_fields.values() if (info.json_schema_extra or {}).get(flag)
    )


#: Every key, with the built-in default used when neither the pod nor the conflist sets it.
CATALOGUE: dict[str, str] = {str(info.alias): str(info.default) for info in CaptureSpec.model_fields.values()}
#: Keys whose value is a comma list (or `*`).
LIST_KEYS = _catalogue_where("list")
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


def build_spec(
    settings: Mapping[str, Setting],
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
