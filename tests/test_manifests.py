"""The DaemonSet install: valid against the Kubernetes schemas offline, least privilege, overlays fit."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cni_redirect.installer import load_entry

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
    assert host_paths == {"cni-bin": "/opt/cni/bin", "cni-conf": "/etc/cni/net.d"}


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


def _merge_volumes(target: dict, patch: dict) -> dict:
    """The strategic merge kustomize does for these patches: volumes merge by name."""
    merged = copy.deepcopy(target)
    volumes = {v["name"]: v for v in merged["spec"]["template"]["spec"]["volumes"]}
    for volume in patch["spec"]["template"]["spec"]["volumes"]:
        assert volume["name"] in volumes, f"patch names a volume the DaemonSet lacks: {volume['name']}"
        volumes[volume["name"]].update(volume)
    return merged


@pytest.mark.parametrize("overlay", sorted(p.name for p in (K8S / "overlays").iterdir()))
def test_overlays_patch_only_host_paths_and_stay_valid(overlay):
    directory = K8S / "overlays" / overlay
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../.."]
    for entry in kustomization["patches"]:
        (patch,) = documents(directory / entry["path"])
        assert (patch["kind"], patch["metadata"]["name"]) == ("DaemonSet", daemonset()["metadata"]["name"])
        merged = _merge_volumes(daemonset(), patch)
        kubernetes_validate.validate(merged, KUBERNETES_VERSIONS[-1], strict=True)
        paths = {
            v["name"]: v["hostPath"]["path"] for v in merged["spec"]["template"]["spec"]["volumes"] if "hostPath" in v
        }
        assert paths != {"cni-bin": "/opt/cni/bin", "cni-conf": "/etc/cni/net.d"}
