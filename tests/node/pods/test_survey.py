"""The survey, repair and inspect over a fake CRI and the memory backend: every decision, no root.

The e2e tier (tests/e2e/test_lifecycle.py, test_observe.py) runs the same code on a real containerd.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cni_redirect.build import build_ruleset
from cni_redirect.config import ANNOTATIONS_CAPABILITY, PodRef, parse_conf
from cni_redirect.evaluation import DriftKind, Outcome, evaluate
from cni_redirect.fake import MemoryBackend
from cni_redirect.node.admin.inspect import pod_detail, table, view_json
from cni_redirect.node.pods.nftevents import Heard
from cni_redirect.node.pods.repair import Repairer
from cni_redirect.node.pods.survey import DRIFTED, MISSING, OK, PodView, Survey
from cni_redirect.ruleset import TPROXY_MARK, TPROXY_TABLE, PolicyRouting
from cni_redirect.testing.netlab import enabled, plugin_conf
from cni_redirect.testing.sessions import at
from tests.node.fakecri import FakeCri
from tests.support import call

MESH = Path(__file__).resolve().parents[2] / "fixtures" / "mesh"
ENTRY = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "type": "cni-redirect",
    "capabilities": {ANNOTATIONS_CAPABILITY: True},
}
STALE_RULE = {"rule": {"family": "inet", "fwmark": TPROXY_MARK, "table": TPROXY_TABLE}}


def mesh_annotations(name: str) -> dict[str, str]:
    return json.loads((MESH / f"{name}-injected.json").read_text())["annotations"]


def ruleset_for(annotations: dict[str, str], **entry: Any):
    evaluation = evaluate(parse_conf(plugin_conf(annotations, **entry)), PodRef("default", "p", None))
    assert evaluation.ruleset is not None, evaluation.reason
    return evaluation.ruleset


def survey(cri: FakeCri, backend: MemoryBackend, **entry: object) -> dict[str, PodView]:
    return {view.name: view for view in Survey(cri, {**ENTRY, **entry}, backend.session).pods()}


@pytest.fixture
def node():
    return FakeCri(), MemoryBackend()


def test_every_decision_and_state(node):
    cri, backend = node
    at(backend, cri.add("ok", enabled())).apply(ruleset_for(enabled()))
    cri.add("missing", enabled())
    at(backend, cri.add("drifted", enabled(exclude_outbound_ports="80"))).apply(ruleset_for(enabled()))
    at(backend, cri.add("unexpected", {})).apply(ruleset_for(enabled()))
    cri.add("plain", {})
    cri.add("host", enabled(), host_network=True)
    cri.add("system", enabled(), namespace="kube-system")
    cri.add("bad", enabled(outbound_port="http"))
    cri.add("gone", enabled(), gone=True)
    views = survey(cri, backend)
    got = {name: (view.decision, view.state) for name, view in views.items()}
    assert got == {
        "ok": (Outcome.CAPTURED, OK),
        "missing": (Outcome.CAPTURED, MISSING),
        "drifted": (Outcome.CAPTURED, DRIFTED),
        "unexpected": (Outcome.NOT_ENABLED, DRIFTED),
        "plain": (Outcome.NOT_ENABLED, None),
        "host": (Outcome.HOST_NETWORK, None),
        "system": (Outcome.EXCLUDED_NAMESPACE, None),
        "bad": (Outcome.INVALID, None),
    }, "a sandbox gone since the listing is left out"
    assert views["unexpected"].drift is not None and views["unexpected"].drift.kind is DriftKind.UNEXPECTED
    assert "outbound-port" in views["bad"].reason
    opened = {netns for _, netns in backend.calls}
    assert opened == {f"/run/netns/{name}" for name in ("ok", "missing", "drifted", "unexpected", "plain")}, (
        "host-network, excluded and invalid sandboxes are never entered"
    )


def test_stale_tproxy_routing_in_a_redirect_pod_is_drift_that_check_also_sees(node):
    cri, backend = node
    conf = plugin_conf(enabled())
    added = call("ADD", conf, backend)
    assert added.rc == 0
    backend.routing["/run/netns/fake"].objects.append(STALE_RULE)  # left by a TPROXY table that was replaced
    cri.add("p", enabled(), netns="/run/netns/fake")
    (view,) = survey(cri, backend).values()
    assert view.state == DRIFTED and view.drift is not None
    assert "present but the pod's table does not use it" in view.drift.message
    checked = call("CHECK", conf, backend)
    assert checked.rc != 0 and checked.out["msg"] == view.drift.message, "inspect and CHECK say the same"


def test_a_sandbox_whose_status_fails_is_reported_and_the_pass_goes_on(node):
    cri, backend = node
    cri.add("first", enabled(), error="DEADLINE_EXCEEDED")
    cri.add("second", enabled())
    views = survey(cri, backend)
    assert views["first"].decision is Outcome.UNKNOWN and "DEADLINE_EXCEEDED" in views["first"].problems[0]
    assert views["second"].state == MISSING


def test_a_netns_gone_since_the_listing_is_a_problem_not_a_failure(node):
    cri, backend = node
    backend.gone.add(cri.add("p", enabled()))
    (view,) = survey(cri, backend).values()
    assert view.state is None and "does not exist" in view.problems[0]


def installed(tmp_path: Path, **entry: object) -> Path:
    document = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "bridge"}, {**ENTRY, **entry}]}
    (tmp_path / "10-net.conflist").write_text(json.dumps(document))
    return tmp_path


def repairer(tmp_path: Path, cri: FakeCri, backend: MemoryBackend, mode: str = "in-place", **entry: object):
    lines: list[tuple[str, str]] = []
    made = Repairer(cri, installed(tmp_path, **entry), lambda level, msg, **_: lines.append((level, msg)), mode=mode)
    made.sessions = backend.session
    return made, lines


def test_repair_puts_every_kind_of_drift_right_in_one_pass(node, tmp_path):
    cri, backend = node
    cri.add("missing", enabled())
    at(backend, cri.add("drifted", enabled(exclude_outbound_ports="80"))).apply(ruleset_for(enabled()))
    at(backend, cri.add("unexpected", {})).apply(ruleset_for(enabled()))
    stale = cri.add("stale-routing", enabled())
    at(backend, stale).apply(ruleset_for(enabled()))
    backend.routing[stale].objects.append(STALE_RULE)
    at(backend, cri.add("ok", enabled())).apply(ruleset_for(enabled()))
    repair, _ = repairer(tmp_path, cri, backend)
    first = repair.run_once()
    assert first.error == ""
    assert sorted(first.repaired) == [
        "default/drifted",
        "default/missing",
        "default/stale-routing",
        "default/unexpected",
    ]
    assert first.reasons == {"missing": 1, "drifted": 3}
    assert backend.routing[stale].objects == [], "stale routing removed although the pod's table needs none"
    assert "/run/netns/unexpected" not in backend.tables
    second = repair.run_once()
    assert second.repaired == [] and second.states == {"ok": 4, "not-enabled": 1}


def test_report_mode_changes_nothing(node, tmp_path):
    cri, backend = node
    cri.add("missing", enabled())
    repair, lines = repairer(tmp_path, cri, backend, mode="report")
    result = repair.run_once()
    assert result.repaired == [] and backend.tables == {}
    assert any("repair needed: default/missing" in msg for _, msg in lines)


def test_a_changed_entry_is_drift_for_every_pod_it_changes(node, tmp_path):
    cri, backend = node
    at(backend, cri.add("p", enabled())).apply(ruleset_for(enabled()))
    repair, _ = repairer(tmp_path, cri, backend, defaults={"outbound-port": "15010"})
    assert repair.run_once().repaired == ["default/p"]
    assert "redirect to :15010" in backend.dump("/run/netns/p")


def test_not_chained_is_a_failed_pass(node, tmp_path):
    cri, _ = node
    repair = Repairer(cri, tmp_path, lambda *a, **k: None)
    assert repair.run_once().error == "cni-redirect is not chained into the node's CNI config"


def test_closing_the_repairer_waits_for_the_pass_under_way_before_closing_its_cri_channel(tmp_path):
    """A stop in the middle of a pass: the CRI channel is closed after the pass ends, never under it."""
    import threading

    listing, release = threading.Event(), threading.Event()
    order: list[str] = []

    class SlowCri(FakeCri):
        def ready_sandboxes(self):
            listing.set()
            release.wait(10)
            order.append("listed")
            return super().ready_sandboxes()

        def close(self) -> None:
            order.append("closed")
            super().close()

    cri = SlowCri()
    repair = Repairer(cri, installed(tmp_path), lambda *a, **k: None)
    stop, wake = threading.Event(), threading.Event()
    repair.start(stop, wake, 30.0)
    assert listing.wait(10)
    stop.set()
    wake.set()
    threading.Timer(0.3, release.set).start()
    repair.close()
    assert order[0] == "listed" and set(order[1:]) == {"closed"}, order  # the pass closes it too, at its end


# --- inspect shows what ADD does, also where a mesh profile decides ---


def test_inspect_under_the_istio_profile_shows_what_add_programs(node):
    cri, backend = node
    annotations = {**mesh_annotations("istio"), "traffic.sidecar.istio.io/excludeOutboundPorts": "80"}
    conf = plugin_conf(annotations, profile="istio")
    assert call("ADD", conf, backend).rc == 0
    cri.add("web", annotations, netns="/run/netns/fake")
    (view,) = survey(cri, backend, profile="istio").values()
    assert (view.decision, view.state) == (Outcome.CAPTURED, OK)
    settings = {line.split()[0]: line for line in pod_detail(view).splitlines() if line.startswith("  ")}
    assert settings["enabled"].split()[1] == "true" and "sidecar.istio.io/status" in settings["enabled"]
    assert settings["proxy-gid"].split()[1] == "1337" and "istio profile default" in settings["proxy-gid"]
    assert settings["exclude-outbound-ports"].split()[1] == "80"
    assert "traffic.sidecar.istio.io/excludeOutboundPorts" in settings["exclude-outbound-ports"]
    assert "15008,15020,15021,15090" in settings["exclude-inbound-ports"]


def test_inspect_under_the_linkerd_profile_shows_its_outbound_port(node):
    cri, backend = node
    annotations = mesh_annotations("linkerd")
    assert call("ADD", plugin_conf(annotations, profile="linkerd"), backend).rc == 0
    cri.add("web", annotations, netns="/run/netns/fake")
    (view,) = survey(cri, backend, profile="linkerd").values()
    assert view.state == OK and "redirect to :4140" in backend.dump("/run/netns/fake")
    (line,) = [line for line in pod_detail(view).splitlines() if line.startswith("  outbound-port ")]
    assert line.split()[1] == "4140" and "linkerd profile default" in line


def test_inspect_escapes_what_a_pod_controls(node):
    cri, backend = node
    cri.add("web", {**enabled(), "cni-redirect.io/exclude-interfaces": "\x1b[2J\x1b[8m"})
    (view,) = survey(cri, backend).values()
    shown = pod_detail(view) + table([view])
    assert "\x1b" not in shown and "\\x1b[2J" in shown


def test_counters_come_from_rule_kinds(node):
    cri, backend = node
    path = cri.add("p", enabled(capture_dns="true"))
    spec = evaluate(parse_conf(plugin_conf(enabled(capture_dns="true"))), PodRef("d", "p", None)).spec
    assert spec is not None
    ruleset = build_ruleset(spec)
    at(backend, path).apply(ruleset)
    (view,) = survey(cri, backend).values()
    assert view.observed is not None and view.observed.listing is not None
    for obj in view.observed.listing:  # a made-up traffic count on every rule
        for expr in obj.get("rule", {}).get("expr", []):
            if "counter" in expr:
                expr["counter"] = {"packets": 1, "bytes": 60}
    counted = view_json(view)["counters"]
    assert counted == {
        "outbound_redirected": {"packets": 1, "bytes": 60},
        "inbound_redirected": {"packets": 3, "bytes": 180},  # capture inbound + own IP via the proxy UID, v4 and v6
        "dns_redirected": {"packets": 2, "bytes": 120},
        "proxy_exempt": {"packets": 1, "bytes": 60},
    }


def test_a_tproxy_pod_without_its_routing_is_drifted_and_repaired(node, tmp_path):
    cri, backend = node
    annotations = enabled(inbound_mode="tproxy")
    path = cri.add("p", annotations)
    at(backend, path).apply(ruleset_for(annotations))
    backend.routing[path].objects.clear()
    (view,) = survey(cri, backend).values()
    assert view.state == DRIFTED and view.drift is not None and "routing is missing" in view.drift.message
    repair, _ = repairer(tmp_path, cri, backend)
    assert repair.run_once().repaired == ["default/p"]
    assert len(backend.routing[path].objects) == len(PolicyRouting().objects())


# --- passes that remember: an idle node costs one listing and one generation read per pod ---


def idle_node(tmp_path: Path, pods: int = 5):
    cri, backend = FakeCri(), MemoryBackend()
    paths = [cri.add(f"p{i}", enabled()) for i in range(pods)]
    repair, _ = repairer(tmp_path, cri, backend)
    first = repair.run_once()
    assert len(first.repaired) == pods
    return cri, backend, repair, paths


def test_a_pass_where_nothing_changed_lists_no_table_and_asks_no_status(tmp_path):
    cri, backend, repair, _paths = idle_node(tmp_path)
    calls, statuses = len(backend.calls), len(cri.status_calls)
    second = repair.run_once()
    assert second.repaired == [] and second.states == {"ok": 5}
    assert len(cri.status_calls) == statuses, "PodSandboxStatus only for sandboxes not seen before"
    assert {what for what, _ in backend.calls[calls:]} == {"generation"}, "no listing, no routing dump"
    assert repair.memo.quick == 5


def test_a_generation_change_without_our_table_changing_is_compared_and_ok(tmp_path):
    _cri, backend, repair, paths = idle_node(tmp_path)
    other = {"nftables": [{"add": {"table": {"family": "ip", "name": "the-pods-own"}}}]}
    assert backend.kernels[paths[0]].json_cmd(other)[0] == 0  # a pod with NET_ADMIN edits its own netns
    calls = len(backend.calls)
    result = repair.run_once()
    assert result.repaired == [] and result.states == {"ok": 5}
    assert backend.calls[calls:].count(("observe", paths[0])) == 1, "that pod compared in full, and ok"
    assert [c for c in backend.calls[calls:] if c[0] == "observe"] == [("observe", paths[0])]


@pytest.mark.parametrize("what", ["deleted table", "edited rule"])
def test_drift_is_found_in_the_next_pass(tmp_path, what):
    _cri, backend, repair, paths = idle_node(tmp_path)
    ops = backend.ops(paths[1])
    if what == "deleted table":
        assert ops.remove()
    else:
        ops.apply(ruleset_for(enabled(exclude_outbound_ports="22")))
    result = repair.run_once()
    assert result.repaired == ["default/p1"] and result.reasons == {
        "missing" if what == "deleted table" else "drifted": 1
    }
    assert repair.run_once().repaired == []


def test_a_changed_entry_reevaluates_every_pod_once(tmp_path):
    _cri, _backend, repair, _paths = idle_node(tmp_path)
    installed(tmp_path, defaults={"outbound-port": "15010"})
    assert sorted(repair.run_once().repaired) == [f"default/p{i}" for i in range(5)]
    assert repair.run_once().repaired == []


def test_tproxy_routing_removed_without_a_transaction_is_found_by_its_dump(tmp_path):
    cri, backend = FakeCri(), MemoryBackend()
    path = cri.add("t", enabled(inbound_mode="tproxy"))
    repair, _ = repairer(tmp_path, cri, backend)
    assert repair.run_once().repaired == ["default/t"]
    assert repair.run_once().repaired == []
    backend.routing[path].objects.pop()  # a route gone, nftables untouched
    assert repair.run_once().repaired == ["default/t"]


def test_stale_routing_a_pod_adds_itself_is_found_by_the_next_full_pass(tmp_path):
    _cri, backend, repair, paths = idle_node(tmp_path)
    repair.memo.full_every = 3
    backend.routing[paths[2]].objects.append(STALE_RULE)  # no nftables transaction: the generation stays
    found = [repair.run_once().repaired for _ in range(3)]
    assert ["default/p2"] in found, found
    assert backend.routing[paths[2]].objects == []


def test_a_pass_counts_the_sandboxes_it_could_not_check(node, tmp_path):
    cri, backend = node
    cri.add("first", enabled(), error="UNAVAILABLE")
    backend.gone.add(cri.add("second", enabled()))
    cri.add("third", enabled())
    passes: list[object] = []
    repair = Repairer(cri, installed(tmp_path), lambda *a, **k: None, sessions=backend.session, on_pass=passes.append)
    result = repair.run_once()
    assert result.error == "" and result.failed == 2 and result.repaired == ["default/third"]
    assert passes == [result], "every pass is reported, failed sandboxes and all"


# --- passes that hear nftables transactions: a quiet pod's netns is not even entered ---
class MemoryEvents:
    """`nftevents.TransactionEvents` over a `MemoryBackend`, as the kernel would tell them: each pass takes in
    the netns whose transaction count moved since the last one. `unheard` holds netns paths without an id
    (never heard; their generation is read)."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend
        self.pass_number = 0
        self.counted: dict[str, int] = {}
        self.heard_in: dict[str, int] = {}
        self.unheard: set[str] = set()
        self.identified: list[str] = []

    def advance(self) -> int:
        self.pass_number += 1
        for netns, kernel in self.backend.kernels.items():
            if self.counted.get(netns, 0) != kernel.transactions:
                self.counted[netns] = kernel.transactions
                self.heard_in[netns] = self.pass_number
        return self.pass_number

    def identify(self, netns: str) -> Heard | None:
        self.identified.append(netns)
        if netns in self.unheard or netns in self.backend.gone:
            return None
        return Heard(sorted(self.backend.kernels).index(netns) if netns in self.backend.kernels else -1, (0, 0))

    def quiet(self, netns: str, heard: Heard, read_in: int) -> bool:
        return netns not in self.backend.gone and self.heard_in.get(netns, 0) <= read_in


def heard_node(tmp_path: Path, pods: int = 5):
    cri, backend, repair, paths = idle_node(tmp_path, pods)
    repair.events = events = MemoryEvents(backend)
    repair.run_once()  # identifies each netns and reads its generation with the events' count
    return cri, backend, repair, paths, events


def test_a_pass_where_nothing_was_heard_enters_no_netns(tmp_path):
    _cri, backend, repair, _paths, _events = heard_node(tmp_path)
    calls = len(backend.calls)
    result = repair.run_once()
    assert result.repaired == [] and result.states == {"ok": 5}
    assert backend.calls[calls:] == [], "no session at all"
    assert repair.memo.heard == 5


@pytest.mark.parametrize("what", ["deleted table", "edited rule"])
def test_a_heard_transaction_is_read_and_put_right_in_the_next_pass(tmp_path, what):
    _cri, backend, repair, paths, _events = heard_node(tmp_path)
    ops = backend.ops(paths[3])
    if what == "deleted table":
        assert ops.remove()
    else:
        ops.apply(ruleset_for(enabled(exclude_outbound_ports="22")))
    calls = len(backend.calls)
    assert repair.run_once().repaired == ["default/p3"]
    assert {netns for _, netns in backend.calls[calls:]} == {paths[3]}, "only the pod that was heard"
    repair.run_once()  # our own repair was heard too: that pod's generation is read once more
    calls = len(backend.calls)
    assert repair.run_once().repaired == [] and backend.calls[calls:] == []


def test_a_netns_that_cannot_be_heard_is_read_every_pass(tmp_path):
    _cri, backend, repair, paths = idle_node(tmp_path)
    repair.events = events = MemoryEvents(backend)
    events.unheard.add(paths[0])
    repair.run_once()
    for _ in range(3):
        calls = len(backend.calls)
        repair.run_once()
        assert backend.calls[calls:] == [("generation", paths[0])]
    assert events.identified.count(paths[0]) == 1, "asked again only at the next full pass"


def test_routing_and_tuning_are_read_every_pass_whatever_was_heard(tmp_path):
    cri, backend = FakeCri(), MemoryBackend()
    tproxy = cri.add("t", enabled(inbound_mode="tproxy"))
    tuned = cri.add("m", enabled(tcp_rmem="4096 131072 6291456"))
    plain = cri.add("p", enabled())
    repair, _ = repairer(tmp_path, cri, backend)
    repair.events = MemoryEvents(backend)
    repair.run_once()
    repair.run_once()
    calls = len(backend.calls)
    assert repair.run_once().repaired == []
    entered = {netns for _, netns in backend.calls[calls:]}
    assert entered == {tproxy, tuned}, "routes and sysctls change without a transaction; the plain pod is quiet"
    backend.routing[tproxy].objects.pop()  # a route gone, nftables untouched: nothing to hear
    assert repair.run_once().repaired == ["default/t"]
    assert plain not in {netns for _, netns in backend.calls[calls:]}


def test_the_full_pass_reads_every_pod_whatever_was_heard(tmp_path):
    _cri, backend, repair, paths, events = heard_node(tmp_path)
    repair.memo.full_every = 3
    backend.ops(paths[1]).remove()
    events.counted[paths[1]] = backend.kernels[paths[1]].transactions  # a message lost: the kernel never tells
    found = [repair.run_once().repaired for _ in range(3)]
    assert found == [[], ["default/p1"], []], "not heard, not read; the full pass (the third) is the belt"


# --- a burst of pod starts is not slowed by the pass: new sandboxes wait for their first look ---


def test_a_new_sandbox_younger_than_settle_waits_for_the_next_pass_once(tmp_path):
    import time

    cri, backend = FakeCri(), MemoryBackend()
    cri.add("old", enabled(), created_at=time.time() - 120)
    cri.add("new", enabled(), created_at=time.time())
    repair, _ = repairer(tmp_path, cri, backend)
    settled = repair.run_once(settle=30)
    assert settled.repaired == ["default/old"] and settled.deferred == 1
    assert repair.run_once(settle=0).repaired == ["default/new"], "a pass without settle looks at every sandbox"
    assert repair.run_once(settle=30).deferred == 0, "a sandbox seen before is never deferred"


def test_the_loop_settles_only_on_passes_the_interval_started(tmp_path):
    import threading

    repair, _ = repairer(tmp_path, FakeCri(), MemoryBackend())
    stop, wake, settles = threading.Event(), threading.Event(), []

    def run_once(settle: float = 0.0):
        settles.append(settle)
        if len(settles) == 2:
            wake.set()  # our entry came back: the next pass looks at everything at once
        if len(settles) == 4:
            stop.set()

    repair.run_once = run_once  # the loop's schedule is what is tested
    repair.loop(stop, wake, interval=0.01)
    assert settles == [0.0, 0.01, 0.0, 0.01], "the first pass and a woken one settle nothing"
