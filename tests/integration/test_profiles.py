"""The mesh profiles with real traffic: the meshes' own validators pass, and each annotation does what it does there.

A pod is annotated exactly as the mesh's injector annotates one
(tests/fixtures/mesh/*-injected.json, with where each annotation comes from),
then the row's annotations on top. Which listener answers is the outcome:
the proxy's (captured) or the app's / peer's (not captured).
"""

from __future__ import annotations

import pytest

from cni_redirect.testing.netlab import (
    PEER_V4,
    POD_V4,
    PodNetwork,
    Processes,
    connect,
    host_ruleset,
    plugin_conf,
    run_plugin,
    validate,
)
from tests.support import injected

APP_UID = 1000
APP_PORTS = (8080, 9000, 4190, 4191, 15008, 15020, 15021, 15090)
PEER_PORTS = (80, 81, 3306, 15020)


def add(pod, mesh: str, annotations: dict[str, str], **entry) -> None:
    run = run_plugin("ADD", pod.path, plugin_conf(annotations, profile=mesh, **entry))
    assert run.rc == 0, run.stdout + run.stderr


def delete(pod, mesh: str, annotations: dict[str, str]) -> None:
    run = run_plugin("DEL", pod.path, plugin_conf(annotations, profile=mesh))
    assert run.rc == 0, run.stdout + run.stderr
    assert "cni_redirect" not in pod.ruleset()


@pytest.fixture(scope="module")
def lab():
    """One pod/peer pair for a module's case table: each row ADDs, checks traffic, DELs."""
    before = host_ruleset()
    net, procs = PodNetwork.create(), Processes()
    try:
        for port in APP_PORTS:
            procs.listen(net.pod, "app", port, uid=APP_UID)
        for port in PEER_PORTS:
            procs.listen(net.peer, "peer", port)
        yield net, procs
    finally:
        procs.stop()
        net.delete()
        assert host_ruleset() == before, "the host ruleset changed"


@pytest.fixture(scope="module")
def istio_lab(lab):
    net, procs = lab
    for name, port in (("proxy-out", 15001), ("proxy-in", 15006)):
        procs.listen(net.pod, name, port, uid=1337)
    return net


@pytest.fixture(scope="module")
def linkerd_lab(lab):
    net, procs = lab
    for name, port in (("proxy-out", 4140), ("proxy-in", 4143)):
        procs.listen(net.pod, name, port, uid=2102)
    return net


def outcome(net, direction: str, port: int, uid: int = APP_UID) -> str:
    """Who answered: out = app in the pod dials the peer; in = the peer dials the pod."""
    if direction == "out":
        return connect(net.pod, PEER_V4, port, uid=uid).get("listener", "none")
    return connect(net.peer, POD_V4, port, uid=0).get("listener", "none")


def check_row(net, mesh: str, annotations: dict[str, str], expected: list[tuple[str, int, str]], **entry) -> None:
    add(net.pod, mesh, annotations, **entry)
    try:
        actual = [(direction, port, outcome(net, direction, port)) for direction, port, _ in expected]
        assert actual == expected
    finally:
        delete(net.pod, mesh, annotations)


# --- Istio: annotations -> traffic ---

#: row -> (annotation changes over the injected fixture, [(direction, port, who answers)])
Rows = dict[str, tuple[dict[str, str | None], list[tuple[str, int, str]]]]
ISTIO_ROWS: Rows = {
    "injected pod: all captured but istio's always-excluded ports": (
        {},
        [("out", 80, "proxy-out"), ("out", 15020, "peer"), ("in", 8080, "proxy-in"), ("in", 15008, "app"),
         ("in", 15020, "app"), ("in", 15021, "app"), ("in", 15090, "app")],
    ),
    "no sidecar.istio.io/status: not injected, not captured": (
        {"sidecar.istio.io/status": None},
        [("out", 80, "peer"), ("in", 8080, "app")],
    ),
    "inject false": ({"sidecar.istio.io/inject": "false"}, [("out", 80, "peer"), ("in", 8080, "app")]),
    "interceptionMode NONE": (
        {"sidecar.istio.io/interceptionMode": "NONE"},
        [("out", 80, "peer"), ("in", 8080, "app")],
    ),
    "includeOutboundIPRanges empty: no outbound": (
        {"traffic.sidecar.istio.io/includeOutboundIPRanges": ""},
        [("out", 80, "peer"), ("in", 8080, "proxy-in")],
    ),
    "includeOutboundIPRanges a CIDR holding the peer": (
        {"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.77.0.0/24"},
        [("out", 80, "proxy-out")],
    ),
    "includeOutboundIPRanges a CIDR elsewhere": (
        {"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.99.0.0/16"},
        [("out", 80, "peer")],
    ),
    "excludeOutboundIPRanges the peer": (
        {"traffic.sidecar.istio.io/excludeOutboundIPRanges": f"{PEER_V4}/32"},
        [("out", 80, "peer"), ("in", 8080, "proxy-in")],
    ),
    "includeInboundPorts empty: no inbound": (
        {"traffic.sidecar.istio.io/includeInboundPorts": ""},
        [("out", 80, "proxy-out"), ("in", 8080, "app")],
    ),
    "includeInboundPorts one port": (
        {"traffic.sidecar.istio.io/includeInboundPorts": "9000"},
        [("in", 9000, "proxy-in"), ("in", 8080, "app")],
    ),
    "excludeInboundPorts keeps the always-excluded": (
        {"traffic.sidecar.istio.io/excludeInboundPorts": "8080"},
        [("in", 8080, "app"), ("in", 9000, "proxy-in"), ("in", 15021, "app"), ("in", 15020, "app")],
    ),
    "includeOutboundPorts captures a port whatever the CIDRs say": (
        {
            "traffic.sidecar.istio.io/includeOutboundIPRanges": "",
            "traffic.sidecar.istio.io/includeOutboundPorts": "3306",
        },
        [("out", 3306, "proxy-out"), ("out", 80, "peer")],
    ),
    "excludeOutboundPorts replaces istio's 15020": (
        {"traffic.sidecar.istio.io/excludeOutboundPorts": "80"},
        [("out", 80, "peer"), ("out", 81, "proxy-out"), ("out", 15020, "proxy-out")],
    ),
    "excludeInterfaces": (
        {"traffic.sidecar.istio.io/excludeInterfaces": "eth0"},
        [("out", 80, "peer"), ("in", 8080, "app")],
    ),
    "reroute-virtual-interfaces: arriving traffic is outbound": (
        {"istio.io/reroute-virtual-interfaces": "eth0"},
        [("in", 8080, "proxy-out"), ("out", 80, "proxy-out")],
    ),
    "kubevirtInterfaces, the older name": (
        {"traffic.sidecar.istio.io/kubevirtInterfaces": "eth0"},
        [("in", 8080, "proxy-out")],
    ),
    "our own annotation wins over istio's": (
        {"traffic.sidecar.istio.io/excludeOutboundPorts": "80", "cni-redirect.io/exclude-outbound-ports": "81"},
        [("out", 80, "proxy-out"), ("out", 81, "peer")],
    ),
}  # fmt: skip


def overlay(base: dict[str, str], changes: dict[str, str | None]) -> dict[str, str]:
    out = dict(base)
    for key, value in changes.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("row", ISTIO_ROWS)
def test_istio_case_table(istio_lab, row):
    changes, expected = ISTIO_ROWS[row]
    check_row(istio_lab, "istio", overlay(injected("istio"), changes), expected)


# --- Linkerd: annotations -> traffic ---

LINKERD_ROWS: Rows = {
    "injected pod: all captured but the proxy's admin and control ports": (
        {},
        [("out", 80, "proxy-out"), ("in", 8080, "proxy-in"), ("in", 4190, "app"), ("in", 4191, "app")],
    ),
    "no linkerd.io/proxy-version: not injected": (
        {"linkerd.io/proxy-version": None},
        [("out", 80, "peer"), ("in", 8080, "app")],
    ),
    "inject disabled": ({"linkerd.io/inject": "disabled"}, [("out", 80, "peer"), ("in", 8080, "app")]),
    "skip-outbound-ports": (
        {"config.linkerd.io/skip-outbound-ports": "80"},
        [("out", 80, "peer"), ("out", 81, "proxy-out")],
    ),
    "skip-inbound-ports adds to 4190,4191": (
        {"config.linkerd.io/skip-inbound-ports": "8080"},
        [("in", 8080, "app"), ("in", 4191, "app"), ("in", 9000, "proxy-in")],
    ),
    "skip-subnets is an inbound source match": (
        {"config.linkerd.io/skip-subnets": "10.77.0.0/24"},
        [("in", 8080, "app"), ("out", 80, "proxy-out")],
    ),
    "skip-subnets elsewhere": ({"config.linkerd.io/skip-subnets": "10.99.0.0/16"}, [("in", 8080, "proxy-in")]),
    "empty annotation counts as absent": (
        {"config.linkerd.io/skip-outbound-ports": ""},
        [("out", 80, "proxy-out")],
    ),
}  # fmt: skip


@pytest.mark.parametrize("row", LINKERD_ROWS)
def test_linkerd_case_table(linkerd_lab, row):
    changes, expected = LINKERD_ROWS[row]
    check_row(linkerd_lab, "linkerd", overlay(injected("linkerd"), changes), expected)


def test_linkerd_proxy_uid_annotation_moves_the_exemption(linkerd_lab):
    net = linkerd_lab
    annotations = {**injected("linkerd"), "config.linkerd.io/proxy-uid": "3000"}
    add(net.pod, "linkerd", annotations)
    try:
        assert outcome(net, "out", 80, uid=3000) == "peer"
        assert outcome(net, "out", 80, uid=2102) == "proxy-out"  # 2102 is an app UID now
    finally:
        delete(net.pod, "linkerd", annotations)


# --- the meshes' own validators ---


def test_istio_validation_passes_on_an_injected_pod(net):
    add(net.pod, "istio", injected("istio"))
    rc, report = validate(net.pod, "istio", uid=1337)
    assert (rc, report.get("original_port")) == (0, 15002), report
    assert report["accepted_on"] == 15006  # the own-IP rule sends the proxy's own traffic inbound


def test_istio_validation_fails_without_capture_and_with_our_loopback_default(net):
    rc, report = validate(net.pod, "istio", uid=1337, timeout=1)
    assert rc == 126, report  # the check can fail: nothing redirects 127.0.0.6
    annotations = {**injected("istio"), "cni-redirect.io/loopback-cidrs": "127.0.0.0/8,::1/128"}
    add(net.pod, "istio", annotations)
    rc, report = validate(net.pod, "istio", uid=1337, timeout=1)
    assert rc == 126, report  # all of 127/8 counted as the pod itself: 127.0.0.6 is not captured


def test_istio_validation_passes_in_tproxy_mode(net):
    add(net.pod, "istio", {**injected("istio"), "sidecar.istio.io/interceptionMode": "TPROXY"})
    rc, report = validate(net.pod, "istio", uid=1337)
    assert (rc, report.get("original_port")) == (0, 15002), report


def test_linkerd_network_validator_passes_on_an_injected_pod(net):
    add(net.pod, "linkerd", injected("linkerd"))
    rc, report = validate(net.pod, "linkerd", uid=65534)
    assert (rc, report.get("token_echoed")) == (0, True), report


def test_linkerd_network_validator_fails_without_capture(net):
    rc, report = validate(net.pod, "linkerd", uid=65534, timeout=1)
    assert rc == 95, report
