"""`loopback-mss` and the TCP buffers (#37 item 1), with the real bridge and ptp plugins before ours.

A pod is set up by containerd's own loader (go-cni, `tests/loaders`) running the real chain: the bridge (or ptp)
and host-local plugins of containernetworking/plugins v1.10.0, then cni-redirect with `loopback-mss: true`. The
bridge, its gateway address and the host side of the pod's veth live in a "node" netns of the test's own, never
the host's. Then:

- the chain's CHECK (the primary's included: libcni runs the whole chain's) passes, through both loaders;
- every SYN and SYN-ACK that leaves the pod through eth0, IPv4 and IPv6, captured on the node side (an
  AF_PACKET socket), offers at most its path's MSS: the app's to an excluded port, the proxy's own, the
  pod's answer to an inbound peer, and one over a route the primary adds after ADD; while the captured
  connection's SYN over loopback offers loopback's MSS (the point of the setting);
- a route without our advmss (the primary's later one, or ours taken off) is drift for CHECK and repair;
- DEL gives the routes back exactly as the primary made them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cni_redirect.testing.loaders import Loaders
from cni_redirect.testing.netlab import PLUGIN, Netns, connect, enabled, plugin_conf, run_plugin
from cni_redirect.testing.peers import peer

pytestmark = [pytest.mark.root]

PROXY_UID, APP_UID = 1337, 1000
GATEWAY_V4, GATEWAY_V6 = "10.99.0.1", "fd99::1"
LATER_V4 = "10.98.0.1"  # behind a route the primary adds after ADD
PATH_MSS = {4: 1460, 6: 1440}  # veth MTU 1500, minus the IP and TCP headers
LOOPBACK_MSS = {4: 65495, 6: 65476}
ENTRY = {
    "type": "cni-redirect",
    "capabilities": {"io.kubernetes.cri.pod-annotations": True},
    "defaults": {"enabled": "true", "loopback-mss": "true", "exclude-outbound-ports": "81",
                 "tcp-rmem": "4096 8388608 33554432"},
}  # fmt: skip


def _primary(kind: str, root: Path) -> dict:
    ipam = {
        "type": "host-local",
        "dataDir": str(root / "ipam"),
        "ranges": [
            [{"subnet": "10.99.0.0/24", "gateway": GATEWAY_V4}],
            [{"subnet": "fd99::/64", "gateway": GATEWAY_V6}],
        ],
        "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
    }
    if kind == "bridge":
        plugin = {"type": "bridge", "bridge": "cnir-mss0", "isGateway": True, "ipMasq": False, "ipam": ipam}
    else:
        plugin = {"type": "ptp", "ipMasq": False, "ipam": ipam}
    return {"cniVersion": "1.0.0", "name": f"mss-{kind}", "plugins": [plugin, ENTRY]}


@pytest.fixture(params=["bridge", "ptp"])
def node(request, tmp_path, host_unchanged):
    """A node netns holding the primary's side, a conf dir with the primary and our entry, a bin dir with the
    real plugins and ours; the pod netns that the loader's ADD sets up."""
    kind = request.param
    node_ns, pod = Netns.create("node"), Netns.create("pod")
    conf, bins = tmp_path / "conf", tmp_path / "bin"
    conf.mkdir()
    bins.mkdir()
    (conf / f"10-mss-{kind}.conflist").write_text(json.dumps(_primary(kind, tmp_path)))
    for plugin in ("bridge", "ptp", "host-local", "loopback"):
        (bins / plugin).symlink_to(peer(plugin))
    (bins / "cni-redirect").symlink_to(PLUGIN)
    loaders = Loaders(conf, [bins], tmp_path / "cache", netns=node_ns.name)
    sandbox = f"cnirmss{os.getpid()}{kind}"
    try:
        yield kind, node_ns, pod, loaders, sandbox
    finally:
        loaders.delete("containerd", pod.path, sandbox)
        pod.delete()
        node_ns.delete()


def _routes(pod: Netns) -> str:
    return (
        pod.run("ip", "route", "show", "table", "main").stdout
        + pod.run("ip", "-6", "route", "show", "table", "main").stdout
    )


def _wait_for_dad(pod: Netns) -> None:
    for _ in range(100):
        if "tentative" not in pod.run("ip", "-6", "addr", "show", "dev", "eth0").stdout:
            return
        time.sleep(0.05)


def test_loopback_mss_with_the_primary_s_own_routes(node, procs):
    kind, node_ns, pod, loaders, sandbox = node
    node_ns.run("ip", "link", "set", "lo", "up")
    loaders.add("containerd", pod.path, sandbox)
    _wait_for_dad(pod)
    shown = _routes(pod)
    print(f"\n[loopback-mss] {kind}: the pod's routes after ADD:\n{shown}")
    for family, flag in ((4, "-4"), (6, "-6")):
        for line in pod.run("ip", flag, "route", "show", "table", "main").stdout.splitlines():
            assert f"advmss {LOOPBACK_MSS[family]}" in line, line
    assert pod.run("sysctl", "-n", "net.ipv4.tcp_rmem").stdout.split() == ["4096", "8388608", "33554432"]
    assert "tcp option maxseg size set rt mtu" in pod.ruleset()

    # CRI-O's pod network status runs libcni's CHECK of the whole chain (the primary's first); containerd runs no
    # CNI CHECK at all. The pod was set up by containerd's loader: CRI-O's reads the same libcni cache.
    run = loaders.check("crio", pod.path, sandbox)
    assert run.returncode == 0, f"CHECK of the chain after our ADD: {run.stderr.decode()[-1500:]}"

    # the node answers on its side; the pod runs its stand-in proxy and an app listener
    for port in (80, 81):
        procs.listen(node_ns, "node", port)
    node_ns.run("ip", "addr", "add", f"{LATER_V4}/32", "dev", "lo")
    procs.listen(pod, "proxy-out", 15001, uid=PROXY_UID)
    procs.listen(pod, "proxy-in", 15006, uid=PROXY_UID)
    procs.listen(pod, "app", 8080, uid=APP_UID)
    pod_v4 = pod.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.split()[3].split("/")[0]
    pod_v6 = next(w.split("/")[0] for w in pod.run("ip", "-6", "-o", "addr", "show", "dev", "eth0").stdout.split()
                  if w.startswith("fd99"))  # fmt: skip
    pod.run("ip", "route", "add", "10.98.0.0/16", "via", GATEWAY_V4)  # the primary adds a route after our ADD
    wire = "cnir-mss0" if kind == "bridge" else _host_side(node_ns)
    with procs.syns(node_ns, wire) as leaving, procs.syns(pod, "lo") as looped:
        answers = {
            "app to an excluded port, IPv4": connect(pod, GATEWAY_V4, 81, uid=APP_UID),
            "app to an excluded port, IPv6": connect(pod, GATEWAY_V6, 81, uid=APP_UID),
            "the proxy's own, IPv4": connect(pod, GATEWAY_V4, 80, uid=PROXY_UID),
            "the proxy's own, IPv6": connect(pod, GATEWAY_V6, 80, uid=PROXY_UID),
            "over the primary's later route": connect(pod, LATER_V4, 81, uid=APP_UID),
            "inbound, IPv4": connect(node_ns, pod_v4, 8080, uid=0),
            "inbound, IPv6": connect(node_ns, pod_v6, 8080, uid=0),
            "captured": connect(pod, GATEWAY_V4, 80, uid=APP_UID),
        }
    assert [answers[k]["listener"] for k in answers] == ["node"] * 5 + ["proxy-in", "proxy-in", "proxy-out"], answers
    out_of_pod = [s for s in leaving if s["src"] in (pod_v4, pod_v6)]
    shown_syns = ", ".join(f"{'to ' if s['syn_ack'] else ''}{s['dst']} mss {s['mss']}" for s in out_of_pod)
    print(f"[loopback-mss] {kind}: {len(out_of_pod)} SYNs and SYN-ACKs left the pod through eth0: {shown_syns}")
    assert len({(s["dst"], s["dport"], s["syn_ack"]) for s in out_of_pod}) >= 7, out_of_pod
    over = [s for s in out_of_pod if s["mss"] is None or s["mss"] > PATH_MSS[s["family"]]]
    assert not over, f"SYNs offering more than their path: {over}"
    to_proxy = [s for s in looped if s["dport"] == 15001 and not s["syn_ack"]]
    assert to_proxy and all(s["mss"] == LOOPBACK_MSS[4] for s in to_proxy), looped

    # drift: the primary's later route has no advmss; CHECK says so, and what repair does (our table and tuning
    # applied again, as the agent's put_right does) puts it on
    run = loaders.check("crio", pod.path, sandbox)
    assert run.returncode != 0 and "loopback-mss" in run.stderr.decode() and "10.98.0.0/16" in run.stderr.decode()
    before_repair = _routes(pod)
    again = run_plugin("ADD", pod.path, plugin_conf(defaults=ENTRY["defaults"]))
    assert again.rc == 0, again.stdout + again.stderr
    assert "10.98.0.0/16 via 10.99.0.1 dev eth0 advmss 65495" in _routes(pod), before_repair
    assert loaders.check("crio", pod.path, sandbox).returncode == 0


def _host_side(node_ns: Netns) -> str:
    links = json.loads(node_ns.run("ip", "-j", "link", "show", "type", "veth").stdout)
    (link,) = links
    return link["ifname"]


def test_del_gives_the_primary_s_routes_back_exactly(node):
    kind, node_ns, pod, loaders, sandbox = node
    node_ns.run("ip", "link", "set", "lo", "up")
    plain = loaders.conf_dir / f"10-mss-{kind}.conflist"
    document = json.loads(plain.read_text())
    document["plugins"] = document["plugins"][:1]  # the primary alone: its routes as it makes them
    plain.write_text(json.dumps(document))
    loaders.add("containerd", pod.path, sandbox)
    _wait_for_dad(pod)
    theirs = _routes(pod)
    assert "advmss" not in theirs
    # our ADD and DEL on the same netns, as the runtime runs them (the primary already set up)
    conf = plugin_conf(enabled(loopback_mss="true", tcp_rmem="4096 8388608 33554432"))
    added = run_plugin("ADD", pod.path, conf)
    assert added.rc == 0, added.stdout + added.stderr
    assert "advmss" in _routes(pod)
    deleted = run_plugin("DEL", pod.path, conf)
    assert deleted.rc == 0, deleted.stdout + deleted.stderr
    assert _routes(pod) == theirs, "DEL gives the routes back byte for byte"
    assert "cni_redirect" not in pod.ruleset()
