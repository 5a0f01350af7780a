"""The fake kernel refuses what the kernel refuses, commits all or nothing, and dumps what it holds.

tests/integration/test_fake_matches_kernel.py sends the same refused batches to the real kernel.
"""

from __future__ import annotations

import pytest

from cni_redirect.backend import TableOps
from cni_redirect.errors import InternalError
from cni_redirect.fake import FakeNft, FakeRoutes, MemoryBackend
from tests.support import GOLDEN_DIR, REFUSED, REFUSED_FOLLOW_UP, render

NETNS = "/run/netns/fake"


@pytest.fixture
def backend() -> MemoryBackend:
    backend = MemoryBackend()
    backend.apply(NETNS, render("defaults"))
    return backend


@pytest.mark.parametrize("case", REFUSED)
def test_refuses_what_the_kernel_refuses_and_changes_nothing(backend, case):
    kernel = backend.kernels[NETNS]
    before = backend.dump(NETNS)
    commands = [REFUSED[case], *REFUSED_FOLLOW_UP.get(case, [])]
    rc, _, error = kernel.json_cmd({"nftables": commands})
    assert rc == 1 and error.startswith("Error: "), (case, error)
    assert backend.dump(NETNS) == before, "a refused transaction changes nothing"


def test_a_failed_replace_keeps_the_previous_table(backend):
    good = render("exclude-everything")
    backend.apply(NETNS, good)
    before = backend.dump(NETNS)
    bad = render("defaults").replace_batch()
    bad["nftables"].append({"add": {"rule": {"family": "inet", "table": "cni_redirect", "chain": "gone", "expr": []}}})
    rc, _, _ = backend.kernels[NETNS].json_cmd(bad)
    assert rc == 1 and backend.dump(NETNS) == before


def test_errors_reach_the_plugin_as_the_kernel_errors_would():
    backend = MemoryBackend()
    backend.kernels[NETNS] = FakeNft()
    with pytest.raises(InternalError, match="nftables rejected the delete transaction"):
        from cni_redirect.backend import TableOps

        TableOps(backend.kernels[NETNS], FakeRoutes()).run(
            {"nftables": [{"delete": {"table": {"family": "inet", "name": "x"}}}]}, "delete"
        )


def test_dump_is_the_table_in_nft_syntax(backend):
    assert backend.dump(NETNS) == (GOLDEN_DIR / "defaults.nft").read_text()
    assert backend.remove(NETNS) is True
    assert backend.dump(NETNS) == "" and backend.remove(NETNS) is False


def test_lists_and_counts_only_committed_transactions(backend):
    kernel = backend.kernels[NETNS]
    count = kernel.transactions
    backend.read(NETNS)
    assert kernel.transactions == count, "listings are not transactions"
    backend.apply(NETNS, render("no-inbound"))
    assert kernel.transactions == count + 1


def test_a_comment_libnftables_would_crash_on_is_refused(backend):
    rule = {"family": "inet", "table": "cni_redirect", "chain": "output", "expr": [{"return": None}]}
    kernel = backend.kernels[NETNS]
    assert kernel.json_cmd({"nftables": [{"add": {"rule": {**rule, "comment": "x" * 253}}}]})[0] == 0
    assert kernel.json_cmd({"nftables": [{"add": {"rule": {**rule, "comment": "x" * 254}}}]})[0] == 1


def test_an_add_that_loses_the_race_to_create_the_table_replaces_it():
    """Both ADDs saw no table; the second one's create fails with EEXIST and it replaces: one table, no duplicates."""

    class OtherAddCreatesFirst(FakeNft):
        def __init__(self) -> None:
            super().__init__()
            self.raced = False

        def json_cmd(self, batch: dict):
            result = super().json_cmd(batch)
            if not self.raced and batch["nftables"] == [{"list": {"tables": None}}]:
                self.raced = True  # between our look and our create, the other ADD commits its table
                assert super().json_cmd(render("defaults").create_batch())[0] == 0
            return result

    kernel = OtherAddCreatesFirst()
    TableOps(kernel, FakeRoutes()).apply(render("defaults"))
    backend = MemoryBackend()
    backend.kernels[NETNS] = kernel
    assert backend.dump(NETNS) == (GOLDEN_DIR / "defaults.nft").read_text()
