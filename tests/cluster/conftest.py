"""The cluster tier: a real Kubernetes (kine, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet) on
our private containerd 2.4, driven the way an admin drives one: the real kubectl and helm. Nothing here skips: a
missing binary fails, naming `scripts/setup.sh`.

The node registers with the new-node taint; the agent's image and the app pods' image (the pause image) are
imported into containerd beforehand (no registry here). Host paths in the manifests are the test node's own
(its CNI dirs and CRI socket under the temp dir), set the way an admin sets them for a platform: a kustomize
patch, or the chart's values.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from cni_redirect.cri import CriClient, sandbox_netns
from cni_redirect.node.confdir import read_conf_dir
from cni_redirect.node.nodetaint import DEFAULT_TAINT
from cni_redirect.testing.cluster import NODE, Cluster
from cni_redirect.testing.containerd import GATEWAY, PAUSE_IMAGE, Containerd
from cni_redirect.testing.host import tear_down
from cni_redirect.testing.images import build_pause_image
from cni_redirect.testing.netlab import HOST, Netns, connect, sh
from cni_redirect.testing.peers import peer

REPO = Path(__file__).resolve().parents[2]
#: Image names as the manifests and the chart write them (no registry: docker.io/library/ is what they mean).
IMAGE = "docker.io/library/cni-redirect"
BROKEN_TAG = "0.0.0-broken"
CHART = REPO / "install" / "helm" / "cni-redirect"
HELM_HOME = Path(tempfile.mkdtemp(prefix="cnir-helm-home-"))  # helm's caches and config: the run's own, not HOME's
atexit.register(shutil.rmtree, HELM_HOME, True)
LOG_FILE = Path(
    "/var/log/cni-redirect/cni-redirect.log"
)  # the shipped entry's log_file  # an image without our executable: its pod can never start


@pytest.fixture(scope="module")
def cluster(host_snapshot, agent_image):
    """A fresh single-node cluster per module; torn down and the host checked afterwards."""
    yield from running_cluster(host_snapshot, agent_image)


def running_cluster(host_snapshot, agent_image, runtime_version: str = "2.4"):
    """A node that has just joined (registered with the new-node taint), its images imported; torn down and the
    host checked afterwards."""
    sh("ip", "netns", "add", f"cnir-shared-{os.getpid()}")  # iproute2 makes /run/netns a shared mount, as on a node
    sh("ip", "netns", "delete", f"cnir-shared-{os.getpid()}")
    workdir = Path(tempfile.mkdtemp(prefix="cnir-k8s-", dir="/tmp"))
    node = Cluster(workdir, taints=(f"{DEFAULT_TAINT}=true:NoSchedule",), runtime_version=runtime_version)

    def import_images(runtime: Containerd) -> None:
        ctr = ["ctr", "-a", str(runtime.socket), "-n", "k8s.io", "images"]
        subprocess.run([*ctr, "import", str(agent_image)], check=True, capture_output=True)
        for tag in ("0.1.0", "0.1.1"):  # 0.1.1: the same bytes under a new tag, for a rollout
            subprocess.run(
                [*ctr, "tag", "localhost/cni-redirect:0.1.0", f"{IMAGE}:{tag}"], check=True, capture_output=True
            )
        broken = build_pause_image(workdir, f"{IMAGE}:{BROKEN_TAG}")
        subprocess.run([*ctr, "import", str(broken)], check=True, capture_output=True)

    start = time.monotonic()
    try:
        node.start(import_images)
        node.wait_node_ready()
        wait_until(lambda: node.kubectl("get", "serviceaccount", "default", check=False).returncode == 0, 60,
                   "the default service account")  # fmt: skip
        wait_until(lambda: not kubernetes_taints(node), 60, "the node lifecycle controller's taints to go")
        print(f"\n[cluster] API server, controllers, scheduler and kubelet up in {time.monotonic() - start:.1f} s")
        yield node
    finally:
        tear_down(node, host_snapshot, workdir)


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The real helm (built by scripts/setup.sh); fails loudly when it is missing."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(HELM_HOME)}
    run = subprocess.run([str(peer("helm")), *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert run.returncode == 0, f"helm {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run


def node_taints(cluster: Cluster) -> list[str]:
    return [t["key"] for t in cluster.get("node", NODE)["spec"].get("taints") or []]


def kubernetes_taints(cluster: Cluster) -> list[str]:
    """The node's taints set by Kubernetes itself (not-ready, unreachable, ...) while the node settles."""
    return [key for key in node_taints(cluster) if key.startswith("node.kubernetes.io/")]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def app_pod(name: str, annotations: dict[str, str] | None = None, **spec: object) -> dict:
    """An app pod: one container of the pause image (imported, never pulled)."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": annotations or {}},
        "spec": {
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": PAUSE_IMAGE, "imagePullPolicy": "Never"}],
            **spec,
        },
    }


def apply(cluster: Cluster, *documents: dict) -> None:
    cluster.kubectl("apply", "-f", "-", input="\n---\n".join(json.dumps(d) for d in documents))


def pod_phase(cluster: Cluster, name: str, namespace: str = "default") -> str:
    return cluster.get("pod", "-n", namespace, name)["status"].get("phase", "")


def wait_running(cluster: Cluster, name: str, namespace: str = "default", timeout: float = 90) -> None:
    wait_until(lambda: pod_phase(cluster, name, namespace) == "Running", timeout, f"pod {namespace}/{name} Running")


@dataclass
class NodeView:
    """The node's side of the cluster: its CRI, its CNI conf dir."""

    cluster: Cluster

    @property
    def runtime(self) -> Containerd:
        assert self.cluster.runtime is not None
        return self.cluster.runtime

    def sandbox(self, name: str, namespace: str = "default"):
        """The pod's ready sandbox on the node and its CRI status (the netns path is in it)."""
        client = CriClient(str(self.runtime.socket), timeout=30)
        try:
            for sandbox in client.list_sandboxes(ready_only=True):
                if (sandbox.metadata.name, sandbox.metadata.namespace) == (name, namespace):
                    return sandbox, client.sandbox_status(sandbox.id)
        finally:
            client.close()
        raise AssertionError(f"pod {namespace}/{name}: no ready sandbox on the node")

    def netns(self, name: str, namespace: str = "default") -> Netns:
        path = sandbox_netns(self.sandbox(name, namespace)[1])
        assert path, f"pod {namespace}/{name}: its sandbox has no netns"
        return Netns.at(path)

    def has_table(self, name: str) -> bool:
        return "table inet cni_redirect" in self.netns(name).ruleset()

    def entry(self) -> dict | None:
        return read_conf_dir(self.runtime.conf_dir).entry()

    def events(self, name: str, namespace: str = "default") -> list[dict]:
        """What our plugin logged (the entry's log_file, on the node) for the pod's ready sandbox."""
        sandbox, _status = self.sandbox(name, namespace)
        lines = LOG_FILE.read_text().splitlines() if LOG_FILE.exists() else []
        found = [json.loads(line) for line in lines]
        return [e for e in found if sandbox.id.startswith(e.get("container_id") or "-")]


def outbound_goes_to_proxy(node: NodeView, pod: str, procs, port: int) -> bool:
    """Real TCP from the pod (uid 1000) to a peer on the node: True when the pod's proxy port (15001, uid 1337)
    accepted it with the peer as its original destination, False when the peer itself answered."""
    netns = node.netns(pod)
    procs.listen(netns, "proxy-out", 15001, uid=1337)
    procs.listen(HOST, "node-peer", port, bind=GATEWAY)
    answer = connect(netns, GATEWAY, port, uid=1000)
    procs.stop()
    if answer.get("listener") == "proxy-out":
        assert answer["original_dst"] == f"{GATEWAY}:{port}", answer
        return True
    assert answer.get("listener") == "node-peer", answer
    return False
