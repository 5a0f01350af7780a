"""The fake kernel refuses what the kernel refuses, commits all or nothing, and dumps what it holds.

tests/integration/test_fake_matches_kernel.py sends the same refused batches to the real kernel.
"""

from __future__ import annotations

import pytest

from cni_redirect.backend import TableOps
from cni_redirect.errors import InternalError
from cni_redirect.evaluation import Evaluation, Outcome, compare
from cni_redirect.fake import FakeEdge, FakeNft, FakeRoutes, MemoryBackend
from cni_redirect.testing.sessions import at
from tests.support import GOLDEN_DIR, REFUSED, REFUSED_FOLLOW_UP, render

NETNS = "/run/netns/fake"


@pytest.fixture
def backend() -> MemoryBackend:
    backend = MemoryBackend()
    at(backend, NETNS).apply(render("defaults"))
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
    at(backend, NETNS).apply(good)
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

        TableOps(FakeEdge(backend.kernels[NETNS])).run(
            {"nftables": [{"delete": {"table": {"family": "inet", "name": "x"}}}]}, "delete"
        )


def test_dump_is_the_table_in_nft_syntax(backend):
    assert backend.dump(NETNS) == (GOLDEN_DIR / "defaults.nft").read_text()
    assert at(backend, NETNS).remove() is True
    assert backend.dump(NETNS) == "" and at(backend, NETNS).remove() is False


def test_lists_and_counts_only_committed_transactions(backend):
    kernel = backend.kernels[NETNS]
    count = kernel.transactions
    at(backend, NETNS).read()
    assert kernel.transactions == count, "listings are not transactions"
    at(backend, NETNS).apply(render("no-inbound"))
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
    TableOps(FakeEdge(kernel)).apply(render("defaults"))
    backend = MemoryBackend()
    backend.kernels[NETNS] = kernel
    assert backend.dump(NETNS) == (GOLDEN_DIR / "defaults.nft").read_text()


# --- TPROXY's policy routing travels with the table ---


class RejectingNft(FakeNft):
    """A kernel that accepts listings but refuses every change."""

    def json_cmd(self, batch):
        if all(next(iter(c)) == "list" for c in batch["nftables"]):
            return super().json_cmd(batch)
        return 1, "", "Error: Could not process rule: Operation not supported\n"


def test_a_failed_table_takes_its_new_routing_back_out():
    routes = FakeRoutes()
    with pytest.raises(InternalError, match="nftables rejected the apply"):
        TableOps(FakeEdge(RejectingNft(), routes)).apply(render("tproxy"))
    assert routes.objects == [] and routes.changes == 8  # four added, four taken out


def test_routing_already_there_is_kept_when_the_table_fails():
    routes, nft = FakeRoutes(), FakeNft()
    TableOps(FakeEdge(nft, routes)).apply(render("tproxy"))
    present = list(routes.objects)
    with pytest.raises(InternalError):
        TableOps(FakeEdge(RejectingNft(tables=nft.tables), routes)).apply(render("tproxy"))
    assert routes.objects == present  # the previous, working table still needs it


def test_routing_already_present_is_reused_not_added_twice():
    routes = FakeRoutes(has_ipv6=True)
    routes.objects.append({"route": {"family": "inet6", "dst": "::/0", "type": "local", "dev": "lo", "table": 133}})
    ops = TableOps(FakeEdge(FakeNft(), routes))
    ops.apply(render("tproxy"))
    assert len(routes.objects) == 4 and ops.read() is not None


class IPv6Vanishes(FakeRoutes):
    """IPv6 looks enabled, then refuses: the add fails half-way."""

    def ipv6(self) -> bool:
        return True


def test_a_half_failed_routing_add_leaves_no_routing_and_no_table():
    routes = IPv6Vanishes(has_ipv6=False)
    ops = TableOps(FakeEdge(FakeNft(), routes))
    with pytest.raises(InternalError, match="could not be added") as caught:
        ops.apply(render("tproxy"))
    assert "ip -6 rule fwmark 0x539 lookup 133" in caught.value.details
    assert routes.objects == [] and ops.read() is None


def test_an_ipv6_less_netns_gets_ipv4_routing_only_and_check_agrees():
    routes = FakeRoutes(has_ipv6=False)
    ops = TableOps(FakeEdge(FakeNft(), routes))
    ops.apply(render("tproxy"))
    assert {next(iter(o.values()))["family"] for o in routes.objects} == {"inet"}
    evaluation = Evaluation(Outcome.CAPTURED, "captured", ruleset=render("tproxy"))
    assert compare(evaluation, ops.observe(routing_wanted=True)) is None


def test_del_removes_table_and_routing_and_reports_either():
    routes = FakeRoutes()
    ops = TableOps(FakeEdge(FakeNft(), routes))
    ops.apply(render("tproxy"))
    assert ops.remove() is True and routes.objects == [] and ops.read() is None
    assert ops.remove() is False
    ops.apply(render("tproxy"))
    ops.run({"nftables": [{"delete": {"table": {"family": "inet", "name": "cni_redirect"}}}]}, "delete")
    assert ops.remove() is True and routes.objects == []  # routing left behind by someone is still ours to remove


def test_check_through_the_plugin_names_the_missing_route():
    from cni_redirect.testing.netlab import plugin_conf
    from tests.support import call, case_annotations

    conf = plugin_conf(case_annotations("tproxy"))
    added = call("ADD", conf)
    assert added.rc == 0
    routes = added.backend.routing["/run/netns/fake"]
    routes.objects = [o for o in routes.objects if "route" not in o or o["route"]["family"] != "inet"]
    checked = call("CHECK", conf, added.backend)
    assert checked.rc != 0
    assert checked.out["msg"] == (
        "TPROXY policy routing is missing from the pod network namespace: ip route local default dev lo table 133"
    )


def test_routing_left_by_a_dead_add_is_reused_and_not_rolled_back_by_the_next_failure():
    routes = FakeRoutes()
    leftover = {"rule": {"family": "inet", "fwmark": 0x539, "table": 133}}
    routes.objects.append(leftover)  # a fresh netns by the table's account, but the rule is there
    with pytest.raises(InternalError):
        TableOps(FakeEdge(RejectingNft(), routes)).apply(render("tproxy"))
    assert routes.objects == [leftover]  # the three this call added are gone, the one it found stays
