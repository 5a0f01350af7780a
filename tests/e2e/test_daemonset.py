"""The image and the DaemonSet really run: the image built here, the DaemonSet's pod run on containerd as kubelet
would (its securityContext, volumes, probes, seccomp RuntimeDefault), for the base and the minimal overlay.

The commands are the README's "Installing on a cluster": `install/build-image.sh TAG`, then what
`kubectl apply -k DIR` applies, rendered by `kubectl kustomize DIR`; only the registry push is left out
(the image is imported into containerd instead).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from cni_redirect.cri import pb
from cni_redirect.testing.containerd import GATEWAY, Containerd
from cni_redirect.testing.netlab import HOST, Netns, connect, enabled, sh
from tests.e2e.conftest import running_containerd
from tests.e2e.kubelet import poll, translate, unmount_prepared

REPO = Path(__file__).resolve().parents[2]
GLIBC_AND_ZLIB = r"^(ld-linux.*|libc|libm|libdl|libpthread|librt|libz)\.so(\.\d+)*$"
TAG = "localhost/cni-redirect:0.1.0"
KUBECTL = Path(sys.executable).parent / "kubectl"
IMAGE_STORE = REPO / "build" / "image-store"  # podman's storage for the image tier: cached between runs here


def _storage_env() -> dict[str, str]:
    IMAGE_STORE.mkdir(parents=True, exist_ok=True)
    conf = IMAGE_STORE / "storage.conf"
    conf.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{IMAGE_STORE}/graph"\nrunroot = "{IMAGE_STORE}/run"\n'
    )
    return {**os.environ, "CONTAINERS_STORAGE_CONF": str(conf)}


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """install/build-image.sh, exactly as the README runs it, into a podman store of the tier's own."""
    env = _storage_env()
    start = time.monotonic()
    build = subprocess.run(["install/build-image.sh", TAG], cwd=REPO, env=env, capture_output=True, text=True)
    assert build.returncode == 0, f"install/build-image.sh failed:\n{build.stdout}\n{build.stderr[-4000:]}"
    print(f"\n[image] built in {time.monotonic() - start:.0f} s: {build.stderr.strip()}")
    inspect = subprocess.run(["podman", "image", "inspect", TAG], env=env, capture_output=True, text=True, check=True)
    (info,) = json.loads(inspect.stdout)
    assert info["Config"].get("User") == "0" and info["Config"]["Entrypoint"][-1] == "install"
    files = _image_files(env)
    outside = sorted(f for f in files if not f.startswith("opt/cni-redirect/bundle/") and not f.endswith("/"))
    assert outside and all(re.match(GLIBC_AND_ZLIB, f.rsplit("/", 1)[-1]) for f in outside), outside
    assert not {"bin/sh", "usr/bin/apt", "usr/bin/dpkg"} & set(files), "no shell, no package manager"
    print(f"[image] {int(info['Size']) / 1e6:.1f} MB; outside the bundle: {outside}")
    tar = tmp_path_factory.mktemp("image") / "cni-redirect.tar"
    subprocess.run(["podman", "save", "--quiet", "-o", str(tar), TAG], env=env, check=True)
    return tar


def _image_files(env: dict[str, str]) -> set[str]:
    container = subprocess.run(["podman", "create", TAG], env=env, capture_output=True, text=True, check=True)
    cid = container.stdout.strip()
    try:
        export = subprocess.run(["podman", "export", cid], env=env, capture_output=True, check=True).stdout
    finally:
        subprocess.run(["podman", "rm", "-f", cid], env=env, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(export)) as tar:
        return {member.name + ("/" if member.isdir() else "") for member in tar.getmembers()}


@pytest.fixture(scope="module")
def node(host_snapshot, image):
    """A containerd whose pod netns live under /var/run/netns, as on a node, with the image imported."""
    sh("ip", "netns", "add", f"cnir-shared-{os.getpid()}")  # iproute2 makes /run/netns a shared mount, as on a node
    sh("ip", "netns", "delete", f"cnir-shared-{os.getpid()}")

    def import_image(runtime: Containerd) -> None:
        ctr = ["ctr", "-a", str(runtime.socket), "-n", "k8s.io", "images"]
        subprocess.run([*ctr, "import", str(image)], check=True, capture_output=True)
        subprocess.run([*ctr, "tag", TAG, "docker.io/library/cni-redirect:0.1.0"], check=True, capture_output=True)

    yield from running_containerd(host_snapshot, import_image, with_plugin=False, node_netns=True)


def rendered(directory: Path) -> dict[str, dict]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out.stdout) if doc}


def run_daemonset_pod(client, docs: dict, tmp_path: Path):
    runtime = client.runtime
    node_paths = {
        "/opt/cni/bin": runtime.bin_dir,
        "/etc/cni/net.d": runtime.conf_dir,
        "/run/containerd/containerd.sock": runtime.socket,
        # /var/run is /run here. containerd checks a HostToContainer source's propagation without resolving
        # that link; on a systemd node "/" is shared and either spelling passes, on this VM "/" is private and
        # only /run/netns (made shared by iproute2, as on any node) does.
        "/var/run/netns": Path("/run/netns"),
    }
    configmaps = {docs["ConfigMap"]["metadata"]["name"]: docs["ConfigMap"]}
    run = translate(docs["DaemonSet"]["spec"]["template"], configmaps, node_paths, tmp_path)
    sandbox_id = client.stub.RunPodSandbox(pb.RunPodSandboxRequest(config=run.sandbox), timeout=120).pod_sandbox_id
    runtime.pods.append(sandbox_id)
    request = pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=run.container, sandbox_config=run.sandbox)
    container_id = client.stub.CreateContainer(request, timeout=60).container_id
    client.stub.StartContainer(pb.StartContainerRequest(container_id=container_id), timeout=60)
    return run, sandbox_id, container_id


def captured_pod(client, label: str, timeout: float = 20.0) -> str:
    """Annotated pods until one is captured: the first after containerd reloaded its conflist."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pod = client.run_pod(f"captured-{label}-{time.monotonic_ns()}", annotations=enabled())
        if "table inet cni_redirect" in Netns.at(client.netns(pod)).ruleset():
            return pod
        client.stop_pod(pod)
        client.remove_pod(pod)
        time.sleep(0.5)
    raise AssertionError("no pod got its table: containerd never loaded the conflist with our entry")


def container_log(run, tmp_path: Path) -> str:
    path = tmp_path / "pod-logs" / "install.log"
    return path.read_text()[-3000:] if path.exists() else "(no container log)"


@pytest.mark.parametrize("overlay", ["base", "minimal"])
def test_the_daemonsets_pod_runs_on_containerd_and_does_its_job(node, overlay, procs, tmp_path):
    client = node
    runtime = client.runtime
    directory = REPO / "install" / "kubernetes" if overlay == "base" else REPO / "install/kubernetes/overlays/minimal"
    docs = rendered(directory)
    (conflist,) = runtime.conf_dir.glob("*.conflist")
    original = conflist.read_bytes()
    log_file = Path(json.loads(docs["ConfigMap"]["data"]["entry.json"])["log_file"])
    run, sandbox_id, container_id = run_daemonset_pod(client, docs, tmp_path)
    try:
        check_the_pod_does_its_job(client, run, overlay, conflist, log_file, procs, tmp_path)
        stop = pb.StopContainerRequest(container_id=container_id, timeout=run.grace_seconds)
        client.stub.StopContainer(stop, timeout=90)  # SIGTERM, as kubelet sends it: no successor, so uninstall
        status = client.stub.ContainerStatus(pb.ContainerStatusRequest(container_id=container_id), timeout=30).status
        assert status.exit_code == 0, container_log(run, tmp_path)
        assert conflist.read_bytes() == original, "stopping the container restored the conflist byte for byte"
        ours = [p.name for p in runtime.bin_dir.iterdir() if p.name.startswith(("cni-redirect", ".cni-redirect"))]
        assert ours == [], "uninstall left plugin files in the bin dir"
    finally:
        client.stub.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id), timeout=60)
        client.stop_pod(sandbox_id)
        client.remove_pod(sandbox_id)
        unmount_prepared(run)
        log_file.unlink(missing_ok=True)


def check_the_pod_does_its_job(client, run, overlay: str, conflist: Path, log_file: Path, procs, tmp_path) -> None:
    start = time.monotonic()
    assert poll(run.readiness, timeout=90) == 200, container_log(run, tmp_path)
    print(f"\n[daemonset:{overlay}] ready {time.monotonic() - start:.1f} s after StartContainer")
    assert poll(run.liveness, timeout=10) == 200
    entry = json.loads(conflist.read_text())["plugins"][-1]
    assert entry["type"] == "cni-redirect"
    assert ("agent_socket" in entry) == (overlay == "base")
    pod = captured_pod(client, overlay)  # containerd reloads the conflist asynchronously
    netns = Netns.at(client.netns(pod))
    procs.listen(netns, "proxy-out", 15001, uid=1337)
    port = 18700 if overlay == "base" else 18701
    procs.listen(HOST, "host-peer", port, bind=GATEWAY)
    answer = connect(netns, GATEWAY, port, uid=1000)
    assert (answer["listener"], answer["original_dst"]) == ("proxy-out", f"{GATEWAY}:{port}")
    events = [json.loads(line) for line in log_file.read_text().splitlines()]
    (add,) = [e for e in events if e["command"] == "ADD" and pod.startswith(e["container_id"])]
    assert add["via"] == ("cni-server" if overlay == "base" else "in-process"), add
    assert add.get("fallback") is None
    client.stop_pod(pod)
    client.remove_pod(pod)
