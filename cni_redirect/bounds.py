"""How much of our table a reader may list: bounds sized from what we would write. Pure: no kernel here.

`nftsize.over` counts a netns's table against a `Bound` from a netlink stream; the evaluation sizes the
bound from its ruleset (`bound_for`), and the fake counts its own state the same way (`counts`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """At most this many rules, set elements (as the kernel counts them: an interval is two) and named things
    (chains, sets, maps, stateful objects, flowtables)."""

    rules: int
    elements: int
    objects: int

    @classmethod
    def around(cls, rules: int, elements: int, objects: int) -> Bound:
        """Room for what we would write, and more: only a table far beyond it is refused."""
        return cls(rules=4 * rules + 1024, elements=4 * elements + 4096, objects=4 * objects + 256)


#: For a reader that has no evaluation to size by (an `inspect --pod` listing, a table not expected at all).
DEFAULT_BOUND = Bound.around(rules=64, elements=8192, objects=32)

#: The kinds of a listing that are named things of the table (everything but the table, rules and elements).
_NAMED = ("chain", "set", "map", "flowtable", "counter", "quota", "limit", "ct helper", "ct timeout",
          "ct expectation", "secmark", "synproxy")  # fmt: skip


def counts(objects: list[dict]) -> tuple[int, int, int]:
    """Rules, set elements and named things in JSON objects, as the kernel counts them (an interval as two)."""
    rules = sum(1 for obj in objects if "rule" in obj)
    elements = sum(
        2 * len(body.get("elem", ())) for obj in objects for kind, body in obj.items() if kind in ("set", "element")
    )
    named = sum(1 for obj in objects for kind in obj if kind in _NAMED)
    return rules, elements, named


def bound_for(objects: list[dict]) -> Bound:
    """The bound for a netns that should hold `objects` (a ruleset's)."""
    return Bound.around(*counts(objects))
