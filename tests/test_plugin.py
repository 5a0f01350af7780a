"""Plugin logic against the in-memory backend: CHECK drift, policy, defaults."""

from __future__ import annotations

import io

import pytest

from cni_redirect.backend import MemoryBackend, normalize
from cni_redirect.config import PodRef, parse_conf
from cni_redirect.errors import InternalError, InvalidConfig
from cni_redirect.logs import EventLog
from cni_redirect.plugin import RedirectPlugin, decide
from cni_redirect.skel import Request
from tests.support import enabled, plugin_conf

NETNS = "/run/netns/fake"


def request(command, conf, args="K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"):
    return Request(command, "cid", NETNS, "eth0", args, "", conf["cniVersion"], conf)


@pytest.fixture
def plugin():
    return RedirectPlugin(MemoryBackend(), EventLog(io.StringIO()))


def test_conflist_defaults_enable_capture_without_annotations(plugin):
    conf = plugin_conf(None, defaults={"enabled": "true", "proxy-uid": "1500"})
    plugin.add(request("ADD", conf))
    (table,) = plugin.backend.tables.values()
    assert any("1500" in str(obj) for obj in table)


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
    good = plugin.backend.tables[NETNS]

    broken = [dict(o) for o in good]
    broken.pop()  # a rule went missing
    plugin.backend.tables[NETNS] = broken
    with pytest.raises(InternalError, match="differs"):
        plugin.check(request("CHECK", conf))

    del plugin.backend.tables[NETNS]
    with pytest.raises(InternalError, match="missing"):
        plugin.check(request("CHECK", conf))


def test_check_of_a_pod_not_captured_wants_no_table(plugin):
    conf = plugin_conf({})
    plugin.check(request("CHECK", conf))
    plugin.backend.tables[NETNS] = [{"table": {}}]
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
    text = str(plugin.backend.tables[NETNS])
    assert "169.254.169.254" in text and "0.0.0.0" not in text


def test_normalize_ignores_handles_counters_and_hash_order():
    a = [{"set": {"name": "s", "elem": ["b", "a"], "handle": 3}}, {"rule": {"expr": [{"counter": {"packets": 5}}]}}]
    b = [{"set": {"name": "s", "elem": ["a", "b"]}}, {"rule": {"expr": [{"counter": {"packets": 0, "bytes": 0}}]}}]
    assert normalize(a) == normalize(b)
