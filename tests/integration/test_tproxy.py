"""TPROXY inbound with real traffic: the proxy's transparent socket sees the connection as the client made it,
and the policy routing it needs lives and dies with our table."""

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

TPROXY = enabled(inbound_mode="tproxy")


def run(command: str, net, annotations: dict[str, str], **entry):
    return run_plugin(command, net.pod.path, plugin_conf(annotations, **entry))


def routing(net) -> str:
    """Our rules and routes as `ip` prints them, both families."""
    return "\n".join(
        net.pod.run(*cmd, check=False).stdout
        for cmd in (
            ("ip", "rule"),
            ("ip", "-6", "rule"),
            ("ip", "route", "show", "table", "133"),
            ("ip", "-6", "route", "show", "table", "133"),
        )
    )


@pytest.fixture
def pod_with_proxy(net, procs):
    """A transparent inbound listener (IP_TRANSPARENT needs CAP_NET_ADMIN: the proxy runs as root here, as
    Istio's does in TPROXY mode), an outbound one, and the app."""
    procs.listen(net.pod, "proxy-in", 15006, uid=0, transparent=True)
    procs.listen(net.pod, "proxy-out", 15001, uid=1337)
    procs.listen(net.pod, "app", 8080, uid=1000)
    procs.listen(net.peer, "peer", 80)
    return net


def test_tproxy_listener_sees_the_client_and_the_address_it_dialled(pod_with_proxy):
    net = pod_with_proxy
    assert run("ADD", net, TPROXY).rc == 0
    answer = connect(net.peer, POD_V4, 8080, uid=0)
    assert answer["listener"] == "proxy-in"
    assert answer["peer"] == PEER_V4  # the client's own address
    assert answer["local"] == f"{POD_V4}:8080"  # TPROXY keeps the destination: no NAT happened
    answer6 = connect(net.peer, POD_V6, 8080, uid=0)
    assert (answer6["listener"], answer6["peer"], answer6["local"]) == ("proxy-in", PEER_V6, f"[{POD_V6}]:8080")


def test_redirect_mode_rewrites_the_destination_which_tproxy_does_not(pod_with_proxy):
    net = pod_with_proxy
    assert run("ADD", net, enabled()).rc == 0
    answer = connect(net.peer, POD_V4, 8080, uid=0)
    assert answer["listener"] == "proxy-in" and answer["local"] == f"{POD_V4}:15006"
    assert answer["original_dst"] == f"{POD_V4}:8080"  # only conntrack remembers it


def test_tproxy_keeps_outbound_redirect_and_exclusions(pod_with_proxy):
    net = pod_with_proxy
    assert run("ADD", net, {**TPROXY, "cni-redirect.io/exclude-inbound-ports": "8080"}).rc == 0
    assert connect(net.peer, POD_V4, 8080, uid=0)["listener"] == "app"
    assert connect(net.pod, PEER_V4, 80, uid=1000)["listener"] == "proxy-out"


def test_tproxy_skips_excluded_sources(pod_with_proxy):
    net = pod_with_proxy
    assert run("ADD", net, {**TPROXY, "cni-redirect.io/exclude-inbound-cidrs": f"{PEER_V4}/32"}).rc == 0
    assert connect(net.peer, POD_V4, 8080, uid=0)["listener"] == "app"
    assert connect(net.peer, POD_V6, 8080, uid=0)["listener"] == "proxy-in"


def test_add_installs_policy_routing_and_del_removes_it(net):
    before = routing(net)
    assert "0x539" not in before
    assert run("ADD", net, TPROXY).rc == 0
    after = routing(net)
    assert after.count("fwmark 0x539 lookup 133") == 2, after  # IPv4 and IPv6
    assert after.count("local default dev lo") == 2, after
    deleted = run("DEL", net, TPROXY)
    assert deleted.rc == 0, deleted.stdout
    assert routing(net) == before
    assert "cni_redirect" not in net.pod.ruleset()


def test_check_detects_a_missing_route_and_a_missing_rule(net):
    assert run("ADD", net, TPROXY).rc == 0
    assert run("CHECK", net, TPROXY).rc == 0
    net.pod.run("ip", "route", "del", "local", "default", "dev", "lo", "table", "133")
    check = run("CHECK", net, TPROXY)
    assert check.rc != 0
    assert "TPROXY policy routing is missing" in check.json["msg"]
    assert "ip route local default dev lo table 133" in check.json["msg"]
    assert run("ADD", net, TPROXY).rc == 0  # a repeated ADD (repair) puts it back
    assert run("CHECK", net, TPROXY).rc == 0
    net.pod.run("ip", "-6", "rule", "del", "fwmark", "0x539", "lookup", "133")
    check = run("CHECK", net, TPROXY)
    assert check.rc != 0 and "ip -6 rule fwmark 0x539 lookup 133" in check.json["msg"]


def test_check_detects_stale_routing_after_leaving_tproxy(net):
    assert run("ADD", net, TPROXY).rc == 0
    net.pod.run("nft", "delete", "table", "inet", "cni_redirect")
    assert (
        run("CHECK", net, {"cni-redirect.io/enabled": "false"})
        .json["msg"]
        .startswith("TPROXY policy routing is present but the pod's table does not use it")
    )


def test_switching_to_redirect_removes_the_routing(net):
    assert run("ADD", net, TPROXY).rc == 0
    assert run("ADD", net, enabled()).rc == 0
    assert "0x539" not in routing(net)
    assert run("CHECK", net, enabled()).rc == 0


def test_tproxy_in_a_pod_without_ipv6_routes_ipv4_only(net):
    net.pod.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    net.pod.run("sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1")
    add = run("ADD", net, TPROXY)
    assert add.rc == 0, add.stdout + add.stderr
    assert routing(net).count("fwmark 0x539 lookup 133") == 1
    assert run("CHECK", net, TPROXY).rc == 0
    assert run("DEL", net, TPROXY).rc == 0
    assert "0x539" not in routing(net)


def test_capture_ipv6_false_routes_and_captures_ipv4_only(pod_with_proxy):
    net = pod_with_proxy
    assert run("ADD", net, {**TPROXY, "cni-redirect.io/capture-ipv6": "false"}).rc == 0
    assert connect(net.peer, POD_V4, 8080, uid=0)["local"] == f"{POD_V4}:8080"
    assert connect(net.peer, POD_V6, 8080, uid=0)["listener"] == "app"
    assert "lookup 133" in net.pod.run("ip", "rule").stdout
    assert "133" not in net.pod.run("ip", "-6", "rule").stdout
    assert run("CHECK", net, {**TPROXY, "cni-redirect.io/capture-ipv6": "false"}).rc == 0
    assert run("DEL", net, {**TPROXY, "cni-redirect.io/capture-ipv6": "false"}).rc == 0
    assert "133" not in net.pod.run("ip", "rule").stdout
