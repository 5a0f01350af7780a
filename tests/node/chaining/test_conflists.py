"""Pure edits of CNI config files: picking the primary, adding and removing our entry."""

from __future__ import annotations

import pytest

from cni_redirect.errors import ConfError
from cni_redirect.node.chaining import conflists


def test_pick_primary_follows_libcni_order_and_suffixes():
    names = ["99-z.conflist", "10-b.conf", "10-a.conflist", "README", "00-x.json.bak", "05-c.json"]
    assert conflists.pick_primary(names) == "05-c.json"
    assert conflists.pick_primary(names, "10-b.conf") == "10-b.conf"
    assert conflists.pick_primary(names, "missing.conflist") is None
    assert conflists.pick_primary(["notes.txt"]) is None


def test_entry_puts_type_and_capability_first_and_ignores_overrides():
    ours = conflists.entry({"type": "evil", "capabilities": {}, "defaults": {"enabled": "true"}})
    assert list(ours)[:2] == ["type", "capabilities"]
    assert ours["type"] == "cni-redirect"
    assert ours["capabilities"] == {"io.kubernetes.cri.pod-annotations": True}


def test_with_entry_is_idempotent_and_last():
    document = {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "bridge"}, {"type": "cni-redirect"}]}
    ours = conflists.entry({})
    once = conflists.with_entry(document, ours)
    assert conflists.with_entry(once, ours) == once
    assert [p["type"] for p in once["plugins"]] == ["bridge", "cni-redirect"]
    assert conflists.without_entry(once)["plugins"] == [{"type": "bridge"}]


def test_single_plugin_config_is_lifted():
    document, single = conflists.parse("10-x.conf", b'{"cniVersion":"0.4.0","name":"x","type":"bridge","mtu":1400}')
    assert single
    assert document == {"cniVersion": "0.4.0", "name": "x", "plugins": [{"type": "bridge", "mtu": 1400}]}


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("a.conflist", b"{", "not valid JSON"),
        ("a.conflist", b"[]", "not a JSON object"),
        ("a.conflist", b'{"plugins": {}}', "must be a list"),
        ("a.conflist", b'{"type": "bridge"}', "neither a conflist"),
        ("a.conf", b'{"name": "x"}', "neither a conflist"),
        ("a.conf", b"\xff\xfe", "not valid JSON"),
    ],
)
def test_unusable_configs_are_named(name, data, reason):
    with pytest.raises(ConfError, match=reason) as info:
        conflists.parse(name, data)
    assert str(info.value).startswith(name)
