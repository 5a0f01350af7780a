"""Golden files of the rendered ruleset (no root needed) and properties of the builder."""

from __future__ import annotations

import json
import os

import pytest

from cni_redirect.build import build_ruleset
from cni_redirect.fake import MemoryBackend
from cni_redirect.settings import merge_settings
from cni_redirect.spec import build_spec
from cni_redirect.testing.sessions import at
from tests.support import CASES, GOLDEN_DIR, render

UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"


def _golden(path, actual: str) -> None:
    if UPDATE:
        path.write_text(actual)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 and review the diff"
    assert actual == path.read_text(), f"{path.name} changed; if intended, UPDATE_GOLDEN=1 and review the diff"


@pytest.mark.parametrize("case", CASES)
def test_rendered_text_matches_golden(case):
    _golden(GOLDEN_DIR / f"{case}.nft", render(case).to_text())


@pytest.mark.parametrize("case", CASES)
def test_json_batch_matches_golden(case):
    _golden(GOLDEN_DIR / f"{case}.json", json.dumps(render(case).add_batch(), indent=1) + "\n")


def test_no_golden_file_is_orphaned():
    names = {p.stem for p in GOLDEN_DIR.iterdir() if p.is_file()}
    assert names == set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_the_fake_kernel_accepts_every_golden_and_holds_exactly_it(case):
    backend = MemoryBackend()
    at(backend, "/run/netns/golden").apply(render(case))
    assert backend.dump("/run/netns/golden") == (GOLDEN_DIR / f"{case}.nft").read_text()


def test_build_is_pure_and_order_independent():
    key = "cni-redirect.io/exclude-outbound-ports"
    a = merge_settings({}, {"cni-redirect.io/enabled": "true", key: "443,80"})[0]
    b = merge_settings({}, {key: "80,443,80", "cni-redirect.io/enabled": "true"})[0]
    assert build_ruleset(build_spec(a)) == build_ruleset(build_spec(b))


def test_every_rule_has_a_counter_and_a_comment():
    for case in CASES:
        for obj in render(case).objects():
            if "rule" in obj:
                exprs = obj["rule"]["expr"]
                assert any("counter" in e for e in exprs), (case, obj)
                assert obj["rule"]["comment"], (case, obj)


def test_replace_batch_adds_deletes_then_adds_in_one_transaction():
    table = {"table": {"family": "inet", "name": "cni_redirect"}}
    batch = render("defaults").replace_batch()["nftables"]
    assert batch[:3] == [{"add": table}, {"delete": table}, {"add": table}], "safe whether the table exists or not"
    assert all("add" in cmd for cmd in batch[2:])


def test_create_batch_fails_if_another_add_made_the_table_first():
    batch = render("defaults").create_batch()["nftables"]
    assert batch[0] == {"create": {"table": {"family": "inet", "name": "cni_redirect"}}}
    assert batch[1:] == render("defaults").add_batch()["nftables"][1:]


def test_chains_are_nat_dstnat_base_chains():
    chains = [o["chain"] for o in render("defaults").objects() if "chain" in o]
    assert {(c["name"], c["hook"], c["type"], c["prio"]) for c in chains} == {
        ("prerouting", "prerouting", "nat", -100),
        ("output", "output", "nat", -100),
    }


def test_no_inbound_capture_means_no_prerouting_chain():
    names = [o["chain"]["name"] for o in render("no-inbound").objects() if "chain" in o]
    assert names == ["output"]


def test_no_outbound_capture_means_no_outbound_redirect_to_outbound_port():
    text = render("no-outbound").to_text()
    assert "redirect to :15001" not in text
    assert "redirect to :15006" in text  # inbound capture is independent


def test_large_sets_render_as_one_set_each():
    cidrs = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(0, 10000, 2))
    settings = merge_settings({}, {"cni-redirect.io/enabled": "true", "cni-redirect.io/exclude-outbound-cidrs": cidrs})
    ruleset = build_ruleset(build_spec(settings[0]))
    (v4,) = [s for s in ruleset.sets if s.name == "out_exclude_v4"]
    assert len(v4.elements) == 5000
    assert (
        sum(1 for o in ruleset.objects() if "rule" in o)
        == sum(1 for o in render("defaults").objects() if "rule" in o) + 1
    )
