"""Source-port reuse through capture (#37 item 2): linkerd/linkerd2#15505, istio/istio#38982 and #43301 report
that with REDIRECT, a new connection whose source port collides with a flow still tracked stalls or is reset,
now and then.

The collision is forced in a pod netns: the ephemeral ports of the pod and of its peer are narrowed to 200 and
`tcp_tw_reuse` is on, so a client's port comes back about every 1.3 s while the sidecar's side of the previous
connection on it lingers in TIME_WAIT (the sidecar closes first) and conntrack keeps its flow for 120 s. 3 000
short connections at 150 a second go through a stand-in sidecar that forwards each to its original destination
(from 127.0.0.6, as Istio's does), with both cores kept busy (the timing the field sees under load); each variant
gets a fresh pod. The baseline is the same sidecar dialled explicitly, with no capture at all.

Seen here, with both cores busy (3 000 connections each): the explicitly dialled sidecar, with no capture at
all, lost 0, 451 and 1 164 to resets in three runs; inbound through REDIRECT 129 to 753, through TPROXY 78 to
793; outbound through REDIRECT none. The resets come with the sidecar hop under load (its TIME_WAIT meeting the
reused port), capture or not; the runs are too noisy to say one mode avoids them. Unloaded, 9 runs of 3 000
per mode lost none. What the test holds is what capture must: TPROXY had a hole. A SYN whose
4-tuple matched the sidecar's TIME_WAIT socket (transparent, its local address the dialled one) took the
"established" path, was routed locally untouched and reached the app's own listener: 1 393 of 3 000
connections uncaptured before the fix. A SYN never takes that path now; this test holds every inbound answer
to the sidecar's.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cni_redirect.testing.netlab import PEER_V4, POD_V4, PodNetwork, burst, enabled, plugin_conf, run_plugin

pytestmark = [pytest.mark.root, pytest.mark.slow]

PROXY_UID, APP_UID = 1337, 1000
CONNECTIONS, RATE = 3000, 150.0
PORTS = "40000 40199"
PASSTHROUGH = "127.0.0.6"  # where the sidecar dials the app from: what the app sees when capture worked


def _pod(procs, capture: str | None) -> PodNetwork:
    net = PodNetwork.create()
    for ns in (net.pod, net.peer):
        ns.run("sysctl", "-qw", f"net.ipv4.ip_local_port_range={PORTS}", "net.ipv4.tcp_tw_reuse=1")
    procs.listen(net.peer, "peer", 80)
    procs.listen(net.pod, "app", 8080, uid=APP_UID)
    if capture is None:  # the baseline: the same sidecar, dialled explicitly
        procs.forward(net.pod, 15006, uid=PROXY_UID, source=PASSTHROUGH, to=f"{POD_V4}:8080")
        return net
    run = run_plugin("ADD", net.pod.path, plugin_conf(enabled(inbound_mode=capture)))
    assert run.rc == 0, run.stdout + run.stderr
    procs.forward(net.pod, 15001, uid=PROXY_UID)
    tproxy = capture == "tproxy"  # a transparent socket needs CAP_NET_ADMIN; dialling from 127.0.0.6 is exempt
    procs.forward(net.pod, 15006, uid=0 if tproxy else PROXY_UID, source=PASSTHROUGH, transparent=tproxy)
    return net


VARIANTS = {  # name: (capture, who dials, where)
    "inbound, the sidecar dialled explicitly (no capture)": (None, "peer", 15006),
    "inbound, REDIRECT": ("redirect", "peer", 8080),
    "inbound, TPROXY": ("tproxy", "peer", 8080),
    "outbound, REDIRECT": ("redirect", "pod", 80),
}


def test_port_reuse_through_capture_with_both_cores_busy(procs, host_unchanged):
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    results = {}
    try:
        for name, (capture, who, port) in VARIANTS.items():
            net = _pod(procs, capture)
            try:
                if who == "pod":
                    results[name] = burst(net.pod, PEER_V4, port, CONNECTIONS, uid=APP_UID, rate=RATE)
                else:
                    results[name] = burst(net.peer, POD_V4, port, CONNECTIONS, uid=0, rate=RATE)
            finally:
                procs.stop()
                procs.running.clear()
                net.delete()
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    print(f"\n[port reuse] {CONNECTIONS} connections at {RATE:.0f}/s on ports {PORTS.replace(' ', '-')}, "
          "tcp_tw_reuse=1, both cores busy:")  # fmt: skip
    for name, result in results.items():
        print(f"  {name}: {result['failed']} failed {result['failures']}, answered from {result['answered_from']}")
    for name, result in results.items():
        if name.startswith("inbound"):
            bypassed = {peer: n for peer, n in result["answered_from"].items() if peer != PASSTHROUGH}
            assert not bypassed, f"{name}: the app answered without its sidecar: {bypassed}"
    assert results["outbound, REDIRECT"]["failed"] == 0, results["outbound, REDIRECT"]
