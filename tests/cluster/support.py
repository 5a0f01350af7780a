"""The cluster tier's helpers: app pods, the node's side of a cluster (its CRI, its conf dir, our log), and real
TCP through a pod's capture. The fixtures are in conftest.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cni_redirect.cri import CriClient, sandbox_netns
from cni_redirect.node.chaining.confdir import read_conf_dir
from cni_redirect.testing.cluster import Cluster, wait_until
from cni_redirect.testing.containerd import GATEWAY, PAUSE_IMAGE, Containerd
from cni_redirect.testing.netlab import HOST, Netns, connect

REPO = Path(__file__).resolve().parents[2]
LOG_FILE = Path("/var/log/cni-redirect/cni-redirect.log")  # the shipped entry's log_file


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


def agent_daemonset_exists(cluster, namespace: str = "cni-redirect") -> bool:
    """Whether the agent's DaemonSet is in the cluster (the installed state the order-free fixtures ensure)."""
    return cluster.kubectl("get", "-n", namespace, "daemonset/cni-redirect-node", check=False).returncode == 0


def agent_image_tag(cluster, namespace: str = "cni-redirect") -> str:
    """The image tag the agent's DaemonSet runs: a rollout goes to the other one."""
    found = cluster.get("daemonset", "-n", namespace, "cni-redirect-node")
    return found["spec"]["template"]["spec"]["containers"][0]["image"].rsplit(":", 1)[1]
