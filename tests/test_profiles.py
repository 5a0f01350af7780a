"""Mesh profiles as logic: which pods they capture, how the mesh's annotations land in the spec.

The traffic each case produces is proven in tests/integration/test_profiles.py.
"""

from __future__ import annotations

import ipaddress

import pytest

from cni_redirect.config import PodRef, parse_conf
from cni_redirect.errors import InvalidConfig
from cni_redirect.profiles import ISTIO, LINKERD
from cni_redirect.ruleset import PolicyRouting
from cni_redirect.settings import merge_settings
from cni_redirect.spec import ALL, CaptureSpec
from cni_redirect.testing.netlab import plugin_conf
from tests.support import call, decide, injected

POD = PodRef("default", "web", "u-1")


def decision(profile: str, annotations: dict[str, str], **entry):
    return decide(parse_conf(plugin_conf(annotations, profile=profile, **entry)), POD)


def ports(ranges) -> set[int]:
    return {p for low, high in ranges for p in range(low, high + 1)}


# --- Istio ---


def test_an_istio_injected_pod_is_captured_with_istios_defaults():
    spec = decision("istio", injected("istio")).spec
    assert spec is not None and spec.enabled
    assert (spec.proxy_uid, spec.proxy_gid, spec.outbound_port, spec.inbound_port) == (1337, 1337, 15001, 15006)
    assert spec.inbound_mode == "redirect" and not spec.tproxy
    assert spec.include_outbound_cidrs == ALL and spec.include_inbound_ports == ALL
    # the injector's 15020, plus what Istio always adds: 15021, 15090, and 15008 (HBONE)
    assert ports(spec.exclude_inbound_ports) == {15008, 15020, 15021, 15090}
    assert ports(spec.exclude_outbound_ports) == {15020}  # Istio's default when the annotation is absent
    assert [str(n) for n in spec.loopback_cidrs] == ["127.0.0.1/32", "::1/128"]  # so 127.0.0.6 goes inbound


def test_istio_without_the_status_annotation_is_not_captured():
    annotations = injected("istio")
    del annotations["sidecar.istio.io/status"]
    assert decision("istio", annotations).reason == "skipped: not enabled"


@pytest.mark.parametrize("value", ["false", "False", "0", "f"])
def test_istio_inject_false_wins_over_status(value):
    result = decision("istio", injected("istio", **{"sidecar.istio.io/inject": value}))
    assert result.ruleset is None and "sidecar.istio.io/inject is false" in result.reason


def test_istio_interception_mode_none_skips_and_says_why():
    result = decision("istio", injected("istio", **{"sidecar.istio.io/interceptionMode": "NONE"}))
    assert result.ruleset is None and "interceptionMode is NONE" in result.reason


def test_istio_none_is_logged_not_an_error():
    annotations = injected("istio", **{"sidecar.istio.io/interceptionMode": "NONE"})
    out = call("ADD", plugin_conf(annotations, profile="istio", log_level="info"))
    assert out.rc == 0 and out.backend.tables == {}
    assert "not capturing: sidecar.istio.io/interceptionMode is NONE" in out.stderr


def test_istio_unknown_interception_mode_fails_naming_the_annotation():
    with pytest.raises(InvalidConfig) as caught:
        decision("istio", injected("istio", **{"sidecar.istio.io/interceptionMode": "redirect"}))
    assert caught.value.msg == (
        'annotation sidecar.istio.io/interceptionMode: invalid value "redirect": must be REDIRECT, TPROXY or NONE'
    )


def test_istio_tproxy_mode_needs_policy_routing():
    result = decision("istio", injected("istio", **{"sidecar.istio.io/interceptionMode": "TPROXY"}))
    assert result.spec.tproxy and result.ruleset.routing == PolicyRouting()
    assert any(c.name == "tproxy_prerouting" for c in result.ruleset.chains)


def test_istio_exclude_inbound_ports_replaces_the_default_and_keeps_the_always_excluded():
    spec = decision("istio", injected("istio", **{"traffic.sidecar.istio.io/excludeInboundPorts": "9000"})).spec
    assert ports(spec.exclude_inbound_ports) == {9000, 15008, 15020, 15021, 15090}
    spec = decision("istio", injected("istio", **{"traffic.sidecar.istio.io/excludeInboundPorts": ""})).spec
    assert ports(spec.exclude_inbound_ports) == {15008, 15020, 15021, 15090}


@pytest.mark.parametrize(
    ("annotation", "value", "field", "expected"),
    [
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "", "include_outbound_cidrs", ()),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "*", "include_outbound_cidrs", ALL),
        ("traffic.sidecar.istio.io/includeOutboundIPRanges", "10.0.0.0/8", "include_outbound_cidrs", ("10.0.0.0/8",)),
        ("traffic.sidecar.istio.io/excludeOutboundIPRanges", "10.1.0.0/16", "exclude_outbound_cidrs", ("10.1.0.0/16",)),
        ("traffic.sidecar.istio.io/includeInboundPorts", "", "include_inbound_ports", ()),
        ("traffic.sidecar.istio.io/includeInboundPorts", "8080", "include_inbound_ports", ((8080, 8080),)),
        ("traffic.sidecar.istio.io/includeOutboundPorts", "3306", "capture_outbound_ports", ((3306, 3306),)),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "22", "exclude_outbound_ports", ((22, 22),)),
        ("traffic.sidecar.istio.io/excludeOutboundPorts", "", "exclude_outbound_ports", ()),
        ("traffic.sidecar.istio.io/excludeInterfaces", "eth1", "exclude_interfaces", ("eth1",)),
        ("istio.io/reroute-virtual-interfaces", "tap0", "reroute_interfaces", ("tap0",)),
        ("traffic.sidecar.istio.io/kubevirtInterfaces", "k6t-eth0", "reroute_interfaces", ("k6t-eth0",)),
    ],
)
def test_each_istio_annotation_lands_in_its_key(annotation, value, field, expected):
    spec = decision("istio", injected("istio", **{annotation: value})).spec
    actual = getattr(spec, field)
    if actual != ALL and actual and isinstance(actual[0], ipaddress.IPv4Network | ipaddress.IPv6Network):
        actual = tuple(str(n) for n in actual)
    assert actual == expected


def test_istio_prefers_reroute_virtual_interfaces_over_kubevirt():
    both = {"istio.io/reroute-virtual-interfaces": "tap0", "traffic.sidecar.istio.io/kubevirtInterfaces": "tap9"}
    assert decision("istio", injected("istio", **both)).spec.reroute_interfaces == ("tap0",)


def test_istio_bad_value_names_the_istio_annotation():
    with pytest.raises(InvalidConfig) as caught:
        decision("istio", injected("istio", **{"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/33"}))
    assert caught.value.msg.startswith(
        'annotation traffic.sidecar.istio.io/includeOutboundIPRanges: invalid value "10.0.0.0/33"'
    )


def test_our_annotation_wins_over_the_meshes_for_the_same_setting():
    annotations = injected(
        "istio",
        **{"traffic.sidecar.istio.io/excludeOutboundPorts": "22", "cni-redirect.io/exclude-outbound-ports": "2222"},
    )
    assert ports(decision("istio", annotations).spec.exclude_outbound_ports) == {2222}
    # ... and can go beyond what the mesh exposes, even past Istio's always-excluded ports
    annotations = injected("istio", **{"cni-redirect.io/exclude-inbound-ports": "15021"})
    assert ports(decision("istio", annotations).spec.exclude_inbound_ports) == {15021}


def test_conflist_defaults_sit_between_the_profile_and_the_pod():
    spec = decision("istio", injected("istio"), defaults={"proxy-uid": "1500", "capture-dns": "true"}).spec
    assert spec.proxy_uid == 1500 and spec.capture_dns
    spec = decision(
        "istio", injected("istio", **{"traffic.sidecar.istio.io/excludeInboundPorts": "1"}),
        defaults={"exclude-inbound-ports": "2"},
    ).spec  # fmt: skip
    assert ports(spec.exclude_inbound_ports) == {1, 15008, 15020, 15021, 15090}


def test_restricted_policy_applies_to_the_meshes_keys_too():
    annotations = injected("istio", **{"traffic.sidecar.istio.io/excludeOutboundIPRanges": "0.0.0.0/0"})
    conf = parse_conf(plugin_conf(annotations, profile="istio", annotation_policy="restricted"))
    settings, ignored = merge_settings(conf.defaults, conf.annotations(), "restricted", (), ISTIO)
    assert settings["enabled"].value == "true"  # the mesh's opt-in is still an opt-in
    assert "traffic.sidecar.istio.io/excludeOutboundIPRanges" in ignored
    assert captured_spec(conf).exclude_outbound_cidrs == ()
    conf = parse_conf(
        plugin_conf(
            annotations, profile="istio", annotation_policy="restricted", pod_settable=["exclude-outbound-cidrs"]
        )
    )
    assert [str(n) for n in captured_spec(conf).exclude_outbound_cidrs] == ["0.0.0.0/0"]


def captured_spec(conf) -> CaptureSpec:
    spec = decide(conf, POD).spec
    assert spec is not None, "the pod is captured"
    return spec


def test_without_a_profile_the_meshes_annotations_mean_nothing():
    assert decision("cni-redirect", injected("istio")).ruleset is None
    assert decision("cni-redirect", injected("linkerd")).ruleset is None


# --- Linkerd ---


def test_a_linkerd_injected_pod_is_captured_with_linkerds_defaults():
    spec = decision("linkerd", injected("linkerd")).spec
    assert (spec.proxy_uid, spec.proxy_gid, spec.outbound_port, spec.inbound_port) == (2102, None, 4140, 4143)
    assert ports(spec.exclude_inbound_ports) == {4190, 4191}
    assert spec.exclude_outbound_ports == () and not spec.capture_own_ip


def test_linkerd_inject_disabled_and_missing_version_are_not_captured():
    assert decision("linkerd", injected("linkerd", **{"linkerd.io/inject": "disabled"})).ruleset is None
    annotations = injected("linkerd")
    del annotations["linkerd.io/proxy-version"]
    assert decision("linkerd", annotations).ruleset is None


def test_linkerd_skip_inbound_ports_adds_to_the_base_list():
    spec = decision("linkerd", injected("linkerd", **{"config.linkerd.io/skip-inbound-ports": "3306,9000-9001"})).spec
    assert ports(spec.exclude_inbound_ports) == {4190, 4191, 3306, 9000, 9001}
    spec = decision(
        "linkerd", injected("linkerd", **{"config.linkerd.io/skip-inbound-ports": "25"}),
        defaults={"exclude-inbound-ports": "4190,4191,8086"},
    ).spec  # fmt: skip
    assert ports(spec.exclude_inbound_ports) == {4190, 4191, 8086, 25}


def test_linkerd_skip_outbound_ports_replaces_the_configured_list():
    annotations = injected("linkerd", **{"config.linkerd.io/skip-outbound-ports": "443"})
    spec = decision("linkerd", annotations, defaults={"exclude-outbound-ports": "4567,4568"}).spec
    assert ports(spec.exclude_outbound_ports) == {443}


def test_linkerd_skip_subnets_is_an_inbound_source_exclusion():
    spec = decision("linkerd", injected("linkerd", **{"config.linkerd.io/skip-subnets": "10.0.0.0/8,fd00::/8"})).spec
    assert [str(n) for n in spec.exclude_inbound_cidrs] == ["10.0.0.0/8", "fd00::/8"]
    assert spec.exclude_outbound_cidrs == ()


def test_linkerd_empty_annotations_count_as_absent():
    annotations = injected(
        "linkerd", **{"config.linkerd.io/proxy-uid": "", "config.linkerd.io/skip-outbound-ports": " "}
    )
    spec = decision("linkerd", annotations, defaults={"exclude-outbound-ports": "25"}).spec
    assert spec.proxy_uid == 2102 and ports(spec.exclude_outbound_ports) == {25}


def test_linkerd_proxy_uid_and_gid():
    annotations = injected("linkerd", **{"config.linkerd.io/proxy-uid": "3000", "config.linkerd.io/proxy-gid": "3001"})
    spec = decision("linkerd", annotations).spec
    assert (spec.proxy_uid, spec.proxy_gid) == (3000, 3001)


def test_linkerd_bad_skip_port_names_the_annotation_and_the_item():
    with pytest.raises(InvalidConfig) as caught:
        decision("linkerd", injected("linkerd", **{"config.linkerd.io/skip-inbound-ports": "3306,http"}))
    assert caught.value.msg.startswith("annotation config.linkerd.io/skip-inbound-ports (added to linkerd profile")
    assert '"http" is not a port or port range' in caught.value.msg


def test_profile_field_is_validated():
    with pytest.raises(InvalidConfig, match="conflist field profile"):
        parse_conf(plugin_conf({}, profile="consul"))


def test_profiles_only_name_catalogue_keys():
    from cni_redirect.spec import CATALOGUE

    for profile in (ISTIO, LINKERD):
        assert set(profile.defaults) <= set(CATALOGUE) and set(profile.always) <= set(CATALOGUE)
        assert {peer.key for peer in profile.keys} <= set(CATALOGUE)
