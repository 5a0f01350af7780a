"""nft syntax from a table's JSON objects: one renderer for `render`, `inspect`, the docs and the fake's dump.

It reads `Ruleset.objects()` or a kernel listing of the same shape, so what
`inspect --pod` prints is the kernel's own table, with its counters. A pod
with NET_ADMIN can write anything into its netns, our table included: what
this renderer has no syntax for (a chain without a hook, a statement we never
write, another kind of object) is shown as escaped JSON, never a traceback,
and every string is escaped for a terminal.
"""

from __future__ import annotations

import json

PROTOCOL_NAMES = {6: "tcp", 17: "udp"}


def _safe(text: object) -> str:
    """A name or word for a terminal: non-printables (escape sequences, newlines) escaped."""
    text = str(text)
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _quoted(text: str) -> str:
    return '"' + _safe(text).replace('"', '\\"') + '"'


def _as_json(obj: object) -> str:
    """What has no nft syntax here, as JSON: ASCII only, so nothing in it can reach the terminal raw."""
    return json.dumps(obj, ensure_ascii=True, sort_keys=True, default=repr)


#: The statement that sets a SYN's MSS to its route's MTU, as libnftables writes and lists it.
TCP_MSS_TO_PATH = {"key": {"tcp option": {"name": "maxseg", "field": "size"}}, "value": {"rt": {"key": "mtu"}}}


def _selector_text(left: dict) -> str:
    if "&" in left:  # `meta mark & 0xfff`, `tcp flags & (syn | rst)`
        inner, mask = left["&"]
        flags = isinstance(mask, list)
        shown = "(" + " | ".join(_safe(flag) for flag in mask) + ")" if flags else f"{int(mask):#x}"
        return f"{_selector_text(inner)} & {shown}"
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
        return _quoted(value) if quoted and not value.startswith("@") else _safe(value)
    if protocol and value in PROTOCOL_NAMES:
        return PROTOCOL_NAMES[value]
    return _safe(value)


def _statement_text(expr: dict, with_counters: bool = False) -> str:
    try:
        return _known_statement_text(expr, with_counters)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return f"[{_as_json(expr)}]"  # a statement we never write (a pod's own), or one not as we write it


def _known_statement_text(expr: dict, with_counters: bool) -> str:
    ((kind, body),) = expr.items()
    if kind == "match":
        left = body["left"]
        quoted = left.get("meta", {}).get("key") in ("iifname", "oifname")
        protocol = left.get("meta", {}).get("key") == "l4proto"
        if "&" in left:  # a masked compare: nft prints the operator, and a mark in hex
            right = body["right"]
            shown = f"{right:#x}" if isinstance(right, int) else _json_value_text(right)
            return f"{_selector_text(left)} {body['op']} {shown}"
        op = "" if body["op"] == "==" else f"{body['op']} "
        if left.get("meta", {}).get("key") == "mark" and isinstance(body["right"], int):
            return f"meta mark {op}{body['right']:#x}"
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
    if kind == "mangle" and body == TCP_MSS_TO_PATH:
        return "tcp option maxseg size set rt mtu"
    raise ValueError(f"no nft syntax for statement {expr!r}")


def nft_text(objects: list[dict], with_counters: bool = False) -> str:
    """Render a table's objects (`Ruleset.objects()` or a listing of the same shape) as an nft script;
    `with_counters` shows each rule's packets and bytes, as `nft list table` does."""
    blocks: list[list[str]] = []
    rules: dict[str, list[str]] = {}
    header = ""
    for obj in objects:
        try:
            header = _object_text(obj, blocks, rules, with_counters) or header
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            blocks.append([f"\t# {_as_json(obj)}"])  # an object we have no syntax for, or malformed
    for block in blocks:
        if block[0].startswith("\tchain "):
            block += rules.pop(block[0].split()[1], [])
            block.append("\t}")
    for chain, orphans in rules.items():  # rules of a chain the listing did not hold
        blocks.append([f"\t# rules of chain {_safe(chain)}, not listed", *orphans])
    lines = [header or "table {"]
    for index, block in enumerate(blocks):
        if index:
            lines.append("")
        lines += block
    lines.append("}")
    return "\n".join(lines) + "\n"


def _object_text(obj: dict, blocks: list[list[str]], rules: dict[str, list[str]], with_counters: bool) -> str:
    """Add one object's lines; returns the table's header line for the table object, else ""."""
    ((kind, body),) = obj.items()
    if kind == "table":
        return f"table {_safe(body['family'])} {_safe(body['name'])} {{"
    if kind == "set":
        block = [f"\tset {_safe(body['name'])} {{", f"\t\ttype {_safe(body['type'])}"]
        if "interval" in body.get("flags", ()):
            block.append("\t\tflags interval")
        if body.get("elem"):
            quoted = body["type"] == "ifname"
            block.append("\t\telements = { " + ", ".join(_json_value_text(e, quoted) for e in body["elem"]) + " }")
        block.append("\t}")
        blocks.append(block)
    elif kind == "chain":
        name = _safe(body["name"])
        rules.setdefault(name, [])
        block = [f"\tchain {name} {{"]
        if "hook" in body:  # a base chain; a pod's regular chain has no hook, type or policy
            hook = (_safe(body[key]) for key in ("type", "hook", "prio", "policy"))
            block.append("\t\ttype {} hook {} priority {}; policy {};".format(*hook))
        blocks.append(block)
    elif kind == "rule":
        text = " ".join(_statement_text(expr, with_counters) for expr in body["expr"])
        if body.get("comment"):
            text += f" comment {_quoted(body['comment'])}"
        rules.setdefault(_safe(body["chain"]), []).append(f"\t\t{text}")
    else:
        raise ValueError(kind)
    return ""
