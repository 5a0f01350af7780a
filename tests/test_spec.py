"""Annotation and default parsing: values, merging, and every error message."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from cni_redirect.errors import InvalidConfig
from cni_redirect.settings import is_enabled, merge_settings
from cni_redirect.spec import ALL, CATALOGUE, OPT_IN_KEY, build_spec

P = "cni-redirect.io/"


def spec_of(annotations=None, defaults=None, **kwargs):
    settings, _ = merge_settings(defaults or {"enabled": "true"}, {P + k: v for k, v in (annotations or {}).items()})
    return build_spec(settings, **kwargs)


def error_of(annotations=None, defaults=None, **kwargs) -> InvalidConfig:
    with pytest.raises(InvalidConfig) as info:
        spec_of(annotations, defaults, **kwargs)
    assert info.value.code == 7
    return info.value


def test_builtin_defaults():
    spec = spec_of()
    assert spec.proxy_uid == 1337 and spec.proxy_gid is None
    assert (spec.outbound_port, spec.inbound_port, spec.dns_port) == (15001, 15006, 15053)
    assert spec.include_outbound_ports == ALL and spec.include_outbound_cidrs == ALL
    assert spec.include_inbound_ports == ALL and spec.captures_inbound
    assert spec.capture_dns is False and spec.exclude_uids == ()


def test_catalogue_is_exactly_the_documented_keys():
    assert set(CATALOGUE) == {
        "enabled", "proxy-uid", "proxy-gid", "exclude-uids", "outbound-port", "inbound-port", "inbound-mode",
        "include-outbound-ports", "exclude-outbound-ports", "capture-outbound-ports",
        "include-outbound-cidrs", "exclude-outbound-cidrs",
        "include-inbound-ports", "exclude-inbound-ports", "exclude-inbound-cidrs",
        "exclude-interfaces", "reroute-interfaces", "loopback-cidrs", "capture-own-ip", "capture-ipv6", "capture-dns",
        "dns-port", "proxy-mark", "loopback-mss", "tcp-rmem", "tcp-wmem",
    }  # fmt: skip
    assert OPT_IN_KEY == "enabled"


def test_annotation_beats_conflist_default_beats_builtin():
    settings, _ = merge_settings({"proxy-uid": "2000", "dns-port": "5353"}, {P + "proxy-uid": "3000"})
    assert settings["proxy-uid"].value == "3000" and settings["proxy-uid"].source == f"annotation {P}proxy-uid"
    assert settings["dns-port"].source == "conflist defaults.dns-port"
    assert settings["inbound-port"].source == "built-in default"


def test_foreign_annotations_are_ignored():
    settings, _ = merge_settings({}, {"sidecar.istio.io/inject": "true", "cni-redirect.io": "x"})
    assert not is_enabled(settings)


def test_restricted_policy_lets_a_pod_only_opt_in():
    settings, ignored = merge_settings(
        {"exclude-outbound-ports": "22"},
        {
            P + "enabled": "true",
            P + "exclude-outbound-ports": "1-65535",
            P + "proxy-uid": "1000",
            P + "inbound-port": "9",
        },
        policy="restricted",
    )
    assert is_enabled(settings) and settings["enabled"].source == f"annotation {P}enabled"
    assert sorted(ignored) == [P + "exclude-outbound-ports", P + "inbound-port", P + "proxy-uid"]
    assert settings["exclude-outbound-ports"].value == "22"
    assert (settings["proxy-uid"].value, settings["inbound-port"].value) == ("1337", "15006")


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        ("enabled", "false"),
        ("include-outbound-ports", ""),
        ("include-outbound-cidrs", ""),
        ("include-inbound-ports", ""),
        ("proxy-uid", "1000"),
        ("proxy-gid", "1000"),
        ("outbound-port", "8080"),
        ("exclude-uids", "1000"),
        ("exclude-interfaces", "eth0"),
        ("capture-dns", "false"),
    ],
)
def test_restricted_policy_ignores_every_way_out_of_capture(annotation, value):
    settings, ignored = merge_settings({"enabled": "true"}, {P + annotation: value}, policy="restricted")
    assert ignored == [P + annotation]
    assert settings[annotation].source != f"annotation {P}{annotation}"
    assert is_enabled(settings)


def test_pod_settable_is_the_admins_explicit_exception():
    settings, ignored = merge_settings(
        {"enabled": "true"},
        {P + "exclude-outbound-ports": "2222", P + "proxy-uid": "1000"},
        policy="restricted",
        pod_settable=["exclude-outbound-ports"],
    )
    assert ignored == [P + "proxy-uid"]
    assert settings["exclude-outbound-ports"].value == "2222"


def test_restricted_policy_still_refuses_unknown_keys():
    with pytest.raises(InvalidConfig, match="unknown cni-redirect annotation"):
        merge_settings({}, {P + "proxy-port": "1"}, policy="restricted")


@pytest.mark.parametrize("value", ["true", "TRUE", " True "])
def test_enabled_true_spellings(value):
    assert is_enabled(merge_settings({}, {P + "enabled": value})[0])


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("include-outbound-ports", "8000-8100,443,80,81,8050", ((80, 81), (443, 443), (8000, 8100))),
        ("exclude-outbound-ports", " 23 , 22 ", ((22, 23),)),
        ("include-inbound-ports", "8080,8080", ((8080, 8080),)),
    ],
)
def test_port_lists_are_sorted_and_merged(key, value, expected):
    assert getattr(spec_of({key: value}), key.replace("-", "_")) == expected


def test_overlapping_and_adjacent_ranges_merge():
    spec = spec_of({"exclude-outbound-ports": "10-20,15-25,26,30,30-31"})
    assert spec.exclude_outbound_ports == ((10, 26), (30, 31))


def test_cidrs_collapse_per_family_and_accept_host_bits():
    spec = spec_of({"exclude-outbound-cidrs": "10.1.2.3/8,10.0.0.0/9,fd00::1/8,192.0.2.1"})
    assert spec.exclude_outbound_cidrs == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("fd00::/8"),
    )


def test_empty_include_list_means_none():
    spec = spec_of({"include-inbound-ports": "", "include-outbound-cidrs": " "})
    assert spec.include_inbound_ports == () and not spec.captures_inbound
    assert spec.include_outbound_cidrs == ()


def test_root_allowed_only_with_conflist_consent():
    assert spec_of({"proxy-uid": "0"}, allow_root_proxy_uid=True).proxy_uid == 0
    for key in ("proxy-uid", "proxy-gid", "exclude-uids"):
        error = error_of({key: "0"})
        assert f"{P}{key}" in error.msg and "allow_root_proxy_uid" in error.msg


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("enabled", "yes", 'must be "true" or "false"'),
        ("capture-dns", "1", 'must be "true" or "false"'),
        ("proxy-uid", "abc", "is not a UID"),
        ("proxy-uid", "-1", "is not a UID"),
        ("proxy-uid", "4294967295", "out of range"),
        ("proxy-gid", "1.5", "is not a GID"),
        ("exclude-uids", "1000,,1001", "empty item"),
        ("outbound-port", "0", "out of range"),
        ("inbound-port", "65536", "out of range"),
        ("dns-port", "0x35", "is not a port"),
        ("include-outbound-ports", "80,http", "is not a port or port range"),
        ("include-outbound-ports", "*,80", "cannot be combined"),
        ("exclude-outbound-ports", "*", "only accepted by include-*"),
        ("exclude-outbound-ports", "90-80", "empty range"),
        ("exclude-inbound-ports", "70000", "is not a port or port range"),
        ("include-outbound-cidrs", "10.0.0.0/33", "is not an IPv4 or IPv6 address or CIDR"),
        ("exclude-outbound-cidrs", "fe80::%eth0/64", "zone or scope ID"),
        ("exclude-outbound-cidrs", "fe80::1%x } } ; flush ruleset ; table inet pwn { #/64", "zone or scope ID"),
        ("include-outbound-cidrs", "10.0.0.0/8,fe80::1%25lo", "zone or scope ID"),
        ("exclude-outbound-cidrs", "fd00::/8,nope", "is not an IPv4 or IPv6"),
        ("exclude-interfaces", "eth0,../../etc", "is not an interface name"),
        ("exclude-interfaces", "a-very-long-interface-name", "is not an interface name"),
        ("exclude-interfaces", 'eth0"; flush ruleset', "is not an interface name"),
        ("include-inbound-ports", "80; flush ruleset", "is not a port or port range"),
    ],
)
def test_errors_name_the_annotation_and_the_value(key, value, reason):
    if key == "enabled":
        settings, _ = merge_settings({}, {P + key: value})
        with pytest.raises(InvalidConfig) as info:
            is_enabled(settings)
        error = info.value
    else:
        error = error_of({key: value})
    assert error.msg.startswith(f"annotation {P}{key}: invalid value ")
    assert reason in error.msg
    shown = value if len(value) < 100 else value[:100]
    assert shown.replace('"', '\\"') in error.msg


def test_errors_in_defaults_name_the_conflist_field():
    error = error_of(defaults={"enabled": "true", "outbound-port": "x"})
    assert error.msg.startswith('conflist defaults.outbound-port: invalid value "x"')


def test_unknown_keys_are_errors_in_both_sources():
    with pytest.raises(InvalidConfig, match=r"annotation \"cni-redirect.io/proxy-port\": unknown"):
        merge_settings({}, {P + "proxy-port": "1"})
    with pytest.raises(InvalidConfig, match=r"conflist defaults: unknown key \"proxyUid\""):
        merge_settings({"proxyUid": "1"}, {})


def test_several_errors_are_all_reported():
    error = error_of({"outbound-port": "x", "inbound-port": "y"})
    assert "outbound-port" in error.msg and "inbound-port" in error.details


def test_huge_and_hostile_values_are_cut_short_in_messages():
    error = error_of({"exclude-uids": "x" * 100000})
    assert len(error.msg) < 400
    error = error_of({"exclude-interfaces": "eth\n0\x00"})
    assert "\n" not in error.msg and "\x00" not in error.msg


def test_set_size_limit():
    ports = ",".join(str(p) for p in range(1000, 3000, 2))
    assert len(spec_of({"exclude-outbound-ports": ports}).exclude_outbound_ports) == 1000
    error = error_of({"exclude-outbound-ports": ports}, max_set_elements=999)
    assert "exceed the limit of 999" in error.msg and "max_set_elements" in error.msg


def test_spec_is_frozen():
    spec = spec_of()
    with pytest.raises(ValidationError, match="frozen"):
        spec.proxy_uid = 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", None), ("0x539", (0x539, 0xFFFFFFFF)), ("0x539/0xfff", (0x539, 0xFFF)), (" 1337 / 4095 ", (1337, 4095))],
)
def test_proxy_mark_grammar(value, expected):
    assert spec_of({"proxy-mark": value}).proxy_mark == expected


@pytest.mark.parametrize("value", ["0", "0x0/0xfff", "0x1539/0xfff", "0x1ffffffff", "mark", "0x539/", "1/2/3"])
def test_proxy_mark_refusals_name_the_annotation(value):
    assert "cni-redirect.io/proxy-mark" in str(error_of({"proxy-mark": value}))


@pytest.mark.parametrize("value", ["1 2", "4096 8388608 1", "0 1 2", "a b c", "1 2 3 4", "4096 87380 2147483648"])
def test_tcp_buffers_refusals_name_the_annotation(value):
    assert "cni-redirect.io/tcp-rmem" in str(error_of({"tcp-rmem": value}))


def test_tcp_buffers_and_loopback_mss_render_beside_the_table():
    from cni_redirect.config import PodRef, parse_conf
    from cni_redirect.testing.netlab import enabled, plugin_conf
    from tests.support import decide

    ruleset = decide(
        parse_conf(plugin_conf(enabled(loopback_mss="true", tcp_wmem="4096 65536 4194304"))), PodRef("d", "p", None)
    ).ruleset
    assert ruleset is not None and ruleset.route_mss is not None
    assert ruleset.sysctls == (("net/ipv4/tcp_wmem", "4096 65536 4194304"),)
    assert [chain.name for chain in ruleset.chains][-1] == "postrouting"
