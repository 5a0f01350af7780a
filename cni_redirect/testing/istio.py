"""The real istio-cni plugin, run as a chained plugin against a small fake Kubernetes API.

istio-cni (sidecar mode) builds a Kubernetes client from the kubeconfig in its
`cni_agent_run_dir`, GETs the pod it is called for, and programs the pod netns
from the pod's annotations, its `istio-proxy` container (args, env, security
context) and its containers' names. `FakeKube` answers that one GET with the
pod as Istio's injector writes it; `run_istio_cni` calls the plugin as a
runtime would, with the same prevResult our plugin gets.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from .netlab import prev_result
from .peers import peer

PROXY_UID = 1337


def injected_pod(
    name: str,
    namespace: str,
    annotations: dict[str, str],
    proxy_env: dict[str, str] | None = None,
    proxy_user: tuple[int, int] = (PROXY_UID, PROXY_UID),
) -> dict:
    """The pod object Istio's injector produces in CNI mode: an app, the istio-proxy sidecar running as
    `proxy_user` (1337:1337; for interceptionMode TPROXY the injector writes 0:1337), and the istio-validation
    init container (not istio-init: with the CNI plugin there is none)."""
    uid, gid = proxy_user
    proxy = {
        "name": "istio-proxy",
        "image": "docker.io/istio/proxyv2",
        "args": ["proxy", "sidecar", "--domain", f"{namespace}.svc.cluster.local"],
        "env": [{"name": k, "value": v} for k, v in (proxy_env or {}).items()],
        "securityContext": {"runAsUser": uid, "runAsGroup": gid, "runAsNonRoot": uid != 0},
    }
    validation = {
        "name": "istio-validation",
        "image": "docker.io/istio/proxyv2",
        "args": ["istio-iptables", "--run-validation", "--skip-rule-apply"],
        "securityContext": {"runAsUser": PROXY_UID, "runAsGroup": PROXY_UID},
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "annotations": annotations},
        "spec": {"initContainers": [validation], "containers": [{"name": "app", "image": "app"}, proxy]},
        "status": {"phase": "Pending"},
    }


class FakeKube:
    """An HTTP server answering GET /api/v1/namespaces/<ns>/pods/<name> from `pods` (any other pod: a plain,
    not injected one); 404 for anything else."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict] = {}
        self.requests: list[str] = []
        pods, requests = self.pods, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                requests.append(self.path)
                parts = self.path.split("?")[0].strip("/").split("/")
                pod = None
                if len(parts) == 6 and parts[:2] == ["api", "v1"] and parts[2] == "namespaces" and parts[4] == "pods":
                    pod = pods.get((parts[3], parts[5])) or _plain_pod(parts[5], parts[3])
                body = json.dumps(pod if pod is not None else _not_found(self.path)).encode()
                self.send_response(200 if pod is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                return None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self) -> str:
        return (
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            "users:\n- name: fake\n  user:\n    token: fake-token\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _plain_pod(name: str, namespace: str) -> dict:
    """Any other pod the runtime starts (a real API server knows every pod): not injected."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "annotations": {}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }


def _not_found(path: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "NotFound",
        "code": 404,
        "message": path,
    }


@dataclass
class IstioCni:
    """istio-cni chained as Istio's installer chains it, with its run dir (kubeconfig, rolling log)."""

    run_dir: Path
    kube: FakeKube
    native_nftables: bool = False

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "istio-cni-kubeconfig").write_text(self.kube.kubeconfig())

    def config(self) -> dict:
        entry = {
            "type": "istio-cni",
            "plugin_log_level": "info",
            "cni_agent_run_dir": str(self.run_dir),
            "ambient_enabled": False,
            "exclude_namespaces": ["kube-system"],
            "pod_namespace": "istio-system",
            "native_nftables": self.native_nftables,
        }
        return {"cniVersion": "1.0.0", "name": "k8s-pod-network", **entry, "prevResult": prev_result("1.0.0")}

    def run(self, command: str, netns: str, pod: dict) -> subprocess.CompletedProcess:
        metadata = pod["metadata"]
        self.kube.pods[(metadata["namespace"], metadata["name"])] = pod
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": f"sandbox-{metadata['name']}",
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": str(peer("istio-cni").parent),
            "CNI_ARGS": (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE={metadata['namespace']};K8S_POD_NAME={metadata['name']};"
                f"K8S_POD_INFRA_CONTAINER_ID=sandbox-{metadata['name']};K8S_POD_UID={metadata['uid']}"
            ),
        }
        return subprocess.run(
            [str(peer("istio-cni"))],
            input=json.dumps(self.config()).encode(),
            env={**env, "HOME": os.environ.get("HOME", "/root")},
            capture_output=True,
            timeout=60,
        )


def validation_args(annotations: dict[str, str]) -> list[str]:
    """`pilot-agent istio-iptables` as Istio's injector writes the istio-validation init container in CNI mode,
    with the chart's defaults (injection-template.yaml): the same ports and UID as the capture."""
    excluded = ["15090", "15021", "15020"]
    extra = annotations.get("traffic.sidecar.istio.io/excludeInboundPorts", "")
    args = [
        "istio-iptables",
        "-p", "15001",
        "-z", "15006",
        "-u", str(PROXY_UID),
        "-m", annotations.get("sidecar.istio.io/interceptionMode", "REDIRECT"),
        "-i", annotations.get("traffic.sidecar.istio.io/includeOutboundIPRanges", "*"),
        "-x", annotations.get("traffic.sidecar.istio.io/excludeOutboundIPRanges", ""),
        "-b", annotations.get("traffic.sidecar.istio.io/includeInboundPorts", "*"),
        "-d", ",".join(excluded + [p for p in extra.split(",") if p and p not in excluded]),
        "--log_output_level=default:info",
        "--run-validation",
        "--skip-rule-apply",
    ]  # fmt: skip
    return args


def run_validation(netns_path: str, annotations: dict[str, str], timeout: float = 5.0) -> subprocess.CompletedProcess:
    """Istio's own validator in the pod netns, as the init container runs it: as the proxy's UID and GID."""
    argv = ["nsenter", f"--net={netns_path}", "setpriv", f"--reuid={PROXY_UID}", f"--regid={PROXY_UID}"]
    argv += ["--clear-groups", str(peer("pilot-agent")), *validation_args(annotations), f"--probe-timeout={timeout}s"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
