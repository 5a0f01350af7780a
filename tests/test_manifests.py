"""The DaemonSet install: valid against the Kubernetes schemas offline, least privilege, overlays fit."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cni_redirect.node.chain import load_entry

K8S = Path(__file__).resolve().parents[1] / "install" / "kubernetes"
KUBERNETES_VERSIONS = ["1.28.0", "1.33.0"]


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs = {}
    for resource in kustomization["resources"]:
        for doc in documents(K8S / resource):
            docs[doc["kind"]] = doc
    return docs


def daemonset() -> dict:
    return base()["DaemonSet"]


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == present


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_base_manifest_validates_strictly(version):
    for doc in base().values():
        kubernetes_validate.validate(doc, version, strict=True)


def test_least_privilege():
    docs = base()
    assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & set(docs), "the agent uses no API"
    assert docs["ServiceAccount"]["automountServiceAccountToken"] is False
    pod = daemonset()["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}, "no NET_ADMIN: the agent touches files, not networks"
    assert security["readOnlyRootFilesystem"] is True
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"cni-bin": "/opt/cni/bin", "cni-conf": "/etc/cni/net.d", "log": "/var/log/cni-redirect"}


def test_runs_on_every_node_early_and_reports_readiness():
    pod = daemonset()["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": int(env["READINESS_PORT"])}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["cni-bin"] == env["CNI_BIN_DIR"] and mounts["cni-conf"] == env["CNI_CONF_DIR"]
    assert env["ENTRY_FILE"].startswith(mounts["entry"] + "/")


def test_configmap_entry_is_valid_plugin_settings(tmp_path):
    entry = base()["ConfigMap"]["data"]["entry.json"]
    path = tmp_path / "entry.json"
    path.write_text(entry)
    ours = load_entry(path)
    assert ours["type"] == "cni-redirect"
    assert "cni-redirect" in json.loads(entry)["exclude_namespaces"]


def strategic_merge(target, patch):
    """The part of kustomize's strategic merge these patches use: maps merge, named lists merge by name."""
    if isinstance(target, dict) and isinstance(patch, dict):
        return {**target, **{k: strategic_merge(target[k], v) if k in target else v for k, v in patch.items()}}
    if isinstance(target, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in patch):
        merged = {item["name"]: item for item in target}
        for item in patch:
            merged[item["name"]] = strategic_merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return copy.deepcopy(patch)


PATH_OVERLAYS = ["gke", "k3s", "openshift"]


def overlay_daemonset(overlay: str) -> dict:
    directory = K8S / "overlays" / overlay
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../.."]
    merged = daemonset()
    for entry in kustomization["patches"]:
        (patch,) = documents(directory / entry["path"])
        assert (patch["kind"], patch["metadata"]["name"]) == ("DaemonSet", merged["metadata"]["name"])
        merged = strategic_merge(merged, patch)
    return merged


def test_every_overlay_is_tested():
    assert sorted(p.name for p in (K8S / "overlays").iterdir()) == sorted([*PATH_OVERLAYS, "agent"])


@pytest.mark.parametrize("overlay", PATH_OVERLAYS)
def test_path_overlays_patch_only_host_paths_and_stay_valid(overlay):
    merged = overlay_daemonset(overlay)
    kubernetes_validate.validate(merged, KUBERNETES_VERSIONS[-1], strict=True)
    spec = merged["spec"]["template"]["spec"]
    assert spec["containers"] == daemonset()["spec"]["template"]["spec"]["containers"]
    paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    assert paths["cni-bin"] != "/opt/cni/bin" or paths["cni-conf"] != "/etc/cni/net.d"


def test_agent_overlay_adds_exactly_what_serving_requests_needs():
    merged = overlay_daemonset("agent")
    kubernetes_validate.validate(merged, KUBERNETES_VERSIONS[-1], strict=True)
    (container,) = merged["spec"]["template"]["spec"]["containers"]
    security = container["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "SYS_ADMIN"]}
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    env = {e["name"]: e["value"] for e in container["env"]}
    socket_dir = env["AGENT_SOCKET"].rsplit("/", 1)[0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["agent-socket"] == socket_dir
    host_paths = {
        v["name"]: v["hostPath"]["path"] for v in merged["spec"]["template"]["spec"]["volumes"] if "hostPath" in v
    }
    assert host_paths["agent-socket"] == socket_dir
    assert "hostPID" not in merged["spec"]["template"]["spec"], "the netns arrives as an fd: no hostPID"
    from cni_redirect.node.daemon import check_agent_socket

    check_agent_socket(env["AGENT_SOCKET"])
