"""Every conflist shipped in conflist/ holds a valid cni-redirect entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cni_redirect.config import ANNOTATIONS_CAPABILITY, parse_conf
from cni_redirect.profiles import profile_named
from cni_redirect.settings import merge_settings
from cni_redirect.spec import build_spec

CONFLISTS = sorted((Path(__file__).resolve().parents[1] / "conflist").glob("*.conflist"))


def test_there_are_example_conflists():
    assert CONFLISTS


@pytest.mark.parametrize("path", CONFLISTS, ids=lambda p: p.name)
def test_entry_is_valid_and_declares_the_annotations_capability(path):
    document = json.loads(path.read_text())
    entries = [p for p in document["plugins"] if p["type"] == "cni-redirect"]
    assert len(entries) == 1 and document["plugins"][-1] is entries[0], "our entry must be last in the chain"
    conf = parse_conf({"cniVersion": document["cniVersion"], **entries[0]})
    assert conf.model_dump(by_alias=True)["capabilities"] == {ANNOTATIONS_CAPABILITY: True}
    settings, _ = merge_settings(
        conf.defaults, {"cni-redirect.io/enabled": "true"}, profile=profile_named(conf.profile)
    )
    build_spec(settings, allow_root_proxy_uid=conf.allow_root_proxy_uid)
