"""A pod with NET_ADMIN fills its own netns: what we read there stays bounded (issue #21.12).

300 000 elements in one of our sets, 40 000 policy rules: our table is counted from a netlink stream
(never listed) and found too large; the routing is read as a stream and only our objects are kept.
Memory is measured with tracemalloc around the read (the agent's RSS: tests/e2e/test_lifecycle.py).
"""

from __future__ import annotations

import tracemalloc

from cni_redirect.backend import KernelBackend
from cni_redirect.nftsize import bound_for
from cni_redirect.ruleset import normalize
from tests.support import render

ELEMENTS = 300_000
RULES = 40_000


def _fill_set(pod, tmp_path) -> None:
    batch = tmp_path / "elements.nft"
    with batch.open("w") as out:
        for chunk in range(ELEMENTS // 10_000):
            names = ", ".join(f'"x{chunk}-{i}"' for i in range(10_000))
            out.write(f"add element inet cni_redirect exclude_ifaces {{ {names} }}\n")
    pod.run("nft", "-f", str(batch))


def _add_rules(pod, tmp_path) -> None:
    batch = tmp_path / "rules.batch"
    batch.write_text(
        "".join(
            f"rule add from 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} table 100 pref {41_000 - i}\n"
            for i in range(RULES)
        )
    )
    pod.run("ip", "-batch", str(batch))


def _peak_kib(read):
    tracemalloc.start()
    try:
        result = read()
        return result, tracemalloc.get_traced_memory()[1] // 1024
    finally:
        tracemalloc.stop()


def test_a_table_the_pod_filled_is_counted_never_listed_and_then_replaced(pod, tmp_path):
    ruleset = render("tproxy")
    backend = KernelBackend()
    with backend.session(pod.path) as session:
        session.apply(ruleset)
    _fill_set(pod, tmp_path)
    bound = bound_for(ruleset.objects())
    with backend.session(pod.path) as session:
        observed, peak = _peak_kib(lambda: session.observe(True, bound))
    print(f"\n[hostile] observe of a table with {ELEMENTS} extra elements: {peak} KiB peak (Python heap)")
    assert observed.listing is None and observed.oversized == f"more than {bound.elements} set elements"
    assert peak < 4096
    with backend.session(pod.path) as session:
        session.apply(ruleset)  # what repair does with the drift: replace, never list
        observed = session.observe(True, bound)
    assert observed.oversized == "" and normalize(observed.listing) == normalize(ruleset.objects())


def test_policy_routing_is_read_as_a_stream_keeping_only_ours(pod, tmp_path):
    ruleset = render("tproxy")
    backend = KernelBackend()
    with backend.session(pod.path) as session:
        session.apply(ruleset)
    _add_rules(pod, tmp_path)
    with backend.session(pod.path) as session:
        routing, peak = _peak_kib(session.routing)
    print(f"\n[hostile] routing read among {RULES} foreign rules: {peak} KiB peak (Python heap)")
    assert sorted(map(str, routing)) == sorted(map(str, ruleset.routing.objects(ipv6=True)))
    assert peak < 2048
    with backend.session(pod.path) as session:
        assert session.remove()
        assert session.routing() == ()
    assert pod.run("ip", "rule").stdout.count("lookup 100") == RULES, "the pod's own rules are not ours to touch"
