"""The value grammar (`values.py`) as JSON Schema: the Helm chart's constraints on the entry's `defaults`.

Each catalogue key's parser names its grammar (`kind`); the pattern for a string is built here from that
grammar's own constants (integer bounds and digit count, the interface-name expression, the inbound modes),
and whether a JSON integer or boolean is accepted for the key is decided by calling the key's own parser on
what the entry turns it into (`config.PluginConf` makes `true` "true", `80` "80"). The one cross-field rule
of the catalogue, root's consent (`allow_root_proxy_uid`), is an `if`/`then` over the entry.

What a pattern cannot say, and the agent still refuses at start (`check_entry`, one log line naming the
field): a port range whose low end is above its high end, a list longer than `max_set_elements` after merging,
TCP buffer sizes out of order (MIN <= DEFAULT <= MAX), a proxy mark of 0 or outside its mask.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from . import values
from .spec import CaptureSpec

WS = r"[\t\n\v\f\r ]*"  # what str.strip() removes (its ASCII part)
SPACE = r"[\t\n\v\f\r ]+"  # what str.split() splits on


def _group(pattern: str) -> str:
    return f"(?:{pattern})"


def _alt(parts: list[str]) -> str:
    return _group("|".join(parts))


def _fixed(low: str, high: str) -> str:
    """Digit strings of one length, from `low` to `high` (inclusive), as a regex."""
    if low == high:
        return low
    if set(low) == {"0"} and set(high) == {"9"}:
        return f"[0-9]{{{len(low)}}}"
    if len(low) == 1:
        return f"[{low}-{high}]"
    rest = len(low) - 1
    if low[0] == high[0]:
        return low[0] + _group(_fixed(low[1:], high[1:]))
    parts = [low[0] + _group(_fixed(low[1:], "9" * rest))]
    if int(high[0]) - int(low[0]) > 1:
        parts.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}][0-9]{{{rest}}}")
    parts.append(high[0] + _group(_fixed("0" * rest, high[1:])))
    return _alt(parts)


def int_range(low: int, high: int, digits: int = values.INT_DIGITS) -> str:
    """A decimal integer from `low` to `high` written in at most `digits` digits, leading zeros allowed (as
    `values._parse_int` reads it: `[0-9]{1,digits}`, then the range)."""
    parts = []
    if low == 0:
        parts.append(f"0{{1,{digits}}}")
        low = 1
    for width in range(len(str(low)), len(str(high)) + 1):
        start, end = max(low, 10 ** (width - 1)), min(high, 10**width - 1)
        if start > end or width > digits:
            continue
        zeros = f"0{{0,{digits - width}}}" if digits > width else ""
        parts.append(zeros + _group(_fixed(str(start), str(end))))
    return _alt(parts)


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


def _listed(item: str) -> str:
    """A comma list as `values._items` splits it: empty is an empty list, items stripped, none empty."""
    return f"{WS}(?:{item}(?:{WS},{WS}{item})*)?{WS}"


def _selection(listed: str) -> str:
    return _alt([f"{WS}\\*{WS}", listed])


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"  # no leading zero: ipaddress refuses one
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_HEX = "[0-9A-Fa-f]{1,4}"


def _ipv6() -> str:
    """Every IPv6 form ipaddress accepts (no zone): 8 groups, or fewer around one `::` (which stands for at
    least one); an IPv4 tail counts for two groups."""
    forms = [f"(?:{_HEX}:){{7}}{_HEX}", f"(?:{_HEX}:){{6}}{_IPV4}"]
    for v4 in (False, True):
        for left in range(8):
            for right in range(8 - left):
                if left + right + (2 if v4 else 0) > 7:
                    continue
                head = f"(?:{_HEX}:){{{left - 1}}}{_HEX}" if left else ""
                if right == 0:
                    tail = _IPV4 if v4 else ""
                else:
                    tail = f"(?:{_HEX}:){{{right}}}{_IPV4}" if v4 else f"(?:{_HEX}:){{{right - 1}}}{_HEX}"
                forms.append(f"{head}::{tail}")
    return _alt(forms)


def _v4_masks() -> str:
    """The dotted masks ipaddress takes after `/`: every netmask and every hostmask."""
    masks = {str(ipaddress.IPv4Network(f"0.0.0.0/{n}").netmask) for n in range(33)}
    masks |= {str(ipaddress.IPv4Network(f"0.0.0.0/{n}").hostmask) for n in range(33)}
    return _alt([m.replace(".", r"\.") for m in sorted(masks)])


def _network() -> str:
    v4 = f"{_IPV4}(?:/(?:0*(?:3[0-2]|[12]?[0-9])|{_v4_masks()}))?"
    v6 = f"{_ipv6()}(?:/0*(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?"
    return _alt([v4, v6])


def patterns() -> dict[str, str]:
    """Each grammar's whole-value pattern, anchored."""
    port = int_range(*values.PORT_RANGE)
    uid = int_range(*values.UID_RANGE)
    size = int_range(*values.TCP_BUFFER_RANGE)
    mark = _alt(["0[xX][0-9A-Fa-f]{1,8}", int_range(*values.MARK_RANGE)])
    ports = _listed(f"{port}(?:{WS}-{WS}{port})?")
    networks = _listed(_network())
    raw = {
        "bool": f"{WS}{_alt([_any_case('true'), _any_case('false')])}{WS}",
        "port": f"{WS}{port}{WS}",
        "uid": f"{WS}{uid}{WS}",
        "optional-gid": f"{WS}(?:{uid})?{WS}",
        "uid-list": _listed(uid),
        "port-list": ports,
        "port-selection": _selection(ports),
        "network-list": networks,
        "network-selection": _selection(networks),
        "interface-list": _listed(values.IFNAME_PATTERN),
        "inbound-mode": f"{WS}{_alt([_any_case(m) for m in values.INBOUND_MODES])}{WS}",
        "tcp-buffers": f"{WS}(?:{size}{SPACE}{size}{SPACE}{size})?{WS}",
        "proxy-mark": f"{WS}(?:{mark}(?:{WS}/{WS}{mark})?)?{WS}",
    }
    return {kind: f"^{pattern}$" for kind, pattern in raw.items()}


def _parser(key: str) -> Callable[[object], Any]:
    field = next(info for info in CaptureSpec.model_fields.values() if info.alias == key)
    (validator,) = [m for m in field.metadata if hasattr(m, "func")]
    return validator.func


def _accepts(parse: Callable[[object], Any], text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


#: The JSON integers each grammar takes (the entry turns one into its decimal string): checked against the
#: grammar's own parser at both ends, and just past them, when the schema is made.
INTEGERS: dict[str, tuple[int, int]] = {
    "port": values.PORT_RANGE,
    "port-list": values.PORT_RANGE,
    "port-selection": values.PORT_RANGE,
    "uid": values.UID_RANGE,
    "optional-gid": values.UID_RANGE,
    "uid-list": values.UID_RANGE,
    "interface-list": (0, 10**15 - 1),  # 1-15 digits: an interface name
    "proxy-mark": (1, values.MARK_RANGE[1]),
}


def kind_schema(parse: Callable[[object], Any], pattern: str) -> dict:
    """One grammar: a string matching it; a JSON boolean where its parser takes "true" and "false"; a JSON
    integer within the bounds its parser takes."""
    kind = parse.kind  # type: ignore[attr-defined]
    choices: list[dict] = [{"type": "string", "pattern": pattern}]
    if _accepts(parse, "true") and _accepts(parse, "false"):
        choices.append({"type": "boolean"})
    if kind in INTEGERS:
        low, high = INTEGERS[kind]
        assert _accepts(parse, str(low)) and _accepts(parse, str(high)), kind
        assert not _accepts(parse, str(low - 1)) and not _accepts(parse, str(high + 1)), kind
        choices.append({"type": "integer", "minimum": low, "maximum": high})
    return choices[0] if len(choices) == 1 else {"anyOf": choices}


DEFS_PREFIX = "value-"


def kind_schemas() -> dict[str, dict]:
    """Every grammar of the catalogue, by `$defs` name (`value-<kind>`)."""
    pattern = patterns()
    parsers = {_parser(str(info.alias)) for info in CaptureSpec.model_fields.values()}
    by_kind = {parse.kind: parse for parse in parsers}  # type: ignore[attr-defined]
    return {DEFS_PREFIX + kind: kind_schema(parse, pattern[kind]) for kind, parse in sorted(by_kind.items())}


_ROOT = {"anyOf": [{"type": "string", "pattern": f"^{WS}0{{1,{values.INT_DIGITS}}}{WS}$"}, {"const": 0}]}
_ROOT_LISTED = {
    "anyOf": [{"type": "string", "pattern": f"(?:^|,){WS}0{{1,{values.INT_DIGITS}}}{WS}(?:,|$)"}, {"const": 0}]
}


def root_consent() -> dict:
    """UID or GID 0 in the defaults only with `allow_root_proxy_uid: true` (spec's `_root_needs_consent`)."""
    root_keys = {"proxy-uid": _ROOT, "proxy-gid": _ROOT, "exclude-uids": _ROOT_LISTED}
    return {
        "if": {"not": {"properties": {"allow_root_proxy_uid": {"const": True}}, "required": ["allow_root_proxy_uid"]}},
        "then": {"properties": {"defaults": {"properties": {key: {"not": s} for key, s in root_keys.items()}}}},
    }


def defaults_schema() -> dict[str, dict]:
    """Every catalogue key's schema, by key: a reference to its grammar's (`kind_schemas`)."""
    return {
        str(info.alias): {"$ref": f"#/$defs/{DEFS_PREFIX}{_parser(str(info.alias)).kind}"}  # type: ignore[attr-defined]
        for info in CaptureSpec.model_fields.values()
    }
