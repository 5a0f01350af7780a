"""Real traffic through real rules: which listener answers proves capture.

Each test builds a pod netns and a peer netns joined by veth, runs the
installed plugin exactly as a runtime does, then pushes TCP/UDP through.
"""

from __future__ import annotations

import pytest

from cni_redirect.testing.netlab import (
    PEER_V4,
    PEER_V6,
    POD_V4,
    POD_V6,
    connect,
    enabled,
    plugin_conf,
    run_plugin,
)

PROXY_UID = 1337
APP_UID = 1000


def add(net, annotations, **entry):
    run = run_plugin("ADD", net.pod.path, plugin_conf(annotations, **entry))
    assert run.rc == 0, run.stdout + run.stderr
    return run


@pytest.fixture
def mesh(net, procs):
    """Pod with the stand-in proxy (outbound, inbound, DNS listeners) and an app listener; peer with servers."""
    procs.listen(net.pod, "proxy-out", 15001, uid=PROXY_UID)
    procs.listen(net.pod, "proxy-in", 15006, uid=PROXY_UID)
    procs.listen(net.pod, "proxy-dns", 15053, uid=PROXY_UID, udp=True)
    procs.listen(net.pod, "app", 8080, uid=APP_UID)
    for port in (80, 81, 8080):
        procs.listen(net.peer, "peer", port)
    procs.listen(net.peer, "peer-dns", 53, udp=True)
    return net


def test_outbound_tcp_is_captured_with_original_destination(mesh):
    add(mesh, enabled())
    answer = connect(mesh.pod, PEER_V4, 80, uid=APP_UID)
    assert answer["listener"] == "proxy-out"
    assert answer["original_dst"] == f"{PEER_V4}:80"
    assert answer["uid"] == PROXY_UID


def test_outbound_ipv6_is_captured(mesh):
    add(mesh, enabled())
    answer = connect(mesh.pod, PEER_V6, 81, uid=APP_UID)
    assert answer["listener"] == "proxy-out"
    assert answer["original_dst"] == f"[{PEER_V6}]:81"


def test_capture_ipv6_false_leaves_ipv6_alone_in_and_out(mesh):
    """A dual-stack pod whose proxy listens on IPv4 only: IPv6 goes where it was sent, IPv4 is captured."""
    add(mesh, enabled(capture_ipv6="false", capture_dns="true"))
    assert connect(mesh.pod, PEER_V6, 81, uid=APP_UID)["listener"] == "peer"
    assert connect(mesh.peer, POD_V6, 8080, uid=0)["listener"] == "app"
    assert connect(mesh.pod, PEER_V6, 53, udp=True)["listener"] == "peer-dns"
    assert connect(mesh.pod, PEER_V4, 81, uid=APP_UID)["listener"] == "proxy-out"
    assert connect(mesh.peer, POD_V4, 8080, uid=0)["listener"] == "proxy-in"
    assert connect(mesh.pod, PEER_V4, 53, udp=True)["listener"] == "proxy-dns"
    assert "ip6" not in mesh.pod.ruleset()  # no IPv6 rule is left in a table that never sees IPv6


def test_without_plugin_traffic_is_direct(mesh):
    assert connect(mesh.pod, PEER_V4, 80, uid=APP_UID)["listener"] == "peer"


def test_pod_not_opted_in_gets_no_table_and_direct_traffic(mesh):
    add(mesh, {"cni-redirect.io/proxy-uid": "1337"})
    assert "cni_redirect" not in mesh.pod.ruleset()
    assert connect(mesh.pod, PEER_V4, 80, uid=APP_UID)["listener"] == "peer"


def test_proxy_uid_is_not_captured_so_it_does_not_loop(mesh):
    add(mesh, enabled())
    answer = connect(mesh.pod, PEER_V4, 80, uid=PROXY_UID)
    assert answer["listener"] == "peer"


def test_proxy_gid_is_exempt(mesh):
    add(mesh, enabled(proxy_uid="2000", proxy_gid="1337"))
    # nettools runs with gid == uid unless told otherwise: uid 1337 has gid 1337 but is not the proxy uid.
    assert connect(mesh.pod, PEER_V4, 80, uid=1337)["listener"] == "peer"
    assert connect(mesh.pod, PEER_V4, 80, uid=APP_UID)["listener"] == "proxy-out"


def test_exclude_uids_are_not_captured(mesh):
    add(mesh, enabled(exclude_uids="999,1000"))
    assert connect(mesh.pod, PEER_V4, 80, uid=1000)["listener"] == "peer"
    assert connect(mesh.pod, PEER_V4, 80, uid=1001)["listener"] == "proxy-out"


def test_exclude_outbound_ports(mesh):
    add(mesh, enabled(exclude_outbound_ports="80"))
    assert connect(mesh.pod, PEER_V4, 80)["listener"] == "peer"
    assert connect(mesh.pod, PEER_V4, 81)["listener"] == "proxy-out"


def test_include_outbound_ports_range(mesh):
    add(mesh, enabled(include_outbound_ports="81,8000-8100"))
    assert connect(mesh.pod, PEER_V4, 80)["listener"] == "peer"
    assert connect(mesh.pod, PEER_V4, 81)["listener"] == "proxy-out"
    assert connect(mesh.pod, PEER_V4, 8080)["listener"] == "proxy-out"


def test_exclude_outbound_cidrs_per_family(mesh):
    add(mesh, enabled(exclude_outbound_cidrs=f"{PEER_V4}/32,fd00::/8"))
    assert connect(mesh.pod, PEER_V4, 80)["listener"] == "peer"
    assert connect(mesh.pod, PEER_V6, 80)["listener"] == "peer"


def test_include_outbound_cidrs_only_ipv6(mesh):
    add(mesh, enabled(include_outbound_cidrs="fd77::/64"))
    assert connect(mesh.pod, PEER_V4, 80)["listener"] == "peer"
    assert connect(mesh.pod, PEER_V6, 80)["listener"] == "proxy-out"


def test_loopback_is_never_captured(mesh):
    add(mesh, enabled())
    assert connect(mesh.pod, "127.0.0.1", 8080)["listener"] == "app"
    assert connect(mesh.pod, "::1", 8080)["listener"] == "app"


def test_inbound_is_captured_to_inbound_port(mesh):
    add(mesh, enabled())
    answer = connect(mesh.peer, POD_V4, 8080, uid=0)
    assert answer["listener"] == "proxy-in"
    assert answer["original_dst"] == f"{POD_V4}:8080"
    answer = connect(mesh.peer, POD_V6, 8080, uid=0)
    assert answer["listener"] == "proxy-in"
    assert answer["original_dst"] == f"[{POD_V6}]:8080"


def test_exclude_inbound_ports_and_empty_include(mesh):
    add(mesh, enabled(exclude_inbound_ports="8080"))
    assert connect(mesh.peer, POD_V4, 8080, uid=0)["listener"] == "app"
    add(mesh, enabled(include_inbound_ports=""))
    assert connect(mesh.peer, POD_V4, 8080, uid=0)["listener"] == "app"
    assert "chain prerouting" not in mesh.pod.ruleset()


def test_proxy_ports_are_never_captured_inbound(mesh):
    add(mesh, enabled())
    assert connect(mesh.peer, POD_V4, 15001, uid=0)["listener"] == "proxy-out"


def test_dns_capture_udp_and_default_off(mesh):
    add(mesh, enabled())
    assert connect(mesh.pod, PEER_V4, 53, udp=True)["listener"] == "peer-dns"
    add(mesh, enabled(capture_dns="true"))
    assert connect(mesh.pod, PEER_V4, 53, udp=True)["listener"] == "proxy-dns"
    # the proxy itself resolves upstream without looping
    assert connect(mesh.pod, PEER_V4, 53, udp=True, uid=PROXY_UID)["listener"] == "peer-dns"


def test_dns_to_a_resolver_on_loopback_is_captured_but_other_loopback_traffic_is_not(mesh, procs):
    """A resolver on 127.0.0.53 (systemd-resolved style) is DNS like any other: to the DNS port, as in Istio.
    The proxy's own lookups there, and the app's other loopback traffic, stay where they were sent."""
    procs.listen(mesh.pod, "local-resolver", 53, uid=APP_UID, udp=True, bind="127.0.0.53")
    procs.listen(mesh.pod, "local-app", 8081, uid=APP_UID, bind="127.0.0.1")
    add(mesh, enabled())
    assert connect(mesh.pod, "127.0.0.53", 53, udp=True)["listener"] == "local-resolver"
    add(mesh, enabled(capture_dns="true"))
    assert connect(mesh.pod, "127.0.0.53", 53, udp=True)["listener"] == "proxy-dns"
    assert connect(mesh.pod, "127.0.0.53", 53, udp=True, uid=PROXY_UID)["listener"] == "local-resolver"
    assert connect(mesh.pod, "127.0.0.1", 8081)["listener"] == "local-app"


def test_excluded_interface_is_not_captured(mesh):
    add(mesh, enabled(exclude_interfaces="eth0"))
    assert connect(mesh.pod, PEER_V4, 80)["listener"] == "peer"
    assert connect(mesh.peer, POD_V4, 8080, uid=0)["listener"] == "app"


def test_pod_calling_own_ip_through_proxy_goes_inbound(mesh):
    add(mesh, enabled())
    answer = connect(mesh.pod, POD_V4, 8080, uid=PROXY_UID)
    assert answer["listener"] == "proxy-in"
    assert answer["original_dst"] == f"{POD_V4}:8080"
    # the app calling its own pod IP is plain loopback traffic
    assert connect(mesh.pod, POD_V4, 8080, uid=APP_UID)["listener"] == "app"


def test_proxy_inbound_passthrough_source_is_not_captured(mesh):
    add(mesh, enabled())
    answer = connect(mesh.pod, POD_V4, 8080, uid=PROXY_UID, source="127.0.0.6")
    assert answer["listener"] == "app"
    assert answer["peer"].endswith("127.0.0.6")


def test_nginx_and_envoy_with_distinct_uids(net, procs):
    """The seed's trap: nginx and envoy both as UID 101 made nginx skip capture. Here envoy is 1234."""
    envoy, nginx = 1234, 101
    procs.listen(net.pod, "envoy", 10000, uid=envoy)
    procs.listen(net.pod, "nginx", 80, uid=nginx)
    procs.listen(net.peer, "peer", 80)
    add(net, enabled(proxy_uid=str(envoy), inbound_port="10000", outbound_port="10000"))
    inbound = connect(net.peer, POD_V4, 80, uid=0)
    assert (inbound["listener"], inbound["original_dst"]) == ("envoy", f"{POD_V4}:80")
    # envoy forwards to nginx over loopback without looping back into itself
    assert connect(net.pod, "127.0.0.1", 80, uid=envoy)["listener"] == "nginx"
    # nginx's own outbound calls are captured: its UID is not the proxy's
    outbound = connect(net.pod, PEER_V4, 80, uid=nginx)
    assert (outbound["listener"], outbound["original_dst"]) == ("envoy", f"{PEER_V4}:80")
    # envoy's upstream call goes straight out
    assert connect(net.pod, PEER_V4, 80, uid=envoy)["listener"] == "peer"


RESTRICTED = {"annotation_policy": "restricted", "defaults": {"enabled": "true", "exclude-outbound-ports": "81"}}
BYPASSES = {
    "opt-out": {"enabled": "false"},
    "no-outbound-ports-no-inbound": {"include-outbound-ports": "", "include-inbound-ports": ""},
    "no-outbound-cidrs-no-inbound": {"include-outbound-cidrs": "", "include-inbound-ports": ""},
    "proxy-uid-is-the-app": {"proxy-uid": str(APP_UID)},
    "proxy-gid-is-the-app": {"proxy-gid": str(APP_UID)},
    "outbound-port-is-the-apps": {"outbound-port": "8080"},
    "exclude-the-app-uid": {"exclude-uids": str(APP_UID)},
    "exclude-everything": {"exclude-outbound-ports": "1-65535", "exclude-inbound-ports": "1-65535"},
}


@pytest.mark.parametrize("bypass", BYPASSES)
def test_restricted_policy_a_pod_cannot_annotate_its_way_out_of_capture(mesh, bypass):
    add(mesh, {f"cni-redirect.io/{k}": v for k, v in BYPASSES[bypass].items()}, **RESTRICTED)
    outbound = connect(mesh.pod, PEER_V4, 80, uid=APP_UID)
    assert (outbound["listener"], outbound["original_dst"]) == ("proxy-out", f"{PEER_V4}:80"), bypass
    inbound = connect(mesh.peer, POD_V4, 8080, uid=0)
    assert (inbound["listener"], inbound["original_dst"]) == ("proxy-in", f"{POD_V4}:8080"), bypass
    assert connect(mesh.pod, PEER_V4, 81, uid=APP_UID)["listener"] == "peer", "the admin's exclusion applies"


def test_restricted_policy_lets_a_pod_opt_in_and_honours_pod_settable(mesh):
    entry = {"annotation_policy": "restricted", "pod_settable": ["exclude-outbound-ports"]}
    add(mesh, enabled(exclude_outbound_ports="80", proxy_uid=str(APP_UID)), **entry)
    assert connect(mesh.pod, PEER_V4, 80, uid=APP_UID)["listener"] == "peer", "pod_settable: the pod's exclusion"
    assert connect(mesh.pod, PEER_V4, 81, uid=APP_UID)["listener"] == "proxy-out", "proxy-uid was not settable"


def test_a_proxy_exempt_by_its_packet_mark_whatever_its_uid(mesh):
    """#37: Istio ambient exempts its proxy by packet mark, not UID. With `proxy-mark: 0x539/0xfff` a connection
    whose socket carries that mark (any UID: root here, which is no proxy UID) goes where it was dialled, and
    one whose mark differs within the mask is captured; the proxy UID stays exempt beside it."""
    add(mesh, enabled(proxy_mark="0x539/0xfff"))
    assert connect(mesh.pod, PEER_V4, 80, uid=0, mark=0x539)["listener"] == "peer"
    assert connect(mesh.pod, PEER_V6, 81, uid=0, mark=0x7539)["listener"] == "peer", "bits outside the mask aside"
    assert connect(mesh.pod, PEER_V4, 80, uid=0, mark=0x53A)["listener"] == "proxy-out"
    assert connect(mesh.pod, PEER_V4, 80, uid=0)["listener"] == "proxy-out"
    assert connect(mesh.pod, PEER_V4, 80, uid=PROXY_UID)["listener"] == "peer"
    assert "proxy mark" in mesh.pod.ruleset()
