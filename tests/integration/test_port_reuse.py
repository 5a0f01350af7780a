"""Source-port reuse through capture (#37 item 2): linkerd/linkerd2#15505, istio/istio#38982 and #43301 report
that with REDIRECT, a new connection whose source port collides with a flow conntrack still tracks stalls, and
connections time out now and then.

The collision is forced in a pod netns: its ephemeral ports are narrowed to 200 and `tcp_tw_reuse` is on, so a
port comes back about every 1.3 s, while conntrack keeps each closed flow for 120 s: almost every new connection
meets conntrack's entry of an earlier one on the same source port (the app's redirected flow, or its sidecar's
upstream flow, both from the pod's address). 1 200 short connections at 150 a second go through a stand-in
sidecar that forwards each to its original destination; each variant gets a fresh pod, and the same burst
without capture is the baseline. Outbound is REDIRECT in every mode; inbound is REDIRECT or TPROXY.

Seen here: outbound through REDIRECT, and inbound through TPROXY, lose no connection, as without capture; inbound
through REDIRECT loses about 3-4 % of them, reset (the sidecar's dial of the app fails). The mode that avoids it
is `inbound-mode: tproxy` (docs/configuration.md, docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

from cni_redirect.testing.netlab import PEER_V4, POD_V4, PodNetwork, burst, enabled, plugin_conf, run_plugin

pytestmark = [pytest.mark.root, pytest.mark.slow]

PROXY_UID, APP_UID = 1337, 1000
CONNECTIONS, RATE = 1200, 150.0
PORTS = "40000 40199"


def _pod(procs, capture: str | None) -> PodNetwork:
    net = PodNetwork.create()
    for ns in (net.pod, net.peer):
        ns.run("sysctl", "-qw", f"net.ipv4.ip_local_port_range={PORTS}", "net.ipv4.tcp_tw_reuse=1")
    procs.listen(net.peer, "peer", 80)
    procs.listen(net.pod, "app", 8080, uid=APP_UID)
    if capture is not None:
        run = run_plugin("ADD", net.pod.path, plugin_conf(enabled(inbound_mode=capture)))
        assert run.rc == 0, run.stdout + run.stderr
        procs.forward(net.pod, 15001, uid=PROXY_UID)
        # inbound: dialled from 127.0.0.6 (Istio's passthrough, exempt); a transparent socket needs CAP_NET_ADMIN
        tproxy = capture == "tproxy"
        procs.forward(net.pod, 15006, uid=0 if tproxy else PROXY_UID, source="127.0.0.6", transparent=tproxy)
    return net


VARIANTS = {  # name: (capture, direction)
    "outbound, no capture": (None, "out"),
    "outbound, REDIRECT": ("redirect", "out"),
    "inbound, no capture": (None, "in"),
    "inbound, REDIRECT": ("redirect", "in"),
    "inbound, TPROXY": ("tproxy", "in"),
}


def test_port_reuse_through_capture(procs, host_unchanged):
    results = {}
    for name, (capture, direction) in VARIANTS.items():
        net = _pod(procs, capture)
        try:
            if direction == "out":
                results[name] = burst(net.pod, PEER_V4, 80, CONNECTIONS, uid=APP_UID, rate=RATE)
            else:
                results[name] = burst(net.peer, POD_V4, 8080, CONNECTIONS, uid=0, rate=RATE)
        finally:
            procs.stop()
            procs.running.clear()
            net.delete()
    print(f"\n[port reuse] {CONNECTIONS} connections at {RATE:.0f}/s on {PORTS.replace(' ', '-')}, tcp_tw_reuse=1:")
    for name, result in results.items():
        print(f"  {name}: {result}")
    # What holds: no capture and TPROXY lose nothing; outbound REDIRECT loses nothing either. Inbound REDIRECT
    # loses a few per cent (the figure printed above; docs/benchmarks.md): the mode that avoids it is TPROXY.
    for name in ("outbound, no capture", "inbound, no capture", "outbound, REDIRECT", "inbound, TPROXY"):
        assert results[name]["failed"] == 0 and results[name]["slow"] == 0, (name, results[name])
