"""The admin's path on a real cluster, both ways an admin takes it:

- kubectl: `kubectl apply -k` of the minimal overlay (no capability: the plugin runs in-process, the agent edits
  the primary's conflist since it has no CRI socket to ask about drop-ins) plus the new-node guard component;
- helm: `helm install` of the chart with its defaults (the CNI server, repair, drop-in mode chosen through CRI)
  and `nodeTaint.enabled`, on containerd 2.4 and again on 1.6 (the kubelet 1.37 runs on both; 1.6 edits).

Then, the same steps for both: the real kubelet's exec probes, a rollout by the real DaemonSet controller with
maxSurge, an image that cannot start, a deleted agent pod, the uninstall. Each step is checked with real TCP from
pods the real scheduler placed. The tests share one cluster per path, and none relies on another's order: each
starts from a state its fixture ensures (`new_node`: the node as it registered, tainted, nothing of ours on it;
`installed`: the agent's DaemonSet rolled out), reaching it from whatever the test before left; in file order that
costs nothing. `CNIR_TEST_ORDER=reverse` runs them last to first.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni_redirect.node.agent.nodetaint import DEFAULT_TAINT
from cni_redirect.testing.cluster import (
    BROKEN_TAG,
    CHART,
    IMAGE,
    NODE,
    helm,
    node_taints,
    running_cluster,
    wait_until,
)
from cni_redirect.testing.istio import run_validation
from cni_redirect.testing.netlab import enabled
from tests.cluster.support import (
    REPO,
    NodeView,
    agent_daemonset_exists,
    agent_image_tag,
    app_pod,
    apply,
    outbound_goes_to_proxy,
    pod_phase,
    wait_running,
)
from tests.support import Sampler, free_port, injected

NAMESPACE = "cni-redirect"
DAEMONSET = "daemonset/cni-redirect-node"


def kustomization(directory: Path, resources: list[str], components: list[str], patches: dict[str, str]) -> Path:
    """A kustomization of the admin's own beside nothing of ours: the repo's dirs by relative path (kustomize
    refuses absolute ones), and patch files of its own."""
    directory.mkdir(parents=True, exist_ok=True)
    up = os.path.relpath(REPO, directory)
    document = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f"{up}/{r}" for r in resources],
        "components": [f"{up}/{c}" for c in components],
        "patches": [{"path": name} for name in patches],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(document))
    for name, text in patches.items():
        (directory / name).write_text(text)
    return directory


def node_paths(runtime, daemonset: str, env: dict[str, str] | None = None) -> str:
    """A DaemonSet patch with this node's CNI dirs (as the k3s or gke components patch theirs) and env."""
    container = {"name": "install", "env": [{"name": k, "value": v} for k, v in (env or {}).items()]}
    spec: dict[str, list[dict[str, Any]]] = {
        "volumes": [
            {"name": "cni-bin", "hostPath": {"path": str(runtime.bin_dir)}},
            {"name": "cni-conf", "hostPath": {"path": str(runtime.conf_dir)}},
        ]
    }
    if env:
        spec["containers"] = [container]
    patch = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": daemonset, "namespace": NAMESPACE},
        "spec": {"template": {"spec": spec}},
    }
    return yaml.safe_dump(patch)


def overlay(cluster, directory: Path, base: str = "install/kubernetes/overlays/minimal") -> Path:
    """What an admin on a node with its own CNI paths writes: the shipped overlay, the new-node guard component,
    a patch with this node's paths and the API server's address (this cluster has no kube-proxy, so the service
    IP is not routed: the agent is given the address directly), and the entry with the Istio profile."""
    api = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(cluster.api_port)}
    patches = {"node.yaml": node_paths(cluster.runtime, "cni-redirect-node", api), "entry.yaml": istio_entry()}
    return kustomization(directory, [base], ["install/kubernetes/components/node-taint"], patches)


def istio_entry() -> str:
    """The shipped ConfigMap with `"profile": "istio"` added: the admin of an Istio mesh sets it."""
    configmap = yaml.safe_load((REPO / "install/kubernetes/base/configmap.yaml").read_text())
    entry = json.loads(configmap["data"]["entry.json"])
    configmap["data"]["entry.json"] = json.dumps({**entry, "profile": "istio"}, indent=2)
    return yaml.safe_dump(configmap)


def uninstall_overlay(cluster, directory: Path) -> Path:
    patch = node_paths(cluster.runtime, "cni-redirect-uninstall")
    return kustomization(directory, ["install/kubernetes/uninstall"], [], {"node.yaml": patch})


def agent_pods(cluster) -> list[dict]:
    found = cluster.get("pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/component=node-agent")["items"]
    return [p for p in found if not p["metadata"].get("deletionTimestamp")]


def is_ready(pod: dict) -> bool:
    conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
    return conditions.get("Ready") == "True"


def wait_rollout(cluster) -> None:
    """The agent's DaemonSet rolled out: every node runs a Ready pod of the current template."""
    cluster.kubectl("rollout", "status", "-n", NAMESPACE, DAEMONSET, "--timeout=180s", timeout=200)


class KubectlAdmin:
    """kubectl, as docs/install.md writes it: apply -k, set image, rollout undo, the uninstall DaemonSet."""

    name = "kubectl"
    mode = "edit"  # the minimal overlay has no CRI socket: `auto` cannot ask the runtime, so it edits
    via = "in-process"

    def __init__(self, cluster, work: Path) -> None:
        self.cluster, self.work = cluster, work
        self.overlay = overlay(cluster, work / "overlay")

    def install(self) -> None:
        self.cluster.kubectl("apply", "-k", str(self.overlay))
        wait_rollout(self.cluster)

    def installed(self) -> bool:
        return agent_daemonset_exists(self.cluster)

    def remove(self) -> None:
        """Whatever of ours a test left, gone the documented way (the uninstall DaemonSet cleans the node)."""
        if self.installed() or self.cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0:
            self.uninstall()

    def set_image(self, tag: str) -> None:
        self.cluster.kubectl("set", "image", "-n", NAMESPACE, DAEMONSET, f"install={IMAGE}:{tag}")

    def undo(self) -> None:
        self.cluster.kubectl("rollout", "undo", "-n", NAMESPACE, DAEMONSET)
        wait_rollout(self.cluster)

    def uninstall(self, check: Callable[[], None] = lambda: None, agentless: Callable[[], None] = lambda: None) -> None:
        """Delete the agent's DaemonSet (entry and plugin stay, working in-process: `agentless` runs then), apply
        the uninstall DaemonSet, wait for it to be Ready (`check` runs then), delete both."""
        cluster = self.cluster
        cluster.kubectl("delete", "-n", NAMESPACE, DAEMONSET, "--ignore-not-found", "--wait=true", timeout=120)
        agentless()
        uninstall = uninstall_overlay(cluster, self.work / "uninstall")
        cluster.kubectl("apply", "-k", str(uninstall))
        cluster.kubectl(
            "rollout", "status", "-n", NAMESPACE, "daemonset/cni-redirect-uninstall", "--timeout=120s", timeout=150
        )
        check()
        cluster.kubectl("delete", "-k", str(uninstall), "--wait=true", timeout=120)
        cluster.kubectl("delete", "-k", str(self.overlay), "--ignore-not-found", "--wait=true", timeout=180)


class HelmAdmin:
    """helm, as docs/install.md writes it: install, upgrade --reuse-values, rollback, uninstall=true then uninstall."""

    name = "helm"
    mode = "dropin"  # containerd 2.4 says through CRI that it loads libcni's drop-ins (1.6: edit)
    via = "cni-server"

    def __init__(self, cluster, work: Path) -> None:
        self.cluster = cluster
        kubeconfig = str(cluster.kubeconfig)
        self.release = ["cni-redirect", "--namespace", NAMESPACE, "--kubeconfig", kubeconfig]
        runtime = cluster.runtime
        self.values = [
            f"cni.binDir={runtime.bin_dir}", f"cni.confDir={runtime.conf_dir}", f"cri.socket={runtime.socket}",
            "nodeTaint.enabled=true", "kubernetesApi.host=127.0.0.1", f"kubernetesApi.port={cluster.api_port}",
            "entry.profile=istio",
            # /var/run is a link to /run here and "/" is a private mount: containerd 1.6 checks HostToContainer
            # propagation on the unresolved path and refuses it. Real nodes (systemd) have "/" shared.
            "netnsDir=/run/netns",
        ]  # fmt: skip

    def _sets(self, values) -> list[str]:
        return [arg for value in values for arg in ("--set", value)]

    def install(self) -> None:
        helm("install", *self.release, str(CHART), "--create-namespace", *self._sets(self.values),
             "--wait", "--timeout", "180s")  # fmt: skip

    def set_image(self, tag: str) -> None:
        helm("upgrade", *self.release, str(CHART), "--reuse-values", "--set", f"image.repository={IMAGE}",
             "--set", f"image.tag={tag}")  # fmt: skip

    def undo(self) -> None:
        helm("rollback", *self.release, "--wait", "--timeout", "180s")
        wait_rollout(self.cluster)

    def installed(self) -> bool:
        return agent_daemonset_exists(self.cluster)

    def remove(self) -> None:
        """Whatever of ours a test left, gone the documented way (the uninstall DaemonSet cleans the node)."""
        if helm("status", *self.release, check=False).returncode == 0:
            self.uninstall()

    def uninstall(self, check: Callable[[], None] = lambda: None, agentless: Callable[[], None] = lambda: None) -> None:
        """`helm upgrade --set uninstall=true` (the agents and the uninstall DaemonSet at once: `agentless` has no
        moment of its own), `check`, then `helm uninstall`."""
        helm("upgrade", *self.release, str(CHART), "--reuse-values", "--set", "uninstall=true",
             "--wait", "--timeout", "180s")  # fmt: skip
        assert not agent_pods(self.cluster), "uninstall=true: the agent's DaemonSet is gone"
        check()
        helm("uninstall", *self.release, "--wait", "--timeout", "120s")
        self.cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=true", timeout=180)


def check_entry_stays(cluster) -> None:
    assert NodeView(cluster).entry() is not None, "deleting the DaemonSet is not an uninstall"


#: (admin path, the node's containerd): helm also on containerd 1.6, where the agent edits the primary's file.
PATHS = [("kubectl", "2.4"), ("helm", "2.4"), ("helm", "1.6")]


@pytest.fixture(scope="module", params=PATHS, ids=[f"{p}-containerd-{v}" for p, v in PATHS])
def path(request) -> tuple[str, str]:
    return request.param


@pytest.fixture(scope="module")
def cluster(path, host_snapshot, agent_image):
    """A new node and control plane for each path: each starts as a node that has just joined."""
    yield from running_cluster(host_snapshot, agent_image, runtime_version=path[1])


@pytest.fixture(scope="module")
def admin(path, cluster, tmp_path_factory):
    name, version = path
    admin = (KubectlAdmin if name == "kubectl" else HelmAdmin)(cluster, tmp_path_factory.mktemp(name))
    if version == "1.6":
        admin.mode = "edit"  # containerd 1.6 does not load drop-ins: CRI Version says so, the agent edits
    return admin


@pytest.fixture(scope="module")
def state(cluster):
    """What the tests share: the node's view, the conf dir as the primary left it (read before any install: the
    fixtures that install ask for this one first)."""
    runtime = cluster.runtime
    tree = {p.relative_to(runtime.conf_dir): p.read_bytes() for p in runtime.conf_dir.rglob("*") if p.is_file()}
    return {"node": NodeView(cluster), "original": tree}


@pytest.fixture
def new_node(cluster, admin, state):
    """The node as it registered: our taint on, nothing of ours installed (uninstalled if it was)."""
    admin.remove()
    if DEFAULT_TAINT not in node_taints(cluster):
        cluster.kubectl("taint", "node", NODE, f"{DEFAULT_TAINT}=true:NoSchedule")
    return state


@pytest.fixture
def installed(cluster, admin, state):
    """The agent's DaemonSet rolled out and the node's taint off (installed if it was not, after removing what a
    half-done uninstall left)."""
    if not admin.installed():
        admin.remove()
        admin.install()
    wait_rollout(cluster)
    wait_until(lambda: DEFAULT_TAINT not in node_taints(cluster), 60, "the agent to take the taint off")
    return state


def test_a_new_node_keeps_opted_in_pods_off_until_the_agent_serves_then_captures_them(cluster, admin, new_node, procs):
    """The node registered with the taint: an opted-in pod waits (the real scheduler); the admin installs; the
    agent's exec readiness probe passes on the real kubelet, the agent takes the taint off, the pod is scheduled
    and captured."""
    state = new_node
    node = state["node"]
    assert node_taints(cluster) == [DEFAULT_TAINT]
    apply(cluster, app_pod("early", enabled()))
    time.sleep(5)  # the scheduler has had its chances
    pod = cluster.get("pod", "early")
    assert pod["status"].get("phase") == "Pending" and not pod["spec"].get("nodeName"), pod["status"]
    (scheduled,) = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
    assert scheduled["status"] == "False" and "untolerated taint" in scheduled["message"], scheduled

    start = time.monotonic()
    admin.install()
    (agent,) = agent_pods(cluster)
    assert is_ready(agent), agent["status"]
    print(f"\n[{admin.name}] agent Ready {time.monotonic() - start:.1f} s after the install command")
    wait_until(lambda: DEFAULT_TAINT not in node_taints(cluster), 60, "the agent to take the taint off")
    wait_running(cluster, "early")
    print(f"[{admin.name}] the waiting pod ran {time.monotonic() - start:.1f} s after the install command")
    assert node.has_table("early")
    assert outbound_goes_to_proxy(node, "early", procs, free_port())
    assert [e["via"] for e in node.events("early") if e["command"] == "ADD"] == [admin.via]
    entry = node.entry()
    assert entry is not None and entry["type"] == "cni-redirect"
    assert ("agent_socket" in entry) == (admin.via == "cni-server")
    (primary,) = [p for p in state["original"] if p.suffix == ".conflist"]
    chained = json.loads((cluster.runtime.conf_dir / primary).read_text())["plugins"][-1]["type"]
    if admin.mode == "edit":
        assert chained == "cni-redirect", "edit mode: our entry is inlined, last in the chain"
    else:
        assert (cluster.runtime.conf_dir / primary).read_bytes() == state["original"][primary], "drop-in: untouched"


def test_the_agents_token_may_take_only_our_taint_off_only_its_own_node(cluster, admin, installed):
    """RBAC can only say "patch nodes"; the shipped admission policy narrows the agent's token to the guard's one
    change. A token bound to the agent's pod (as the kubelet gives it) names its node; with it the real API server
    refuses a label, another taint, and (impersonating an agent on another node) a patch of this node, and takes
    our taint off."""
    (agent,) = agent_pods(cluster)
    meta = agent["metadata"]
    token = cluster.kubectl(
        "create", "token", "cni-redirect", "-n", NAMESPACE, "--bound-object-kind=Pod",
        f"--bound-object-name={meta['name']}", f"--bound-object-uid={meta['uid']}",
    ).stdout.strip()  # fmt: skip
    whoami = json.loads(cluster.kubectl("auth", "whoami", "-o", "json", f"--token={token}").stdout)["status"]
    assert whoami["userInfo"]["extra"]["authentication.kubernetes.io/node-name"] == [NODE], whoami

    def as_agent(*args: str, on_node: str = ""):
        """With the agent's token; with `on_node`, the admin impersonating an agent whose token names that node."""
        who = [f"--token={token}"]
        if on_node:
            account = f"system:serviceaccount:{NAMESPACE}:cni-redirect"
            who = [f"--as={account}", f"--as-user-extra=authentication.kubernetes.io/node-name={on_node}"]
        return cluster.kubectl(*args, *who, check=False)

    refused = {
        "a label": as_agent("label", "node", NODE, "cni-redirect.io/owned=yes"),
        "another taint": as_agent("taint", "node", NODE, "example.com/other=x:NoSchedule"),
        "unschedulable": as_agent("cordon", NODE),
    }
    cluster.kubectl("taint", "node", NODE, f"{DEFAULT_TAINT}=true:NoSchedule")
    try:
        refused["another node's agent"] = as_agent("taint", "node", NODE, f"{DEFAULT_TAINT}-", on_node="node-b")
        for what, run in refused.items():
            # kubectl cordon exits 0 after a refused patch: the policy's message, and the node below, tell
            assert "cni-redirect: an agent may" in run.stderr, (what, run.returncode, run.stdout, run.stderr)
        node = cluster.get("node", NODE)
        assert not node["spec"].get("unschedulable") and "cni-redirect.io/owned" not in node["metadata"]["labels"]
        kept = node_taints(cluster)
        assert DEFAULT_TAINT in kept and "example.com/other" not in kept, "nothing refused was applied"

        removed = as_agent("taint", "node", NODE, f"{DEFAULT_TAINT}-")
        assert removed.returncode == 0, removed.stderr
        assert DEFAULT_TAINT not in node_taints(cluster)
    finally:
        cluster.kubectl("taint", "node", NODE, f"{DEFAULT_TAINT}-", check=False)


def test_an_annotated_pod_is_captured_and_an_unannotated_one_is_not(cluster, installed, procs):
    node = installed["node"]
    apply(cluster, app_pod("annotated", enabled()), app_pod("plain"))
    wait_running(cluster, "annotated")
    wait_running(cluster, "plain")
    assert outbound_goes_to_proxy(node, "annotated", procs, free_port())
    assert not node.has_table("plain")
    assert not outbound_goes_to_proxy(node, "plain", procs, free_port())


def test_a_pod_as_istios_injector_writes_it_passes_istios_own_validator(cluster, installed, procs):
    """With `"profile": "istio"` in the entry, a pod carrying the annotations Istio's injector writes
    (tests/fixtures/mesh/istio-injected.json) is captured, and Istio's own validator (pilot-agent istio-iptables
    --run-validation, as the istio-validation init container runs it) passes in the netns the kubelet made."""
    node = installed["node"]
    annotations = injected("istio")
    apply(cluster, app_pod("istio-app", annotations))
    wait_running(cluster, "istio-app")
    real = run_validation(node.netns("istio-app").path, annotations)
    assert real.returncode == 0 and "Validation passed" in real.stdout + real.stderr, real.stdout[-2000:]
    assert outbound_goes_to_proxy(node, "istio-app", procs, free_port())
    (add,) = [e for e in node.events("istio-app") if e["command"] == "ADD"]
    assert add["outcome"] == "captured", add


def test_an_app_team_annotates_its_deployment_and_its_new_pods_are_captured(cluster, installed, procs):
    """The app team's path: a Deployment (the real controllers) starts uncaptured; `kubectl annotate` of a running
    pod changes nothing (annotations are read when the pod's sandbox is made); `kubectl patch` of the template
    rolls new pods, which are captured."""
    node = installed["node"]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "shop", "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "shop"}},
            "template": {"metadata": {"labels": {"app": "shop"}}, "spec": app_pod("x")["spec"]},
        },
    }
    apply(cluster, deployment)
    cluster.kubectl("rollout", "status", "deployment/shop", "--timeout=90s", timeout=120)
    (first,) = [p["metadata"]["name"] for p in cluster.get("pods", "-l", "app=shop")["items"]]
    assert not outbound_goes_to_proxy(node, first, procs, free_port())
    cluster.kubectl("annotate", "pod", first, "cni-redirect.io/enabled=true")
    assert not node.has_table(first), "a running pod keeps what it started with"
    patch = {"spec": {"template": {"metadata": {"annotations": enabled()}}}}
    cluster.kubectl("patch", "deployment", "shop", "-p", json.dumps(patch))
    cluster.kubectl("rollout", "status", "deployment/shop", "--timeout=90s", timeout=120)
    pods = [p for p in cluster.get("pods", "-l", "app=shop")["items"] if not p["metadata"].get("deletionTimestamp")]
    (second,) = [p["metadata"]["name"] for p in pods if p["metadata"]["name"] != first]
    wait_running(cluster, second)
    assert outbound_goes_to_proxy(node, second, procs, free_port())
    cluster.kubectl("delete", "deployment", "shop", "--wait=false")


def test_the_agents_capabilities_let_it_hear_nftables_transactions(cluster, admin, installed):
    """With the DaemonSet's capabilities (NET_BROADCAST among them), repair listens for nftables transactions
    instead of entering every pod: the agent proved delivery at start, in its container (without NET_BROADCAST
    it logged EPERM and read every pod). What it does with them on real pods: tests/e2e/test_lifecycle.py.
    The minimal overlay (the kubectl path here) has no capability and no repair: it listens for nothing."""
    (agent,) = agent_pods(cluster)
    # The kubelet's log files (kubectl logs would dial the node by a name that does not resolve here).
    uid = agent["metadata"]["uid"]
    logs = "".join(p.read_text() for p in (cluster.workdir / "pod-logs").glob(f"*_{uid}/install/*.log"))
    assert "agent started" in logs, "the agent's own log was read"
    if admin.via == "in-process":
        assert "nftables" not in logs, "the minimal install runs no repair"
    else:
        assert "repair hears nftables transactions" in logs, logs[-3000:]


def test_deleting_the_agent_pod_keeps_the_entry_and_the_capture(cluster, installed, procs):
    """`kubectl delete pod`: the DaemonSet controller makes a new one; the entry stays in every sample read, pods
    captured before stay captured, pods after are captured."""
    node = installed["node"]
    apply(cluster, app_pod("before-restart", enabled()))
    wait_running(cluster, "before-restart")
    (old,) = agent_pods(cluster)
    sampler = Sampler(lambda: node.entry() is not None)
    cluster.kubectl("delete", "pod", "-n", NAMESPACE, old["metadata"]["name"], "--wait=true", timeout=120)
    new = wait_until(lambda: [p for p in agent_pods(cluster) if is_ready(p)], 120, "a new Ready agent pod")
    samples, misses = sampler.end()
    assert new[0]["metadata"]["name"] != old["metadata"]["name"]
    assert samples > 100 and misses == 0, (samples, misses)
    assert outbound_goes_to_proxy(node, "before-restart", procs, free_port())
    apply(cluster, app_pod("after-restart", enabled()))
    wait_running(cluster, "after-restart")
    assert outbound_goes_to_proxy(node, "after-restart", procs, free_port())


def test_a_rollout_with_max_surge_keeps_every_new_pod_captured(cluster, admin, installed, procs):
    """A new image tag (`kubectl set image`, `helm upgrade`): the real DaemonSet controller surges (maxSurge 1):
    the new agent pod runs beside the old one until Ready, then the old one goes. Pods created all along are
    captured, and our entry is in every sample read of the conf dir."""
    node = installed["node"]
    (old,) = agent_pods(cluster)
    sampler = Sampler(lambda: node.entry() is not None)
    tag = "0.1.0" if agent_image_tag(cluster) == "0.1.1" else "0.1.1"  # the same bytes under the other tag
    admin.set_image(tag)
    both_seen, names = False, list[str]()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        pods = agent_pods(cluster)
        both_seen = both_seen or len(pods) == 2
        name = f"during-rollout-{len(names)}"
        apply(cluster, app_pod(name, enabled()))
        names.append(name)
        if len(pods) == 1 and pods[0]["metadata"]["name"] != old["metadata"]["name"] and is_ready(pods[0]):
            break
        time.sleep(1)
    wait_rollout(cluster)
    samples, misses = sampler.end()
    (new,) = agent_pods(cluster)
    assert new["spec"]["containers"][0]["image"] == f"{IMAGE}:{tag}" and is_ready(new)
    assert both_seen, "maxSurge: the new agent pod ran beside the old one"
    assert samples > 100 and misses == 0, (samples, misses)
    for name in names:
        wait_running(cluster, name)
        assert node.has_table(name), name
    assert outbound_goes_to_proxy(node, names[-1], procs, free_port())
    print(f"\n[{admin.name}] rollout: {len(names)} pods created during it, all captured")
    cluster.kubectl("delete", "pod", *names, "--wait=false")


def test_an_image_that_cannot_start_never_becomes_ready_and_the_old_agent_keeps_the_node(
    cluster, admin, installed, procs
):
    node = installed["node"]
    (old,) = agent_pods(cluster)
    admin.set_image(BROKEN_TAG)
    new = wait_until(
        lambda: [p for p in agent_pods(cluster) if p["metadata"]["name"] != old["metadata"]["name"]],
        60,
        "the surge pod of the broken image",
    )[0]
    time.sleep(20)  # the kubelet tries, fails, backs off
    pods = {p["metadata"]["name"]: p for p in agent_pods(cluster)}
    assert old["metadata"]["name"] in pods and is_ready(pods[old["metadata"]["name"]])
    assert new["metadata"]["name"] in pods and not is_ready(pods[new["metadata"]["name"]])
    waiting = pods[new["metadata"]["name"]]["status"]["containerStatuses"][0]["state"]
    print(f"\n[{admin.name}] the broken image's pod: {waiting}")
    apply(cluster, app_pod("during-broken", enabled()))
    wait_running(cluster, "during-broken")
    assert outbound_goes_to_proxy(node, "during-broken", procs, free_port())
    admin.undo()
    assert [p["metadata"]["name"] for p in agent_pods(cluster)] == [old["metadata"]["name"]]


def test_the_uninstall_restores_the_conf_dir_byte_for_byte(cluster, admin, installed):
    """docs/operations.md's uninstall: the uninstall DaemonSet is Ready once nothing of ours is left on the node;
    then nothing of ours is in the cluster either. Pods captured before keep running."""
    node = installed["node"]
    runtime = cluster.runtime

    def check() -> None:
        now = {p.relative_to(runtime.conf_dir): p.read_bytes() for p in runtime.conf_dir.rglob("*") if p.is_file()}
        assert now == installed["original"], sorted(map(str, set(now) ^ set(installed["original"])))
        ours = [p.name for p in runtime.bin_dir.iterdir() if p.name.startswith(("cni-redirect", ".cni-redirect"))]
        assert ours == []

    apply(cluster, app_pod("before-uninstall", enabled()))
    wait_running(cluster, "before-uninstall")
    admin.uninstall(check, agentless=lambda: check_entry_stays(cluster))
    assert cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0
    assert not cluster.get("clusterroles", "-l", "app.kubernetes.io/name=cni-redirect")["items"]
    apply(cluster, app_pod("after-uninstall", enabled()))
    wait_running(cluster, "after-uninstall")
    assert not node.has_table("after-uninstall")
    assert pod_phase(cluster, "before-uninstall") == "Running"
