"""Conflist entry parsing and pod identity from CNI_ARGS."""

from __future__ import annotations

import pytest

from cni_redirect.config import parse_cni_args, parse_conf, pod_ref
from cni_redirect.errors import InvalidConfig
from cni_redirect.testing.netlab import plugin_conf


def test_contract_fields_and_their_defaults():
    conf = parse_conf(plugin_conf())
    assert conf.exclude_namespaces == ["kube-system"]
    assert conf.annotation_policy == "open" and conf.pod_settable == []
    assert conf.allow_root_proxy_uid is False
    assert conf.defaults == {}
    assert conf.log_file is None and conf.log_level == "warning"


def test_unknown_top_level_keys_are_tolerated():
    assert parse_conf(plugin_conf(somethingElse={"a": 1})).name == "test-net"


def test_defaults_accept_numbers_and_booleans_as_strings():
    conf = parse_conf(plugin_conf(defaults={"enabled": True, "proxy-uid": 1337, "dns-port": "53"}))
    assert conf.defaults == {"enabled": "true", "proxy-uid": "1337", "dns-port": "53"}


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ({"defaults": {"proxy-uid": [1]}}, "defaults.proxy-uid"),
        ({"defaults": "enabled"}, "defaults"),
        ({"annotation_policy": "closed"}, "annotation_policy"),
        ({"allow_root_proxy_uid": "maybe"}, "allow_root_proxy_uid"),
        ({"exclude_namespaces": "kube-system"}, "exclude_namespaces"),
        ({"exclude_namespaces": [""]}, "exclude_namespaces"),
        ({"log_level": "loud"}, "log_level"),
        ({"max_set_elements": 0}, "max_set_elements"),
        ({"pod_settable": ["proxy-port"]}, "pod_settable"),
        ({"pod_settable": "enabled"}, "pod_settable"),
        ({"prevResult": "x"}, "prevResult"),
    ],
)
def test_bad_fields_are_named(entry, named):
    with pytest.raises(InvalidConfig) as info:
        parse_conf({**plugin_conf(), **entry})
    assert info.value.msg.startswith("conflist field ")
    assert named in info.value.msg


def test_annotations_come_from_runtime_config():
    conf = parse_conf(plugin_conf({"a": "b"}))
    assert conf.annotations() == {"a": "b"}
    assert parse_conf(plugin_conf()).annotations() == {}


def test_non_string_annotation_is_an_error():
    with pytest.raises(InvalidConfig, match="value must be a string"):
        parse_conf(plugin_conf({"cni-redirect.io/enabled": True})).annotations()  # type: ignore[dict-item]  # bad input on purpose


def test_cni_args_in_any_order_and_odd_items():
    args = parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;junk;K8S_POD_NAMESPACE=shop;K8S_POD_UID=u1;=x")
    pod = pod_ref(args)
    assert (pod.namespace, pod.name, pod.uid) == ("shop", "web", "u1")
    assert str(pod) == "shop/web"


def test_podman_args_have_no_namespace():
    pod = pod_ref(parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=box"))
    assert pod.namespace is None and str(pod) == "-/box"
