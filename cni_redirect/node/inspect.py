"""`cni-redirect inspect`: which pods on this node are captured, whether their table is right, and traffic on it.

One row per ready pod sandbox (through CRI), decided with the entry
installed in the node's conflist and compared as CHECK compares; counters
from the table's own rules. `--pod NS/NAME` shows one pod in full: every
setting with where its value came from, and the table with its counters.
Read only.
"""

from __future__ import annotations

from ..config import ANNOTATIONS_CAPABILITY, parse_conf
from ..ruleset import nft_text
from ..spec import merge_settings
from .survey import PodView, counters

COLUMNS = ("NAMESPACE/NAME", "DECISION", "STATE", "OUT", "IN", "DNS", "EXEMPT", "DETAIL")


def table(views: list[PodView]) -> str:
    """The node at a glance; counter columns are connections (nat rules see a connection's first packet)."""
    rows = [COLUMNS]
    for view in views:
        numbers = counters(view.listing) if view.listing is not None else {}

        def packets(kind: str, numbers: dict = numbers) -> str:
            return str(numbers[kind]["packets"]) if kind in numbers else "-"

        detail = view.drift or "; ".join(view.problems) or ("" if view.state else view.reason)
        rows.append(
            (
                view.ref,
                view.decision,
                view.state or "-",
                packets("outbound_redirected"),
                packets("inbound_redirected"),
                packets("dns_redirected"),
                packets("proxy_exempt"),
                detail,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def pod_detail(view: PodView, entry: dict) -> str:
    """One pod in full: the decision, every setting and its source, the table with counters."""
    out = [
        f"pod        {view.ref}",
        f"sandbox    {view.sandbox_id}",
        f"netns      {view.netns or '-'}",
        f"decision   {view.decision}" + (f" ({view.reason})" if view.reason != view.decision else ""),
        f"state      {view.state or '-'}" + (f": {view.drift}" if view.drift else ""),
    ]
    out += [f"problem    {problem}" for problem in view.problems]
    if view.decision not in ("host-network", "excluded-namespace"):
        conf = parse_conf({**entry, "runtimeConfig": {ANNOTATIONS_CAPABILITY: view.annotations}})
        settings, ignored = merge_settings(conf.defaults, conf.annotations(), conf.annotation_policy, conf.pod_settable)
        out += ["", "settings (value, and where it came from):"]
        width = max(len(key) for key in settings)
        out += [
            f"  {key.ljust(width)}  {setting.value or '(empty)':<28} {setting.source}"
            for key, setting in settings.items()
        ]
        out += [f"  ignored by annotation_policy restricted: {name}" for name in sorted(ignored)]
    out += ["", "table:" if view.listing is not None else "table: none in the pod's netns"]
    if view.listing is not None:
        out.append(nft_text(view.listing, with_counters=True).rstrip())
    return "\n".join(out) + "\n"
