"""Side by side with the real istio-cni: the same pod, the same connections, who answers with which destination.

Each row is a pod as Istio's injector writes it (tests/fixtures/mesh/istio-injected.json, plus the row's
annotation changes). One netns is programmed by istio-cni (built from Istio's source by scripts/peers.sh,
chained as Istio installs it, reading the pod from a fake Kubernetes API) in its iptables mode and in its
native_nftables mode, and the same netns by cni-redirect with `"profile": "istio"`. The same probes run
against each; every difference is either fixed or listed in DIFFERENCES (and docs/mesh-profiles.md) with its
reason, and this test holds that list exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from cni_redirect.testing.istio import PROXY_UID, FakeKube, IstioCni, injected_pod
from cni_redirect.testing.netlab import (
    PEER_V4,
    PEER_V6,
    POD_V4,
    POD_V6,
    PodNetwork,
    Processes,
    connect,
    host_ruleset,
)
from tests.integration.test_profiles import ISTIO_ROWS, add, delete, overlay
from tests.support import injected

APP_UID = 1000
APP_PORTS = (53, 8080, 9000, 15008, 15020, 15021, 15090)
PEER_PORTS = (53, 80, 81, 3306, 15020)
TPROXY: dict[str, str | None] = {"sidecar.istio.io/interceptionMode": "TPROXY"}
DUAL_STACK = {"ISTIO_DUAL_STACK": "true"}  # the proxy's env in a mesh installed dual-stack
#: (uid, gid, family, udp, destination) of each probe kind; "in" kinds dial the pod from the peer netns.
KINDS = {
    "out": (APP_UID, APP_UID, "out", False, PEER_V4),
    "out6": (APP_UID, APP_UID, "out", False, PEER_V6),
    "in": (0, 0, "in", False, POD_V4),
    "in6": (0, 0, "in", False, POD_V6),
    "proxy-uid": (PROXY_UID, APP_UID, "out", False, PEER_V4),  # Istio's proxy, by its UID
    "proxy-gid": (APP_UID, PROXY_UID, "out", False, PEER_V4),  # any UID in the proxy's group
    "proxy-uid6": (PROXY_UID, PROXY_UID, "out", False, PEER_V6),
    "root-proxy": (0, PROXY_UID, "out", False, PEER_V4),  # the TPROXY proxy as the injector runs it: 0:1337
    "root": (0, 0, "out", False, PEER_V4),  # an app running as root
    "self": (APP_UID, APP_UID, "out", False, POD_V4),
    "loopback": (APP_UID, APP_UID, "out", False, "127.0.0.1"),
    "dns-udp": (APP_UID, APP_UID, "out", True, PEER_V4),
    "dns-tcp": (APP_UID, APP_UID, "out", False, PEER_V4),
    "dns-udp6": (APP_UID, APP_UID, "out", True, PEER_V6),
    "proxy-dns-udp": (PROXY_UID, PROXY_UID, "out", True, PEER_V4),  # the proxy's own upstream DNS
    "dns-udp-lo": (APP_UID, APP_UID, "out", True, "127.0.0.1"),  # a resolver on the pod's loopback
    "dns-tcp-lo": (APP_UID, APP_UID, "out", False, "127.0.0.1"),
}
#: What every row is probed with, besides the row's own probes.
COMMON = [("out", 80), ("out", 15020), ("in", 8080), ("in", 15008), ("in", 15020), ("in", 15021), ("in", 15090),
          ("proxy-uid", 80), ("proxy-gid", 80), ("self", 8080), ("loopback", 8080)]  # fmt: skip
V6 = [("out6", 80), ("in6", 8080), ("in6", 15008), ("proxy-uid6", 80)]
DNS = [("dns-udp", 53), ("dns-tcp", 53), ("dns-udp6", 53), ("proxy-dns-udp", 53), ("dns-udp-lo", 53),
       ("dns-tcp-lo", 53)]  # fmt: skip
TPROXY_PROBES = [("in", 8080), ("in", 9000), ("in6", 8080), ("root-proxy", 80), ("root", 80), ("out6", 80)]


@dataclass(frozen=True)
class Row:
    """A pod: its annotation changes over the injected fixture, the probes, and what Istio reads from the pod
    spec (the proxy's env and user), which reaches cni-redirect as the entry's `defaults` an admin would set."""

    changes: dict[str, str | None]
    probes: list[tuple[str, int]]
    proxy_env: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, str] = field(default_factory=dict)
    proxy_user: tuple[int, int] = (PROXY_UID, PROXY_UID)


ROWS = {
    name: Row(changes, [(kind, port) for kind, port, _ in expected]) for name, (changes, expected) in ISTIO_ROWS.items()
}
ROWS |= {
    "excludeOutboundIPRanges elsewhere keeps capture": Row(
        {"traffic.sidecar.istio.io/excludeOutboundIPRanges": "192.168.0.0/16"}, [("out", 80)]
    ),
    "excludeInboundPorts several": Row({"traffic.sidecar.istio.io/excludeInboundPorts": "8080,9000"}, [("in", 9000)]),
    "includeOutboundIPRanges the peer /32": Row(
        {"traffic.sidecar.istio.io/includeOutboundIPRanges": f"{PEER_V4}/32"}, [("out", 81)]
    ),
    "IPv6, ISTIO_DUAL_STACK unset": Row({}, V6),
    "IPv6, ISTIO_DUAL_STACK unset (ours: capture-ipv6 false in defaults)": Row(
        {}, V6, defaults={"capture-ipv6": "false"}
    ),
    "IPv6, ISTIO_DUAL_STACK true": Row({}, V6, proxy_env=DUAL_STACK),
    "DNS: not captured without ISTIO_META_DNS_CAPTURE": Row({}, DNS, proxy_env=DUAL_STACK),
    "DNS: ISTIO_META_DNS_CAPTURE true (ours: capture-dns in defaults)": Row(
        {}, DNS, proxy_env={**DUAL_STACK, "ISTIO_META_DNS_CAPTURE": "true"}, defaults={"capture-dns": "true"}
    ),
    "interceptionMode TPROXY (proxy 0:1337)": Row(TPROXY, TPROXY_PROBES, DUAL_STACK, proxy_user=(0, PROXY_UID)),
    "TPROXY with excludeInboundPorts": Row(
        {**TPROXY, "traffic.sidecar.istio.io/excludeInboundPorts": "8080"},
        [("in", 8080), ("in", 9000)],
        DUAL_STACK,
        proxy_user=(0, PROXY_UID),
    ),
    "TPROXY with includeInboundPorts one port": Row(
        {**TPROXY, "traffic.sidecar.istio.io/includeInboundPorts": "9000"},
        [("in", 8080), ("in", 9000)],
        DUAL_STACK,
        proxy_user=(0, PROXY_UID),
    ),
}
ENGINES = ("istio-cni iptables", "istio-cni nftables", "cni-redirect")
TPROXY_15008 = (
    "inbound 15008 (HBONE) reaches the proxy's own 15008 listener with us, as in Istio's REDIRECT mode; Istio's "
    "TPROXY mode sends it to 15006 (its 15008 return sits in the nat table, which TPROXY mode does not hook)"
)
ISTIO_V6_MODES = (
    "without ISTIO_DUAL_STACK the iptables mode programs no IPv6 rules, while the nftables mode's inet-family "
    "redirects capture IPv6 anyway"
)
#: Rows where cni-redirect answers differently from istio-cni (both modes), and why. Held exactly by the test.
DIFFERENCES = {
    "our own annotation wins over istio's": "cni-redirect.io/* annotations are ours: istio-cni does not read them",
    "interceptionMode NONE": "istio-cni refuses the pod (ADD fails: interceptionMode invalid: NONE); we leave it "
    "uncaptured and let it start",
    "IPv6, ISTIO_DUAL_STACK unset": "we capture every family the pod has unless the entry says capture-ipv6: "
    "false (the next row, which matches the iptables mode); istio-cni's two modes disagree here",
    "interceptionMode TPROXY (proxy 0:1337)": TPROXY_15008,
    "TPROXY with excludeInboundPorts": TPROXY_15008,
}


#: Rows where istio-cni's native_nftables mode answers differently from its iptables mode (Istio's own).
ISTIO_MODES_DIFFER = {
    "IPv6, ISTIO_DUAL_STACK unset": ISTIO_V6_MODES,
    "IPv6, ISTIO_DUAL_STACK unset (ours: capture-ipv6 false in defaults)": ISTIO_V6_MODES,
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One pod/peer pair. The inbound proxy listens transparently as 0:1337, as Istio's proxy does in TPROXY
    mode; a transparent socket accepts REDIRECTed connections too, so one listener serves both modes."""
    before = host_ruleset()
    net, procs, kube = PodNetwork.create(), Processes(), FakeKube()
    try:
        for port in APP_PORTS:
            procs.listen(net.pod, "app", port, uid=APP_UID)
        procs.listen(net.pod, "app", 53, uid=APP_UID, udp=True)
        for port in PEER_PORTS:
            procs.listen(net.peer, "peer", port)
        procs.listen(net.peer, "peer", 53, udp=True)
        procs.listen(net.pod, "proxy-out", 15001, uid=PROXY_UID)
        procs.listen(net.pod, "proxy-in", 15006, uid=0, gid=PROXY_UID, transparent=True)
        procs.listen(net.pod, "proxy-dns", 15053, uid=PROXY_UID)
        procs.listen(net.pod, "proxy-dns", 15053, uid=PROXY_UID, udp=True)
        yield net, kube, tmp_path_factory.mktemp("istio-cni")
    finally:
        kube.close()
        procs.stop()
        net.delete()
        assert host_ruleset() == before, "the host ruleset changed"


def probe(net, kind: str, port: int) -> str:
    """Who answered: a proxy with the destination it recovered (SO_ORIGINAL_DST after a REDIRECT; the socket's
    own address after a TPROXY, marked so), or the app or peer itself, or nobody and why."""
    uid, gid, direction, udp, host = KINDS[kind]
    client = net.peer if direction == "in" else net.pod
    answer = connect(client, host, port, uid=uid, gid=gid, udp=udp)
    listener = answer.get("listener")
    if listener is None:
        return f"none ({answer.get('error', 'no answer')})"
    if not listener.startswith("proxy") or udp:  # UDP answers carry no destination
        return listener
    local = answer.get("local", "")
    if listener == "proxy-in" and not local.endswith(":15006"):
        return f"{listener} {local} (tproxy)"
    return f"{listener} {answer.get('original_dst')}"


def run_engine(net, kube, run_dir, engine: str, annotations: dict[str, str], row: Row) -> list[str]:
    if engine == "cni-redirect":
        entry = {"defaults": row.defaults} if row.defaults else {}
        add(net.pod, "istio", annotations, **entry)
        try:
            return [probe(net, kind, port) for kind, port in row.probes]
        finally:
            delete(net.pod, "istio", annotations)
    plugin = IstioCni(run_dir, kube, native_nftables=engine.endswith("nftables"))
    pod = injected_pod("app", "default", annotations, proxy_env=row.proxy_env, proxy_user=row.proxy_user)
    ran = plugin.run("ADD", net.pod.path, pod)
    if ran.returncode != 0:  # istio-cni refuses the pod: it does not start at all
        clean(net.pod)
        return ["ADD fails"] * len(row.probes)
    try:
        return [probe(net, kind, port) for kind, port in row.probes]
    finally:
        clean(net.pod)


def clean(pod) -> None:
    """This test's own pod netns, emptied of istio-cni's rules: its nftables tables, the x_tables ones
    (istio-cni picks iptables-legacy-restore or the nft variant by what it finds on the node), and its TPROXY
    policy routing (fwmark 1337 -> table 133)."""
    pod.run("nft", "flush", "ruleset")
    for tool in ("iptables-legacy", "ip6tables-legacy"):
        for table in ("nat", "mangle", "raw", "filter"):
            pod.run(tool, "-t", table, "-F", check=False)
            pod.run(tool, "-t", table, "-X", check=False)
    for family in ("-4", "-6"):
        while pod.run("ip", family, "rule", "del", "lookup", "133", check=False).returncode == 0:
            pass
        pod.run("ip", family, "route", "flush", "table", "133", check=False)


def leftovers(pod) -> str:
    """Anything of either plugin's left in the pod netns after its DEL or our clean-up."""
    found = []
    if "cni_redirect" in pod.ruleset() or "istio" in pod.ruleset().lower():
        found.append(pod.ruleset())
    if "ISTIO" in pod.run("iptables-legacy-save").stdout + pod.run("ip6tables-legacy-save").stdout:
        found.append("ISTIO chains")
    for family in ("-4", "-6"):
        rules = pod.run("ip", family, "rule").stdout
        if "133" in rules or pod.run("ip", family, "route", "show", "table", "133", check=False).stdout.strip():
            found.append(f"ip {family} rule/route table 133: {rules}")
    return "; ".join(found)


def markdown(rows: dict[str, list[tuple[str, list[str]]]]) -> list[str]:
    """The table docs/mesh-profiles.md holds: the answers all three agree on, then per engine "same" or its
    answers to the probes where they part (ours in bold)."""
    lines = [f"| row | probes: who answered | {' | '.join(ENGINES)} |", "|---|---|---|---|---|"]
    for row, cells in rows.items():
        agreed = "; ".join(f"{probe}: {answers[0]}" for probe, answers in cells if len(set(answers)) == 1)
        parted = [(probe, answers) for probe, answers in cells if len(set(answers)) > 1]
        columns = []
        for index, engine in enumerate(ENGINES):
            if not parted:
                columns.append("same")
                continue
            text = "; ".join(f"{probe}: {answers[index]}" for probe, answers in parted)
            columns.append(f"**{text}**" if engine == "cni-redirect" else text)
        lines.append(f"| {row} | {agreed or '-'} | {' | '.join(columns)} |")
    return lines


def test_cni_redirect_captures_what_istio_cni_captures(lab):
    net, kube, run_dir = lab
    table: dict[str, list[tuple[str, list[str]]]] = {}
    ours_differ: dict[str, list] = {}
    modes_differ: dict[str, list] = {}
    for name, row in ROWS.items():
        annotations = overlay(injected("istio"), row.changes)
        row = Row(row.changes, list(dict.fromkeys(row.probes + COMMON)), row.proxy_env, row.defaults, row.proxy_user)
        results = {}
        for engine in ENGINES:
            results[engine] = run_engine(net, kube, run_dir, engine, annotations, row)
            assert not leftovers(net.pod), (engine, name, leftovers(net.pod))
        for index, (kind, port) in enumerate(row.probes):
            ipt, nft, ours = (results[engine][index] for engine in ENGINES)
            table.setdefault(name, []).append((f"{kind} {port}", [ipt, nft, ours]))
            if ours != ipt:
                ours_differ.setdefault(name, []).append((f"{kind} {port}", ipt, ours))
            if nft != ipt:
                modes_differ.setdefault(name, []).append((f"{kind} {port}", ipt, nft))
    print("\n" + "\n".join(markdown(table)))
    for name, cells in ours_differ.items():
        print(f"OURS DIFFER {name}: {cells}")
    for name, cells in modes_differ.items():
        print(f"ISTIO MODES DIFFER {name}: {cells}")
    assert set(modes_differ) == set(ISTIO_MODES_DIFFER), {
        name: modes_differ.get(name) for name in set(modes_differ) ^ set(ISTIO_MODES_DIFFER)
    }
    assert set(ours_differ) == set(DIFFERENCES), {
        name: ours_differ.get(name) for name in set(ours_differ) ^ set(DIFFERENCES)
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
