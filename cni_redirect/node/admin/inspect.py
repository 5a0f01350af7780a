"""`cni-redirect inspect`: which pods on this node are captured, whether their table is right, and traffic on it.

One row per ready pod sandbox (through CRI), decided with the entry
installed in the node's conflist and compared as CHECK compares; counters
from the table's own rules. `--pod NS/NAME` shows one pod in full: every
setting with where its value came from, and the table with its counters.
Read only.
"""

from __future__ import annotations

from typing import Any

from ...errors import show
from ...evaluation import Outcome
from ...nfttext import nft_text
from ...ruleset import counters
from ..pods.survey import PodView

COLUMNS = ("NAMESPACE/NAME", "DECISION", "STATE", "OUT", "IN", "DNS", "EXEMPT", "DETAIL")


def view_json(view: PodView) -> dict[str, Any]:
    """One sandbox as `inspect --json` prints it (the keys are a contract)."""
    return {
        "namespace": view.namespace,
        "name": view.name,
        "sandbox_id": view.sandbox_id,
        "decision": view.decision.value,
        "state": view.state,
        "counters": counters(view.listing) if view.decision is Outcome.CAPTURED else {},
        "reason": view.reason,
        "drift": view.drift.message if view.drift is not None else "",
        "problems": view.problems,
    }


def printable(text: str) -> str:
    """Text a pod controls, safe for a terminal: non-printables escaped, as `values.show` does."""
    return text if text.isprintable() else show(text)[1:-1]


def table(views: list[PodView]) -> str:
    """The node at a glance; counter columns are connections (nat rules see a connection's first packet)."""
    rows = [COLUMNS]
    for view in views:
        numbers = counters(view.listing)

        def packets(kind: str, numbers: dict[str, Any] = numbers) -> str:
            return str(numbers[kind]["packets"]) if kind in numbers else "-"

        drift = view.drift.message if view.drift is not None else ""
        detail = drift or "; ".join(view.problems) or ("" if view.state else view.reason)
        rows.append(
            (
                printable(view.ref),
                view.decision.value,
                view.state or "-",
                packets("outbound_redirected"),
                packets("inbound_redirected"),
                packets("dns_redirected"),
                packets("proxy_exempt"),
                printable(detail),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def pod_detail(view: PodView) -> str:
    """One pod in full: the decision, every setting and where ADD's evaluation took it from, the table."""
    drift = view.drift.message if view.drift is not None else ""
    out = [
        f"pod        {printable(view.ref)}",
        f"sandbox    {view.sandbox_id}",
        f"netns      {view.netns or '-'}",
        f"decision   {view.decision.value}"
        + (f" ({printable(view.reason)})" if view.reason != view.decision.value else ""),
        f"state      {view.state or '-'}" + (f": {drift}" if drift else ""),
    ]
    out += [f"problem    {printable(problem)}" for problem in view.problems]
    evaluation = view.evaluation
    if evaluation is not None and evaluation.settings:
        out += ["", "settings (value, and where it came from):"]
        width = max(len(key) for key in evaluation.settings)
        for key, setting in evaluation.settings.items():
            value = printable(setting.value) or "(empty)"
            why = f" ({printable(setting.why)})" if setting.why else ""
            out.append(f"  {key.ljust(width)}  {value:<28} {printable(setting.source)}{why}")
        out += [f"  ignored by annotation_policy restricted: {printable(name)}" for name in sorted(evaluation.ignored)]
    out += ["", "table:" if view.listing is not None else "table: none in the pod's netns"]
    if view.listing is not None:
        out.append(nft_text(view.listing, with_counters=True).rstrip())
    ruleset = evaluation.ruleset if evaluation is not None else None
    observed = view.observed
    if ruleset is not None and observed is not None and (ruleset.route_mss or ruleset.sysctls):
        out += ["", "beside the table (loopback-mss, TCP buffers):"]
        if ruleset.route_mss is not None:
            missing = ", ".join(printable(route) for route in observed.without_mss)
            want = ", ".join(f"{family} {advmss}" for family, advmss in ruleset.route_mss.advmss)
            out.append(f"  advmss on the pod's routes ({want}): " + (f"missing on {missing}" if missing else "on all"))
        held = dict(observed.sysctls)
        out += [f"  {name.replace('/', '.')} = {printable(held.get(name, '?'))} (wanted: {value})"
                for name, value in ruleset.sysctls]  # fmt: skip
    return "\n".join(out) + "\n"
