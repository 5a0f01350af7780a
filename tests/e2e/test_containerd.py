"""Pods created by a real containerd through CRI get their capture (or not), end to end.

The chain is bridge + host-local + portmap + cni-redirect; containerd passes
the pod's annotations because our entry declares the capability.
"""

from __future__ import annotations

import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cni_redirect.cniserver import CniServer
from cni_redirect.testing.containerd import GATEWAY
from cni_redirect.testing.netlab import HOST, Netns, connect, enabled

PROXY_UID = 1337
APP_UID = 1000


def events(containerd, pod_id: str) -> list[dict]:
    return containerd.runtime.events(pod_id)


def test_annotated_pod_is_captured_both_ways(containerd, procs):
    pod = containerd.run_pod("captured", annotations=enabled())
    netns = Netns.at(containerd.netns(pod))
    pod_ip = containerd.pod_ip(pod)
    assert "table inet cni_redirect" in netns.ruleset()

    procs.listen(netns, "proxy-out", 15001, uid=PROXY_UID)
    procs.listen(netns, "proxy-in", 15006, uid=PROXY_UID)
    procs.listen(HOST, "host-peer", 18080, bind=GATEWAY)

    outbound = connect(netns, GATEWAY, 18080, uid=APP_UID)
    assert (outbound["listener"], outbound["original_dst"]) == ("proxy-out", f"{GATEWAY}:18080")
    assert connect(netns, GATEWAY, 18080, uid=PROXY_UID)["listener"] == "host-peer"

    inbound = connect(HOST, pod_ip, 8080, uid=0)
    assert (inbound["listener"], inbound["original_dst"]) == ("proxy-in", f"{pod_ip}:8080")
    assert [e["outcome"] for e in events(containerd, pod) if e["command"] == "ADD"] == ["captured"]


def test_pod_without_annotation_gets_no_table_and_direct_traffic(containerd, procs):
    pod = containerd.run_pod("plain")
    netns = Netns.at(containerd.netns(pod))
    assert "cni_redirect" not in netns.ruleset()
    procs.listen(HOST, "host-peer", 18081, bind=GATEWAY)
    assert connect(netns, GATEWAY, 18081, uid=APP_UID)["listener"] == "host-peer"
    assert [e["outcome"] for e in events(containerd, pod) if e["command"] == "ADD"] == ["skipped: not enabled"]


def test_bad_annotation_fails_run_pod_sandbox_and_leaves_nothing(containerd):
    before = {p.id for p in containerd.list_sandboxes()}
    with pytest.raises(grpc.RpcError) as info:
        containerd.run_pod("broken", annotations=enabled(proxy_uid="nginx"))
    message = info.value.details() or ""
    assert 'plugin type="cni-redirect" failed (add)' in message
    assert 'annotation cni-redirect.io/proxy-uid: invalid value "nginx"' in message
    assert {p.id for p in containerd.list_sandboxes()} == before


def test_stop_and_remove_run_del_twice_successfully(containerd):
    pod = containerd.run_pod("lifecycle", annotations=enabled())
    containerd.stop_pod(pod)
    containerd.remove_pod(pod)
    dels = [e for e in events(containerd, pod) if e["command"] == "DEL"]
    assert [e["outcome"] for e in dels] == ["removed table", "nothing to do: CNI_NETNS is empty"]
    assert all(e["level"] == "info" for e in dels)


def test_excluded_namespace_is_not_touched(containerd):
    pod = containerd.run_pod("system-pod", namespace="kube-system", annotations=enabled())
    assert "cni_redirect" not in Netns.at(containerd.netns(pod)).ruleset()
    (add,) = [e for e in events(containerd, pod) if e["command"] == "ADD"]
    assert add["outcome"] == "skipped: namespace kube-system is in exclude_namespaces"


def test_twenty_concurrent_pods_get_their_own_rules(containerd):
    count = 20

    def create(index: int) -> str:
        return containerd.run_pod(f"burst-{index}", annotations=enabled(exclude_outbound_ports=str(20000 + index)))

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=count) as pool:
        pods = list(pool.map(create, range(count)))
    elapsed = time.monotonic() - start
    for index, pod in enumerate(pods):
        listing = (
            Netns.at(containerd.netns(pod))
            .run("nft", "list", "set", "inet", "cni_redirect", "out_exclude_ports")
            .stdout
        )
        assert f"elements = {{ {20000 + index} }}" in listing, (index, listing)
    print(f"\n[e2e] {count} concurrent annotated RunPodSandbox: {elapsed:.2f} s wall")
    for pod in pods:
        containerd.stop_pod(pod)
        containerd.remove_pod(pod)


def test_run_pod_sandbox_time_with_and_without_the_plugin(containerd):
    """Information, not an assertion: what our link in the chain costs a pod start, in each mode."""
    runtime = containerd.runtime

    def timed(label: str, annotations: dict[str, str]) -> float:
        samples = []
        for index in range(5):
            start = time.monotonic()
            pod = containerd.run_pod(f"timing-{label}-{index}", annotations=annotations)
            samples.append(time.monotonic() - start)
            containerd.stop_pod(pod)
            containerd.remove_pod(pod)
        return statistics.median(samples) * 1000

    in_process = timed("in-process", enabled())
    agent = CniServer(Path(f"/run/cni-redirect/e2e-{os.getpid()}.sock"), lambda *a, **k: None)
    agent.start()
    try:
        runtime.write_conflist(runtime.conflist(agent_socket=str(agent.path)))
        time.sleep(2)  # containerd reloads asynchronously; the plugin runs in both configs
        via_agent = timed("agent", enabled())
        assert agent.served >= 5, "the pods went through the agent"
        runtime.write_conflist(runtime.conflist(with_plugin=False))
        containerd.wait_for_reload(expect_plugin=False)
        without = timed("without", {})
    finally:
        runtime.write_conflist(runtime.conflist())
        containerd.wait_for_reload(expect_plugin=True)
        agent.stop()
    print(
        f"\n[e2e] RunPodSandbox median of 5: {without:.0f} ms without cni-redirect in the chain, "
        f"{in_process:.0f} ms with it in-process ({in_process / without:.2f}x), "
        f"{via_agent:.0f} ms through the agent ({via_agent / without:.2f}x)"
    )


def test_containerd_2_runs_status_through_the_chain_and_the_node_follows_our_answer(containerd):
    """containerd 2.x asks every plugin of a cniVersion 1.1.0 chain for STATUS on each CRI Status call: each one
    is in our log_file, and a STATUS error turns the node's NetworkReady false with our message, until the entry is
    fixed. containerd 1.6 (its conflist at 1.0.0) never asks."""
    runtime = containerd.runtime
    agent = CniServer(Path(f"/run/cni-redirect/e2e-status-{os.getpid()}.sock"), lambda *a, **k: None)
    agent.start()

    def statuses() -> int:
        return sum(1 for e in runtime.events() if e.get("command") == "STATUS")

    def network_ready() -> tuple[bool, str]:
        status = containerd.stub.Status(containerd.pb.StatusRequest(), timeout=30).status
        (network,) = [c for c in status.conditions if c.type == "NetworkReady"]
        return network.status, network.message

    try:
        runtime.write_conflist(runtime.conflist(agent_socket=str(agent.path)))
        containerd.wait_for_reload(expect_plugin=True)
        before = statuses()
        for _ in range(3):
            assert network_ready()[0]
        if runtime.version == "1.6":
            assert statuses() == before, "containerd 1.6 has no STATUS"
            return
        assert statuses() >= before + 3, "one STATUS through our plugin per CRI Status call"
        runtime.write_conflist(runtime.conflist(agent_socket=str(agent.path), max_set_elements=0))
        deadline = time.monotonic() + 20
        while network_ready()[0] and time.monotonic() < deadline:
            time.sleep(0.2)
        ready, message = network_ready()
        print(f"\n[e2e] containerd {runtime.version} NetworkReady after a bad entry: {ready}: {message[:200]}")
        assert not ready and "max_set_elements" in message
        runtime.write_conflist(runtime.conflist(agent_socket=str(agent.path)))
        deadline = time.monotonic() + 20
        while not network_ready()[0] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert network_ready()[0], "fixed entry, ready node"
    finally:
        runtime.write_conflist(runtime.conflist())
        containerd.wait_for_reload(expect_plugin=True)
        agent.stop()
