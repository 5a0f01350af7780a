"""Several nodes, as admins run a DaemonSet: one control plane and three real kubelets on one machine, each with its
own containerd in its own network and mount namespaces (`cni_redirect.testing.nodes`): node-a and node-b on
containerd 2.4 (their agents drop in), node-c on 1.6 (its agent edits the primary). A fourth, node-d, joins during a
rollout. The chart is installed once, with the new-node guard, by the real helm; pods are placed by the real
scheduler (a nodeSelector names the node) and checked with real TCP.

The tests share one fleet, and none relies on another's order: each starts from a state its fixture ensures
(`new_nodes`: every joined node tainted and nothing of ours on it; `installed`: the chart installed and every
joined node's agent Ready), reaching it from whatever the test before left. In file order, that costs nothing;
`CNIR_TEST_ORDER=reverse` runs them last to first.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cni_redirect.cri import CriClient, sandbox_netns
from cni_redirect.node.agent.nodetaint import DEFAULT_TAINT
from cni_redirect.node.chaining.confdir import read_conf_dir
from cni_redirect.testing.cluster import (
    CHART,
    IMAGE,
    helm,
    import_images,
    kubernetes_taints,
    node_taints,
    wait_until,
)
from cni_redirect.testing.host import tear_down
from cni_redirect.testing.netlab import Netns, connect, enabled
from cni_redirect.testing.nodes import API_HOST, Node, NodeFleet
from tests.cluster.support import agent_daemonset_exists, agent_image_tag, app_pod, apply, pod_phase
from tests.support import Sampler, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NAMESPACE = "cni-redirect"
#: node -> its containerd; node-d joins during the rollout.
NODES = {"node-a": "2.4", "node-b": "2.4", "node-c": "1.6", "node-d": "2.4"}
FIRST = ("node-a", "node-b", "node-c")
TAINT = f"{DEFAULT_TAINT}=true:NoSchedule"
ROLLOUT_PODS = 30  # pods created during the rollout, spread over the first three nodes
OUTBOUND, INBOUND, PROXY_UID = 15001, 15006, 1337  # the Istio profile's ports and proxy UID


@pytest.fixture(scope="module")
def fleet(host_snapshot, agent_image):
    """The control plane and node-a, -b, -c, each registered with the new-node taint."""
    workdir = Path(tempfile.mkdtemp(prefix="cnir-k8s-", dir="/tmp"))
    fleet = NodeFleet.create(workdir, tuple(NODES))
    start = time.monotonic()
    try:
        fleet.start()
        control_plane = time.monotonic() - start
        for name in FIRST:
            join(fleet, name, agent_image)
        for name in FIRST:
            fleet.wait_ready(name)
        cluster = fleet.cluster
        wait_until(lambda: cluster.kubectl("get", "serviceaccount", "default", check=False).returncode == 0, 60,
                   "the default service account")  # fmt: skip
        for name in FIRST:
            wait_until(lambda n=name: not kubernetes_taints(cluster, n), 90, f"{name}'s not-ready taints to go")
        memory = ", ".join(f"{k} {v / 1024:.0f}" for k, v in fleet.memory_kib().items())
        ready = time.monotonic() - start
        print(f"\n[nodes] control plane up in {control_plane:.1f} s, three nodes Ready in {ready:.1f} s; MiB: {memory}")
        yield fleet
    finally:
        tear_down(fleet, host_snapshot, workdir)


def join(fleet: NodeFleet, name: str, agent_image: Path) -> Node:
    """A node joins with the new-node taint, our images imported into its containerd."""
    start = time.monotonic()
    node = fleet.add(name, NODES[name], lambda runtime: import_images(runtime, agent_image, runtime.workdir), (TAINT,))
    print(f"\n[nodes] {name} (containerd {NODES[name]}) started in {time.monotonic() - start:.1f} s")
    return node


def helm_values(fleet: NodeFleet) -> list[str]:
    """One set of values for every node: the host paths are the fleet's common node dir, each node's own there."""
    common = fleet.node_dir
    values = [
        f"cni.binDir={common / 'cni-bin'}", f"cni.confDir={common / 'cni-conf'}",
        f"cri.socket={common / 'containerd.sock'}", "nodeTaint.enabled=true", f"kubernetesApi.host={API_HOST}",
        f"kubernetesApi.port={fleet.cluster.api_port}", "entry.profile=istio", "netnsDir=/run/netns",
    ]  # fmt: skip
    return [arg for value in values for arg in ("--set", value)]


def run_helm(fleet: NodeFleet, *args: str, check: bool = True):
    release = ["cni-redirect", "--namespace", NAMESPACE, "--kubeconfig", str(fleet.cluster.kubeconfig)]
    return helm(args[0], *release, *args[1:], check=check, enter=fleet.cluster.enter)


def placed(name: str, node: str, annotations: dict[str, str] | None = None) -> dict:
    """An app pod the scheduler may place only on `node`."""
    return app_pod(name, annotations, nodeSelector={"kubernetes.io/hostname": node})


def entry_of(node: Node) -> dict | None:
    assert node.runtime is not None
    return read_conf_dir(node.runtime.conf_dir).entry()


def pod_netns(fleet: NodeFleet, pod: str) -> tuple[Node, Netns]:
    """The node the pod runs on and its sandbox's netns, opened through the node's mounts."""
    found = fleet.cluster.get("pod", pod)
    node = fleet.nodes[found["spec"]["nodeName"]]
    assert node.runtime is not None
    client = CriClient(str(node.runtime.socket), timeout=30)
    try:
        for sandbox in client.list_sandboxes(ready_only=True):
            if (sandbox.metadata.name, sandbox.metadata.namespace) == (pod, "default"):
                path = sandbox_netns(client.sandbox_status(sandbox.id))
                assert path, f"pod {pod}: its sandbox has no netns"
                return node, Netns.at(node.path(path), pod)
    finally:
        client.close()
    raise AssertionError(f"pod {pod}: no ready sandbox on {node.name}")


def has_table(fleet: NodeFleet, pod: str) -> bool:
    return "table inet cni_redirect" in pod_netns(fleet, pod)[1].ruleset()


def outbound_captured(fleet: NodeFleet, pod: str, procs) -> bool:
    """Real TCP from the pod (uid 1000) to a peer on its node: True when the pod's proxy port took it with the peer
    as its original destination, False when the peer answered."""
    node, netns = pod_netns(fleet, pod)
    port = free_port()
    procs.listen(netns, "proxy-out", OUTBOUND, uid=PROXY_UID)
    procs.listen(Netns.at(f"/run/netns/{node.netns}", node.name), "node-peer", port, bind=node.gateway)
    answer = connect(netns, node.gateway, port, uid=1000)
    procs.stop()
    if answer.get("listener") == "proxy-out":
        assert answer["original_dst"] == f"{node.gateway}:{port}", answer
        return True
    assert answer.get("listener") == "node-peer", answer
    return False


def wait_running(fleet: NodeFleet, *pods: str, timeout: float = 120) -> None:
    for pod in pods:
        wait_until(lambda p=pod: pod_phase(fleet.cluster, p) == "Running", timeout, f"pod {pod} Running")


def agent_pods(fleet: NodeFleet) -> list[dict]:
    found = fleet.cluster.get("pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=node-agent")["items"]
    return [p for p in found if not p["metadata"].get("deletionTimestamp")]


def state(fleet: NodeFleet) -> str:
    """What an admin looks at when a rollout hangs: the pods, the agents' events, the kubelets' last lines."""
    cluster = fleet.cluster
    pods = cluster.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
    agents = cluster.kubectl("describe", "pods", "-n", NAMESPACE, check=False).stdout[-6000:]
    kubelets = "".join(f"--- kubelet-{name}:\n{cluster.log_tail(f'kubelet-{name}', 1500)}\n" for name in fleet.nodes)
    return f"{pods}\n{agents}\n{kubelets}"


def is_ready(pod: dict) -> bool:
    return {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}.get("Ready") == "True"


def release_exists(fleet: NodeFleet) -> bool:
    return run_helm(fleet, "status", check=False).returncode == 0


def uninstall(fleet: NodeFleet, check: Callable[[], None] = lambda: None) -> None:
    """docs/operations.md's uninstall: `helm upgrade --set uninstall=true` (the agents' DaemonSet goes, the
    uninstall DaemonSet cleans every node; `check` runs then), then `helm uninstall` and the namespace."""
    run_helm(fleet, "upgrade", str(CHART), "--reuse-values", "--set", "uninstall=true", "--wait",
             "--timeout", "240s")  # fmt: skip
    assert not agent_pods(fleet)
    check()
    run_helm(fleet, "uninstall", "--wait", "--timeout", "120s")
    fleet.cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", timeout=180)


@pytest.fixture
def new_nodes(fleet: NodeFleet) -> NodeFleet:
    """Every joined node as it registered: our taint on, nothing of ours installed (uninstalled if it was)."""
    if release_exists(fleet):
        uninstall(fleet)
    for name in fleet.nodes:
        if DEFAULT_TAINT not in node_taints(fleet.cluster, name):
            fleet.cluster.kubectl("taint", "node", name, TAINT)
    return fleet


@pytest.fixture
def installed(fleet: NodeFleet) -> NodeFleet:
    """The chart installed with the guard, every joined node's agent Ready and its taint off (installed if not)."""
    if release_exists(fleet) and not agent_daemonset_exists(fleet.cluster):  # a test left it half uninstalled
        uninstall(fleet)
    if not release_exists(fleet):
        run_helm(fleet, "install", str(CHART), "--create-namespace", *helm_values(fleet), "--wait",
                 "--timeout", "240s")  # fmt: skip
    fleet.cluster.kubectl("rollout", "status", "-n", NAMESPACE, "daemonset/cni-redirect-node", "--timeout=240s",
                          timeout=260)  # fmt: skip
    for name in fleet.nodes:
        wait_until(lambda n=name: DEFAULT_TAINT not in node_taints(fleet.cluster, n), 60, f"{name}'s taint to go")
    return fleet


def test_helm_install_takes_each_nodes_taint_off_only_once_its_own_agent_chained(new_nodes, procs):
    """From three tainted nodes: an opted-in pod placed on each waits; `helm install` with the guard. While it runs,
    every node is sampled: its taint is never off while its conf dir lacks our entry. Then each pod runs on its
    node, captured; node-c (containerd 1.6) edited its primary, node-a and node-b left theirs byte-identical."""
    fleet = new_nodes
    cluster = fleet.cluster
    assert all(DEFAULT_TAINT in node_taints(cluster, name) for name in FIRST)
    apply(cluster, *(placed(f"early-{name}", name, enabled()) for name in FIRST))
    time.sleep(3)
    assert {pod_phase(cluster, f"early-{name}") for name in FIRST} == {"Pending"}

    result: list = []
    install = threading.Thread(target=lambda: result.append(run_helm(
        fleet, "install", str(CHART), "--create-namespace", *helm_values(fleet), "--wait",
        "--timeout", "240s")))  # fmt: skip
    start = time.monotonic()
    install.start()
    untainted: dict[str, float] = {}
    premature: list[str] = []
    while install.is_alive() or len(untainted) < len(FIRST):
        for name in FIRST:
            if name not in untainted and DEFAULT_TAINT not in node_taints(cluster, name):
                untainted[name] = time.monotonic() - start
                if entry_of(fleet.nodes[name]) is None:
                    premature.append(name)
        if time.monotonic() - start > 300:
            raise AssertionError(f"taints still on after 300 s: {sorted(set(FIRST) - set(untainted))}\n{state(fleet)}")
        time.sleep(0.2)
    install.join()
    assert result and result[0].returncode == 0
    assert not premature, f"a node's taint came off before its own agent chained: {premature}"
    print("\n[nodes] taint off after helm install began: " + ", ".join(f"{n} {t:.1f} s" for n, t in untainted.items()))

    wait_running(fleet, *(f"early-{name}" for name in FIRST))
    for name in FIRST:
        pod = f"early-{name}"
        assert cluster.get("pod", pod)["spec"]["nodeName"] == name
        assert has_table(fleet, pod), pod
        assert outbound_captured(fleet, pod, procs), pod
    assert {agent["spec"]["nodeName"] for agent in agent_pods(fleet)} == set(fleet.nodes)
    for name in FIRST:
        node = fleet.nodes[name]
        assert node.runtime is not None
        conf = node.before.conf
        primary = next(p for p in conf if p.endswith(".conflist"))
        edited = (node.runtime.conf_dir / primary).read_bytes() != conf[primary]
        assert edited == (NODES[name] == "1.6"), f"{name}: containerd {NODES[name]}, primary edited: {edited}"


def test_a_pod_calls_a_pod_on_another_node_through_capture_on_both_sides(installed, procs):
    """From the installation: a pod on node-a dials a pod on node-b. node-a's outbound capture hands the connection
    to the caller's proxy (a stand-in that dials the original destination as the proxy's UID); node-b's inbound
    capture hands it to the callee's inbound proxy port, which sees the original destination and the caller's
    address: nothing NATed between the nodes."""
    fleet = installed
    cluster = fleet.cluster
    apply(cluster, placed("caller", "node-a", enabled()), placed("callee", "node-b", enabled()))
    wait_running(fleet, "caller", "callee")
    callee_ip = cluster.get("pod", "callee")["status"]["podIP"]
    caller_ip = cluster.get("pod", "caller")["status"]["podIP"]
    _, caller = pod_netns(fleet, "caller")
    _, callee = pod_netns(fleet, "callee")
    port = free_port()
    procs.forward(caller, OUTBOUND, uid=PROXY_UID)
    procs.listen(callee, "callee-inbound-proxy", INBOUND, uid=PROXY_UID)
    procs.listen(callee, "callee-app", port, uid=1000)
    answer = connect(caller, callee_ip, port, uid=1000)
    procs.stop()
    assert answer.get("listener") == "callee-inbound-proxy", answer
    assert answer["original_dst"] == f"{callee_ip}:{port}" and answer["peer"] == caller_ip, answer
    assert fleet.nodes["node-a"].subnet.startswith(caller_ip.rsplit(".", 1)[0])
    cluster.kubectl("delete", "pod", "caller", "callee", "--wait=false")


def test_a_rollout_walks_the_nodes_and_a_node_joining_during_it_runs_no_pod_uncaptured(installed, procs, agent_image):
    """From the installation: `helm upgrade` to a new tag (maxSurge 1) walks node-a, -b, -c. While it rolls, every
    node's conf dir is sampled (our entry in every read) and opted-in pods are created on the nodes in turn.
    node-d joins meanwhile, with the taint; a pod placed on it waits for its agent. Every pod runs captured."""
    fleet = installed
    cluster = fleet.cluster
    old = {pod["metadata"]["name"] for pod in agent_pods(fleet)}
    sampler = Sampler(lambda: all(entry_of(fleet.nodes[name]) is not None for name in FIRST))
    apply(cluster, placed("joiner", "node-d", enabled()))
    tag = "0.1.0" if agent_image_tag(fleet.cluster) == "0.1.1" else "0.1.1"  # the same bytes under the other tag
    run_helm(fleet, "upgrade", str(CHART), "--reuse-values", "--set", f"image.repository={IMAGE}",
             "--set", f"image.tag={tag}")  # fmt: skip
    joining = threading.Thread(target=join, args=(fleet, "node-d", agent_image))
    joining.start()
    created: list[str] = []
    overlap = 0
    deadline = time.monotonic() + 300
    while True:
        assert time.monotonic() < deadline, "the rollout did not finish in 300 s"
        agents = agent_pods(fleet)
        overlap = max(overlap, len(agents) - len({a["spec"]["nodeName"] for a in agents}))
        if len(created) < ROLLOUT_PODS:  # one at a time, node after node: what a busy cluster starts meanwhile
            name = FIRST[len(created) % len(FIRST)]
            pod = f"roll-{name}-{len(created)}"
            apply(cluster, placed(pod, name, enabled()))
            created.append(pod)
        current = [a for a in agents if a["metadata"]["name"] not in old and is_ready(a)]
        if not joining.is_alive() and {a["spec"]["nodeName"] for a in current} == set(NODES) and len(agents) == 4:
            break
        time.sleep(1)
    joining.join()
    samples, misses = sampler.end()
    assert samples > 100 and misses == 0, (samples, misses)
    assert overlap >= 1, "maxSurge: a new agent pod ran beside the old one on its node"
    wait_running(fleet, "joiner", *created)
    for pod in ("joiner", *created):
        assert has_table(fleet, pod), pod
    assert cluster.get("pod", "joiner")["spec"]["nodeName"] == "node-d"
    assert outbound_captured(fleet, "joiner", procs)
    print(f"\n[nodes] rollout over {len(NODES)} nodes: {len(created)} pods created during it, all captured")
    cluster.kubectl("delete", "pod", "joiner", *created, "--wait=false")


def test_a_drained_node_comes_back_and_its_pods_are_captured_wherever_they_move(installed, procs):
    """From the installation: a Deployment of opted-in pods spread over the nodes; `kubectl drain
    node-b` moves its pods (captured where they land) and leaves the agent (a DaemonSet pod) and our entry on it;
    `kubectl uncordon`: a pod placed there again is captured."""
    fleet = installed
    cluster = fleet.cluster
    spec = app_pod("x", enabled())["spec"]
    spec["topologySpreadConstraints"] = [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                          "whenUnsatisfiable": "ScheduleAnyway",
                                          "labelSelector": {"matchLabels": {"app": "web"}}}]  # fmt: skip
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default", "annotations": {}},
        "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}, "annotations": enabled()}, "spec": spec}},
    }  # fmt: skip
    apply(cluster, deployment)
    cluster.kubectl("rollout", "status", "deployment/web", "--timeout=120s", timeout=150)
    node_b = fleet.nodes["node-b"]
    sampler = Sampler(lambda: entry_of(node_b) is not None)
    # --force: the earlier tests' bare pods on node-b are deleted, as drain does to pods no controller recreates
    cluster.kubectl("drain", "node-b", "--ignore-daemonsets", "--force", "--timeout=120s", timeout=150)
    cluster.kubectl("rollout", "status", "deployment/web", "--timeout=120s", timeout=150)
    pods = [p for p in cluster.get("pods", "-l", "app=web")["items"] if not p["metadata"].get("deletionTimestamp")]
    assert pods and all(p["spec"]["nodeName"] != "node-b" for p in pods), [p["spec"]["nodeName"] for p in pods]
    wait_running(fleet, *(p["metadata"]["name"] for p in pods))
    for pod in pods:
        assert has_table(fleet, pod["metadata"]["name"]), pod["metadata"]["name"]
    assert any(a["spec"]["nodeName"] == "node-b" and is_ready(a) for a in agent_pods(fleet)), "the agent stays"
    cluster.kubectl("uncordon", "node-b")
    samples, misses = sampler.end()
    assert samples > 100 and misses == 0, (samples, misses)
    assert DEFAULT_TAINT not in node_taints(cluster, "node-b"), "the agent kept the node through the drain"
    apply(cluster, placed("after-drain", "node-b", enabled()))
    wait_running(fleet, "after-drain")
    assert outbound_captured(fleet, "after-drain", procs)
    cluster.kubectl("delete", "deployment", "web", "--wait=false")
    cluster.kubectl("delete", "pod", "after-drain", "--wait=false")


def test_the_uninstall_leaves_every_nodes_conf_dir_byte_identical_and_its_bin_dir_clean(installed):
    """From the installation on every joined node: `helm upgrade --set uninstall=true`, then `helm uninstall`.
    Every node's conf dir is byte-identical to what its primary left before we came, and its bin dir holds what
    it held."""
    fleet = installed

    def check() -> None:
        for name, node in fleet.nodes.items():
            assert node.runtime is not None
            after = node.cni_dirs()
            assert after.conf == node.before.conf, f"{name}: conf dir differs: {sorted(after.conf)}"
            assert after.bins == node.before.bins, f"{name}: bin dir: {sorted(set(after.bins) - set(node.before.bins))}"

    uninstall(fleet, check)


def test_the_nodes_mount_and_network_namespaces_keep_each_nodes_paths_its_own(fleet):
    """The recipe's premise, checked: the common node dir shows each node its own conf dir, the nodes' /run/netns
    are not the host's, and each node's netns has its own address on the fabric."""
    seen = {}
    for name, node in fleet.nodes.items():
        assert node.runtime is not None
        marker = node.runtime.conf_dir / ".cnir-whoami"
        marker.write_text(name)
        try:
            seen[name] = node.run("cat", str(fleet.node_dir / "cni-conf" / ".cnir-whoami")).stdout
        finally:
            marker.unlink()
        assert node.ip in node.run("ip", "-4", "-o", "addr", "show", "eth0").stdout
    assert seen == {name: name for name in fleet.nodes}
