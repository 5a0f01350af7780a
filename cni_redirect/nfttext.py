"""nft syntax from a table's JSON objects: one renderer for `render`, `inspect`, the docs and the fake's dump.

It reads `Ruleset.objects()` or a kernel listing of the same shape, so what
`inspect --pod` prints is the kernel's own table, with its counters.
"""

from __future__ import annotations

PROTOCOL_NAMES = {6: "tcp", 17: "udp"}


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
