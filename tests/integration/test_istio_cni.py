"""Side by side with the real istio-cni: the same pod, the same connections, who answers with which destination.

Each row is a pod as Istio's injector writes it (tests/fixtures/mesh/istio-injected.json, plus the row's
annotation changes). One netns is programmed by istio-cni (built from Istio's source by scripts/peers.sh,
chained as Istio installs it, reading the pod from a fake Kubernetes API) in its iptables mode and in its
native_nftables mode, and the same netns by cni-redirect with `"profile": "istio"`. The same probes run
against each; every difference is either fixed or listed in DIFFERENCES (and docs/mesh-profiles.md) with its
reason, and this test holds that list exactly.
"""

from __future__ import annotations

import pytest

from cni_redirect.testing.istio import PROXY_UID, FakeKube, IstioCni, injected_pod
from cni_redirect.testing.netlab import PEER_V4, POD_V4, PodNetwork, Processes, connect, host_ruleset
from tests.integration.test_profiles import ISTIO_ROWS, add, delete, overlay
from tests.support import injected

APP_UID = 1000
APP_PORTS = (8080, 9000, 15008, 15020, 15021, 15090)
PEER_PORTS = (80, 81, 3306, 15020)
#: What every row is probed with, besides the row's own probes.
COMMON = [("out", 80), ("out", 15020), ("in", 8080), ("in", 15008), ("in", 15020), ("in", 15021), ("in", 15090),
          ("proxy-uid", 80), ("self", 8080), ("loopback", 8080)]  # fmt: skip
EXTRA_ROWS = {
    "excludeOutboundIPRanges elsewhere keeps capture": (
        {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "192.168.0.0/16"},
        [("out", 80, "")],
    ),
    "excludeInboundPorts several": ({"traffic.sidecar.istio.io/excludeInboundPorts": "8080,9000"}, [("in", 9000, "")]),
    "includeOutboundIPRanges the peer /32": (
        {"traffic.sidecar.istio.io/includeOutboundIPRanges": f"{PEER_V4}/32"},
        [("out", 81, "")],
    ),
}
ENGINES = ("istio-cni iptables", "istio-cni nftables", "cni-redirect")
#: Rows where cni-redirect answers differently from istio-cni (both modes), and why. Held exactly by the test.
DIFFERENCES = {
    "our own annotation wins over istio's": "cni-redirect.io/* annotations are ours: istio-cni does not read them",
    "interceptionMode NONE": "istio-cni refuses the pod (ADD fails: interceptionMode invalid: NONE); we leave it "
    "uncaptured and let it start",
}


#: Rows where istio-cni's native_nftables mode answers differently from its iptables mode (Istio's own).
ISTIO_MODES_DIFFER: dict[str, str] = {}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    before = host_ruleset()
    net, procs, kube = PodNetwork.create(), Processes(), FakeKube()
    try:
        for port in APP_PORTS:
            procs.listen(net.pod, "app", port, uid=APP_UID)
        for port in PEER_PORTS:
            procs.listen(net.peer, "peer", port)
        for name, port in (("proxy-out", 15001), ("proxy-in", 15006)):
            procs.listen(net.pod, name, port, uid=PROXY_UID)
        yield net, kube, tmp_path_factory.mktemp("istio-cni")
    finally:
        kube.close()
        procs.stop()
        net.delete()
        assert host_ruleset() == before, "the host ruleset changed"


def probe(net, kind: str, port: int) -> str:
    """Who answered, and for which destination: the listener name plus the original destination it saw."""
    if kind == "out":
        answer = connect(net.pod, PEER_V4, port, uid=APP_UID)
    elif kind == "proxy-uid":
        answer = connect(net.pod, PEER_V4, port, uid=PROXY_UID)
    elif kind == "self":
        answer = connect(net.pod, POD_V4, port, uid=APP_UID)
    elif kind == "loopback":
        answer = connect(net.pod, "127.0.0.1", port, uid=APP_UID)
    else:
        answer = connect(net.peer, POD_V4, port, uid=0)
    return f"{answer.get('listener', 'none')} {answer.get('original_dst', '')}".strip()


def run_engine(net, kube, run_dir, engine: str, annotations: dict[str, str], probes) -> list[str]:
    if engine == "cni-redirect":
        add(net.pod, "istio", annotations)
        try:
            return [probe(net, kind, port) for kind, port in probes]
        finally:
            delete(net.pod, "istio", annotations)
    plugin = IstioCni(run_dir, kube, native_nftables=engine.endswith("nftables"))
    pod = injected_pod("app", "default", annotations)
    ran = plugin.run("ADD", net.pod.path, pod)
    if ran.returncode != 0:  # istio-cni refuses the pod: it does not start at all
        clean(net.pod)
        return ["ADD fails"] * len(probes)
    try:
        return [probe(net, kind, port) for kind, port in probes]
    finally:
        clean(net.pod)


def clean(pod) -> None:
    """This test's own pod netns, emptied of istio-cni's rules: its nftables tables, and the x_tables ones
    (istio-cni picks iptables-legacy-restore or the nft variant by what it finds on the node)."""
    pod.run("nft", "flush", "ruleset")
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for table in ("nat", "mangle", "raw", "filter"):
            pod.run(tool, "-t", table, "-F", check=False)
            pod.run(tool, "-t", table, "-X", check=False)


def test_cni_redirect_captures_what_istio_cni_captures(lab):
    net, kube, run_dir = lab
    rows = {**ISTIO_ROWS, **EXTRA_ROWS}
    table, ours_differ, modes_differ = [], {}, {}
    for row, (changes, expected) in rows.items():
        annotations = overlay(injected("istio"), changes)
        probes = list(dict.fromkeys([(d, p) for d, p, _ in expected] + COMMON))
        results = {engine: run_engine(net, kube, run_dir, engine, annotations, probes) for engine in ENGINES}
        assert "cni_redirect" not in net.pod.ruleset() and "istio" not in net.pod.ruleset().lower()
        assert "ISTIO" not in net.pod.run("iptables-legacy-save").stdout
        for index, (kind, port) in enumerate(probes):
            ipt, nft, ours = (results[engine][index] for engine in ENGINES)
            table.append((row, f"{kind} {port}", ipt, nft, ours))
            if ours != ipt:
                ours_differ.setdefault(row, []).append((f"{kind} {port}", ipt, ours))
            if nft != ipt:
                modes_differ.setdefault(row, []).append((f"{kind} {port}", ipt, nft))
    print("\n| row | probe | " + " | ".join(ENGINES) + " |\n|---|---|" + "---|" * len(ENGINES))
    for line in table:
        print("| " + " | ".join(line) + " |")
    for row, cells in ours_differ.items():
        print(f"OURS DIFFER {row}: {cells}")
    for row, cells in modes_differ.items():
        print(f"ISTIO MODES DIFFER {row}: {cells}")
    assert set(modes_differ) == set(ISTIO_MODES_DIFFER), sorted(set(modes_differ) ^ set(ISTIO_MODES_DIFFER))
    assert set(ours_differ) == set(DIFFERENCES), {
        row: ours_differ.get(row) for row in set(ours_differ) ^ set(DIFFERENCES)
    }


def test_istios_own_validator_passes_on_our_capture_and_fails_without_it():
    """`pilot-agent istio-iptables --run-validation --skip-rule-apply`, the istio-validation init container of
    every injected pod in CNI mode: it dials 127.0.0.6:15002 and passes only if the connection reaches its own
    listener on 15001 with that original destination."""
    from cni_redirect.testing.istio import run_validation

    before = host_ruleset()
    net = PodNetwork.create()
    try:
        annotations = injected("istio")
        bare = run_validation(net.pod.path, annotations, timeout=3)
        assert bare.returncode != 0 and "iptables validation failed" in bare.stdout + bare.stderr, bare.stdout[-2000:]
        add(net.pod, "istio", annotations)
        ran = run_validation(net.pod.path, annotations)
        assert ran.returncode == 0, (ran.stdout + ran.stderr)[-3000:]
        assert "Validation passed" in ran.stdout + ran.stderr
        delete(net.pod, "istio", annotations)
    finally:
        net.delete()
        assert host_ruleset() == before
