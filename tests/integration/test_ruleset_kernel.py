"""The kernel accepts every golden ruleset, and the preview text means exactly what the JSON batch does."""

from __future__ import annotations

import json
import os

import pytest

from cni_redirect.backend import KernelBackend, normalize
from cni_redirect.testing.netlab import sh
from cni_redirect.testing.sessions import at
from tests.support import CASES, GOLDEN_DIR, render


@pytest.mark.parametrize("case", CASES)
def test_golden_json_and_text_program_the_same_table(pod, case):
    ruleset = render(case)
    backend = KernelBackend()
    at(backend, pod.path).apply(ruleset)
    from_json = at(backend, pod.path).read()
    assert from_json == normalize(ruleset.objects())

    at(backend, pod.path).remove()
    assert at(backend, pod.path).read() is None
    pod.run("nft", "-f", str(GOLDEN_DIR / f"{case}.nft"))
    assert at(backend, pod.path).read() == from_json


def test_applying_twice_is_identical_and_remove_leaves_nothing(pod):
    ruleset = render("exclude-everything")
    backend = KernelBackend()
    at(backend, pod.path).apply(ruleset)
    once = pod.ruleset()
    at(backend, pod.path).apply(ruleset)
    assert pod.ruleset() == once
    assert at(backend, pod.path).remove() is True
    assert pod.ruleset() == ""
    assert at(backend, pod.path).remove() is False


def test_backend_returns_to_the_callers_netns(pod):
    before = os.stat("/proc/thread-self/ns/net").st_ino
    at(KernelBackend(), pod.path).apply(render("defaults"))
    assert os.stat("/proc/thread-self/ns/net").st_ino == before


def test_large_sets_apply_in_one_transaction(pod):
    from cni_redirect.build import build_ruleset
    from cni_redirect.settings import merge_settings
    from cni_redirect.spec import build_spec

    cidrs = ",".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(0, 20000, 2))
    ports = ",".join(str(p) for p in range(20000, 40000, 2))
    settings, _ = merge_settings(
        {"enabled": "true"},
        {"cni-redirect.io/exclude-outbound-cidrs": cidrs, "cni-redirect.io/exclude-outbound-ports": ports},
    )
    ruleset = build_ruleset(build_spec(settings))
    at(KernelBackend(), pod.path).apply(ruleset)
    listing = sh("ip", "netns", "exec", pod.name, "nft", "-j", "list", "set", "inet", "cni_redirect", "out_exclude_v4")
    assert listing.stdout.count('"prefix"') == 10000


@pytest.mark.parametrize("case", CASES)
def test_the_golden_is_what_the_kernel_lists(pod, case):
    """The golden batch is held against the kernel's own listing (`nft -j list table` in the pod netns), not
    against our renderer: what the golden files promise is what a pod's netns holds."""
    at(KernelBackend(), pod.path).apply(render(case))
    listing = json.loads(pod.run("nft", "-j", "-y", "-p", "list", "table", "inet", "cni_redirect").stdout)["nftables"]
    golden = json.loads((GOLDEN_DIR / f"{case}.json").read_text())["nftables"]
    assert normalize(listing) == normalize([command["add"] for command in golden])


def test_the_generation_moves_with_every_transaction_and_only_then(pod):
    """What repair's quick check rests on: listing leaves the generation alone, any commit (ours or not) moves it."""
    backend = KernelBackend()

    def generation() -> int:
        with backend.session(pod.path) as session:
            return session.generation()

    before = generation()
    at(backend, pod.path).apply(render("defaults"))
    applied = generation()
    assert applied > before
    at(backend, pod.path).read()
    assert generation() == applied, "a listing is no transaction"
    pod.run("nft", "add", "table", "ip", "the-pods-own")
    assert generation() > applied, "another table's change moves it too"
