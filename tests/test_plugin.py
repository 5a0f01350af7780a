"""Plugin logic against the in-memory backend: CHECK drift, policy, defaults."""

from __future__ import annotations

import io

import pytest

from cni_redirect.backend import normalize
from cni_redirect.config import PodRef, parse_conf
from cni_redirect.errors import InternalError, InvalidConfig
from cni_redirect.fake import MemoryBackend
from cni_redirect.logs import EventLog
from cni_redirect.plugin import RedirectPlugin
from cni_redirect.skel import Request
from cni_redirect.testing.netlab import enabled, plugin_conf
from tests.support import FAKE_NETNS as NETNS
from tests.support import decide

TABLE = {"family": "inet", "table": "cni_redirect"}


def tamper(plugin, *commands: dict) -> None:
    """Change the pod's table behind the plugin's back, as `nft` by hand would."""
    rc, _, error = plugin.backend.kernels[NETNS].json_cmd({"nftables": list(commands)})
    assert rc == 0, error


def request(command, conf, args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"):
    return Request(command, "cid", NETNS, "eth0", args, "", conf["cniVersion"], conf)


@pytest.fixture
def plugin():
    return RedirectPlugin(MemoryBackend(), EventLog(io.StringIO()))


def test_conflist_defaults_enable_capture_without_annotations(plugin):
    conf = plugin_conf(None, defaults={"enabled": "true", "proxy-uid": "1500"})
    plugin.add(request("ADD", conf))
    assert "meta skuid 1500 counter return" in plugin.backend.dump(NETNS)


def test_annotation_can_opt_out_of_a_default_on_open_policy(plugin):
    conf = plugin_conf({"cni-redirect.io/enabled": "false"}, defaults={"enabled": "true"})
    plugin.add(request("ADD", conf))
    assert plugin.backend.tables == {}


def test_invalid_default_fails_add_naming_the_key(plugin):
    with pytest.raises(InvalidConfig, match=r"conflist defaults.proxy-uid: invalid value \"root\""):
        plugin.add(request("ADD", plugin_conf(None, defaults={"enabled": "true", "proxy-uid": "root"})))


def test_check_passes_then_detects_each_kind_of_drift(plugin):
    conf = plugin_conf(enabled(exclude_outbound_ports="22"))
    plugin.add(request("ADD", conf))
    plugin.check(request("CHECK", conf))

    tamper(plugin, {"add": {"rule": {**TABLE, "chain": "output", "expr": [{"return": None}]}}})  # an extra rule
    with pytest.raises(InternalError, match="differs"):
        plugin.check(request("CHECK", conf))

    tamper(plugin, {"delete": {"table": {"family": "inet", "name": "cni_redirect"}}})
    with pytest.raises(InternalError, match="missing"):
        plugin.check(request("CHECK", conf))


def test_check_of_a_pod_not_captured_wants_no_table(plugin):
    conf = plugin_conf({})
    plugin.check(request("CHECK", conf))
    tamper(plugin, {"add": {"table": {"family": "inet", "name": "cni_redirect"}}})
    with pytest.raises(InternalError, match="should not be captured"):
        plugin.check(request("CHECK", conf))


def test_check_requires_prev_result(plugin):
    with pytest.raises(InvalidConfig, match="prevResult"):
        plugin.check(request("CHECK", plugin_conf(enabled(), prev=False)))


def test_decide_without_namespace_does_not_apply_exclusions():
    conf = parse_conf(plugin_conf(enabled(), exclude_namespaces=["default"]))
    assert decide(conf, PodRef(None, "box", None)).ruleset is not None
    assert decide(conf, PodRef("default", "box", None)).ruleset is None


def test_restricted_policy_keeps_admin_exclusions(plugin):
    conf = plugin_conf(
        enabled(exclude_outbound_cidrs="0.0.0.0/0"),
        annotation_policy="restricted",
        defaults={"exclude-outbound-cidrs": "169.254.169.254"},
    )
    plugin.add(request("ADD", conf))
    text = plugin.backend.dump(NETNS)
    assert "elements = { 169.254.169.254 }" in text and "0.0.0.0" not in text


def test_normalize_ignores_handles_counters_and_hash_order():
    a: list[dict] = [
        {"set": {"name": "s", "elem": ["b", "a"], "handle": 3}},
        {"rule": {"expr": [{"counter": {"packets": 5}}]}},
    ]
    b: list[dict] = [
        {"set": {"name": "s", "elem": ["a", "b"]}},
        {"rule": {"expr": [{"counter": {"packets": 0, "bytes": 0}}]}},
    ]
    assert normalize(a) == normalize(b)


def test_loopback_mss_and_tcp_buffers_are_set_checked_and_taken_back(plugin):
    """#37: ADD puts our advmss on the pod's routes without one (a route with its own is left), sets the TCP
    buffer sysctls, and adds the postrouting clamp; CHECK names a route without it and a sysctl changed; DEL
    takes our advmss off (the sysctls go with the netns)."""
    from cni_redirect.fake import FakeRoutes

    routes = FakeRoutes()
    routes.main.append({"family": "inet", "dst": "10.1.0.0/16", "advmss": 1400})  # the primary's own advmss
    plugin.backend.routing[NETNS] = routes
    conf = plugin_conf(enabled(loopback_mss="true", tcp_rmem="4096 8388608 33554432"))
    plugin.add(request("ADD", conf))
    assert [r["advmss"] for r in routes.main] == [65495, 65476, 1400]
    assert plugin.backend.sysctls[NETNS]["net/ipv4/tcp_rmem"] == "4096 8388608 33554432"
    assert "tcp option maxseg size set rt mtu" in plugin.backend.dump(NETNS)
    plugin.check(request("CHECK", conf))

    routes.main.append({"family": "inet", "dst": "10.2.0.0/16", "advmss": None})  # a route the primary adds later
    with pytest.raises(InternalError, match=r"loopback-mss: routes without an advmss .*10\.2\.0\.0/16 \(inet\)"):
        plugin.check(request("CHECK", conf))
    plugin.add(request("ADD", conf))  # what repair does
    plugin.check(request("CHECK", conf))

    plugin.backend.sysctls[NETNS]["net/ipv4/tcp_rmem"] = "4096 131072 6291456"
    with pytest.raises(InternalError, match=r"net/ipv4/tcp_rmem is '4096 131072 6291456', its settings say"):
        plugin.check(request("CHECK", conf))

    plugin.delete(request("DEL", conf))
    assert [r["advmss"] for r in routes.main] == [None, None, 1400, None], "ours off, the primary's own kept"


def test_a_table_without_loopback_mss_takes_ours_off_the_routes(plugin):
    from cni_redirect.fake import FakeRoutes

    routes = plugin.backend.routing.setdefault(NETNS, FakeRoutes())
    plugin.add(request("ADD", plugin_conf(enabled(loopback_mss="true"))))
    assert all(r["advmss"] for r in routes.main)
    plugin.add(request("ADD", plugin_conf(enabled())))  # the setting turned off: a replace of the table
    assert not any(r["advmss"] for r in routes.main)
