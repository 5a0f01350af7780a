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
    a = [{"set": {"name": "s", "elem": ["b", "a"], "handle": 3}}, {"rule": {"expr": [{"counter": {"packets": 5}}]}}]
    b = [{"set": {"name": "s", "elem": ["a", "b"]}}, {"rule": {"expr": [{"counter": {"packets": 0, "bytes": 0}}]}}]
    assert normalize(a) == normalize(b)
