"""Hearing nftables transactions from the node's netns (node/pods/nftevents.py), on the real kernel."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from cni_redirect.node.pods.nftevents import NftablesEvents, inode_of
from cni_redirect.testing.netlab import Netns, enabled, plugin_conf, run_plugin, sh
from tests.support import wait_for


def node_ids() -> str:
    """The node netns's ids for other netns (`ip netns list-id`), as a text to compare."""
    return sh("ip", "netns", "list-id").stdout


@pytest.fixture
def events(host_unchanged) -> Iterator[NftablesEvents]:
    before = node_ids()
    opened = NftablesEvents.open()  # proves delivery with a netns of its own
    yield opened
    opened.close()
    # The kernel frees a netns (and its id) in a work queue after the last reference goes: soon, not at once.
    wait_for(lambda: node_ids() == before, timeout=15, interval=0.05)  # the probe netns and its id gone


@pytest.fixture
def heard_pod(host_unchanged) -> Iterator[Netns]:
    """A pod netns with an id in the node's netns, as a veth to the node gives one (given here directly)."""
    pod = Netns.create("heard")
    sh("ip", "netns", "set", pod.name, "auto")
    yield pod
    pod.delete()


def test_opening_proves_delivery_with_a_netns_of_its_own_and_leaves_nothing(events):
    assert events.messages >= 1, "the probe's transaction was heard"
    assert events.heard_in == {}, "and forgotten: it was not a pod's"


def test_a_transaction_in_a_pod_is_heard_and_a_quiet_pod_is_quiet(events, heard_pod):
    heard = events.identify(heard_pod.path)
    assert heard is not None
    assert f"nsid {heard.nsid} " in node_ids()
    read_in = events.advance()  # a pass reads the pod's generation after this
    assert events.quiet(heard_pod.path, heard, read_in)
    assert events.quiet(heard_pod.path, heard, events.advance() - 1), "a pass later, still quiet"

    add = run_plugin("ADD", heard_pod.path, plugin_conf(enabled()))  # one transaction: our table
    assert add.rc == 0, add.stdout
    now = events.advance()
    assert not events.quiet(heard_pod.path, heard, read_in), "a read before the transaction proves nothing"
    assert events.quiet(heard_pod.path, heard, now), "a read after it does"

    heard_pod.run("nft", "add", "table", "ip", "the_pods_own")  # anyone's transaction counts, not only ours
    events.advance()
    assert not events.quiet(heard_pod.path, heard, now)


def test_a_netns_without_an_id_cannot_be_heard(events, pod):
    assert events.identify(pod.path) is None
    assert events.identify("/run/netns/cnir-never-was") is None


def test_a_netns_replaced_under_the_same_path_is_not_quiet(events, host_unchanged):
    pod = Netns.create("replaced")
    try:
        sh("ip", "netns", "set", pod.name, "auto")
        heard = events.identify(pod.path)
        assert heard is not None
        read_in = events.advance()
        sh("ip", "netns", "del", pod.name)
        sh("ip", "netns", "add", pod.name)  # same path, another netns (its id may even be the old one's)
        sh("ip", "netns", "set", pod.name, "auto")
        assert inode_of(pod.path) != heard.inode
        assert not events.quiet(pod.path, heard, read_in)
    finally:
        pod.delete()


def test_lost_messages_make_every_earlier_read_prove_nothing(events, heard_pod):
    heard = events.identify(heard_pod.path)
    assert heard is not None
    other = events.advance()
    events.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)  # the kernel's minimum: a few messages
    for i in range(60):  # 60 transactions, two messages each
        heard_pod.run("nft", "add", "table", "ip", f"u{i}")
    now = events.advance()
    assert events.lost_in == now, "the overflow was noticed"
    assert not events.quiet(heard_pod.path, heard, other)
    assert events.quiet(heard_pod.path, heard, now), "reads after the loss are good again"
