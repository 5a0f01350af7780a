"""The value grammar: every setting arrives as a string, and these parse it into canonical values.

Strings in, canonical values out, ValueError on bad input: ports and port
ranges (merged, since nft interval sets reject overlaps), CIDRs (collapsed,
never with a zone ID), UIDs, interface names, `*` selections. `show()` quotes
a value for a message, escaped and cut short. Nothing here knows the
catalogue or where a value came from.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator

from .errors import show

ALL: Literal["*"] = "*"
MAX_UID = 4294967294  # (uid_t)-1 means "no change" to the kernel, never a real UID

PortRange = tuple[int, int]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

_INT = re.compile(r"[0-9]{1,10}")
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,14}")
#: What `valueschema` derives the chart's patterns from: the integer bounds and the grammars here.
PORT_RANGE = (1, 65535)
UID_RANGE = (0, MAX_UID)
INT_DIGITS = 10  # _INT
IFNAME_PATTERN = _IFNAME.pattern
INBOUND_MODES = ("redirect", "tproxy")
TCP_BUFFER_RANGE = (1, 2**31 - 1)  # net.ipv4.tcp_rmem / tcp_wmem: three ints the kernel takes
MARK_RANGE = (0, 2**32 - 1)
_MARK = re.compile(r"(?:0[xX][0-9A-Fa-f]{1,8}|[0-9]{1,10})")
MARK_PATTERN = _MARK.pattern


def _items(value: str) -> list[str]:
    """Split a comma list; an empty string is an empty list, an empty item is an error."""
    text = value.strip()
    if not text:
        return []
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise ValueError("empty item in comma list")
    return items


def parse_bool(value: str) -> bool:
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
    return _parse_int(value.strip(), "a port", *PORT_RANGE)


def _parse_uid(value: str) -> int:
    return _parse_int(value.strip(), "a UID", *UID_RANGE)


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
            low = _parse_int(low_text.strip(), "a port", *PORT_RANGE)
            high = _parse_int(high_text.strip(), "a port", *PORT_RANGE) if dash else low
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


def _parse_tcp_buffers(value: str) -> tuple[int, ...]:
    """`MIN DEFAULT MAX` bytes, as the tcp_rmem/tcp_wmem sysctls take them; empty: leave the pod's own."""
    words = value.split()
    if not words:
        return ()
    if len(words) != 3:
        raise ValueError('must be three sizes in bytes, "MIN DEFAULT MAX", or empty')
    sizes = tuple(_parse_int(word, "a size in bytes", *TCP_BUFFER_RANGE) for word in words)
    if not sizes[0] <= sizes[1] <= sizes[2]:
        raise ValueError(f"{show(value)}: MIN <= DEFAULT <= MAX")
    return sizes


def _parse_mark(text: str) -> int:
    if not _MARK.fullmatch(text):
        raise ValueError(f"{show(text)} is not a packet mark (0x hex or decimal, 32 bits)")
    number = int(text, 0) if text[:2].lower() == "0x" else int(text)
    if not MARK_RANGE[0] <= number <= MARK_RANGE[1]:
        raise ValueError(f"{number} is out of range for a packet mark")
    return number


def _parse_proxy_mark(value: str) -> tuple[int, int] | None:
    """`MARK` or `MARK/MASK` (Istio ambient's `0x539/0xfff`); empty: no mark exemption."""
    text = value.strip()
    if not text:
        return None
    mark_text, slash, mask_text = text.partition("/")
    mark = _parse_mark(mark_text.strip())
    mask = _parse_mark(mask_text.strip()) if slash else MARK_RANGE[1]
    if mark == 0 or mark & mask != mark:
        raise ValueError(f"{show(value)}: the mark must be non-zero and within its mask")
    return mark, mask


def _parse_inbound_mode(value: str) -> str:
    text = value.strip().lower()
    if text not in INBOUND_MODES:
        raise ValueError('must be "redirect" or "tproxy"')
    return text


Parser = Callable[[str], Any]


def _selection(parse: Parser) -> Parser:
    """Wrap a list parser so that a lone `*` means "everything"."""

    def parse_selection(value: str) -> Any:
        if value.strip() == ALL:
            return ALL
        if ALL in _items(value):
            raise ValueError('"*" cannot be combined with other items')
        return parse(value)

    return parse_selection


def _no_wildcard(parse: Parser) -> Parser:
    def parse_exclusion(value: str) -> Any:
        if ALL in _items(value):
            raise ValueError('"*" is only accepted by include-* keys')
        return parse(value)

    return parse_exclusion


def _strings_only(parse: Parser, kind: str) -> Callable[[object], Any]:
    """Reject non-string input before parsing, so a JSON number in the wrong place is named. `kind` names the
    grammar for `valueschema` (the chart's schema is generated from these parsers)."""

    def parse_string(value: object) -> Any:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, got {type(value).__name__}")
        return parse(value)

    parse_string.kind = kind  # type: ignore[attr-defined]
    parse_string.parse = parse  # type: ignore[attr-defined]
    return parse_string


Bool = Annotated[bool, BeforeValidator(_strings_only(parse_bool, "bool"))]
Port = Annotated[int, BeforeValidator(_strings_only(_parse_port, "port"))]
Uid = Annotated[int, BeforeValidator(_strings_only(_parse_uid, "uid"))]
OptionalGid = Annotated[Union[int, None], BeforeValidator(_strings_only(_parse_optional_gid, "optional-gid"))]
UidList = Annotated[tuple[int, ...], BeforeValidator(_strings_only(_parse_uid_list, "uid-list"))]
PortList = Annotated[
    tuple[PortRange, ...], BeforeValidator(_strings_only(_no_wildcard(_parse_port_ranges), "port-list"))
]
PortSelection = Annotated[
    Union[Literal["*"], tuple[PortRange, ...]],
    BeforeValidator(_strings_only(_selection(_parse_port_ranges), "port-selection")),
]
NetworkList = Annotated[
    tuple[Network, ...], BeforeValidator(_strings_only(_no_wildcard(_parse_networks), "network-list"))
]
NetworkSelection = Annotated[
    Union[Literal["*"], tuple[Network, ...]],
    BeforeValidator(_strings_only(_selection(_parse_networks), "network-selection")),
]
InterfaceList = Annotated[
    tuple[str, ...], BeforeValidator(_strings_only(_no_wildcard(_parse_interfaces), "interface-list"))
]
TcpBuffers = Annotated[tuple[int, ...], BeforeValidator(_strings_only(_parse_tcp_buffers, "tcp-buffers"))]
ProxyMark = Annotated[Union[tuple[int, int], None], BeforeValidator(_strings_only(_parse_proxy_mark, "proxy-mark"))]
InboundMode = Annotated[
    Literal["redirect", "tproxy"], BeforeValidator(_strings_only(_parse_inbound_mode, "inbound-mode"))
]
