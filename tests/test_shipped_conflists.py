"""Every conflist shipped in conflist/ holds a valid cni-redirect entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cni_redirect.config import ANNOTATIONS_CAPABILITY
from cni_redirect.errors import SettingsError
from cni_redirect.node.chaining.chain import check_entry

CONFLISTS = sorted((Path(__file__).resolve().parents[1] / "conflist").glob("*.conflist"))


def test_there_are_example_conflists():
    assert CONFLISTS


@pytest.mark.parametrize("path", CONFLISTS, ids=lambda p: p.name)
def test_entry_is_valid_and_declares_the_annotations_capability(path):
    """The same entry check as the agent's (`check_entry`): an entry the agent would refuse fails here too."""
    document = json.loads(path.read_text())
    entries = [p for p in document["plugins"] if p["type"] == "cni-redirect"]
    assert len(entries) == 1 and document["plugins"][-1] is entries[0], "our entry must be last in the chain"
    assert entries[0]["capabilities"] == {ANNOTATIONS_CAPABILITY: True}
    check_entry(entries[0], path.name, document["cniVersion"])


def test_the_entry_check_refuses_what_the_agent_refuses():
    """An entry whose profile's opted-in pod fails (Istio's four excluded inbound ports over max_set_elements 1) is
    refused: the spec is built with the entry's own bound, as ADD builds it."""
    with pytest.raises(SettingsError, match=r"exceed the limit of 1 \(max_set_elements\)"):
        check_entry({"profile": "istio", "max_set_elements": 1}, "entry")
