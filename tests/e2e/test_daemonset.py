"""The image and the DaemonSet really run: the image built here, the DaemonSet's pod run on containerd as kubelet
would (its securityContext, volumes, probes, seccomp RuntimeDefault), for the base and the minimal overlay.

The commands are docs/install.md's "Installing on a cluster": `install/build-image.sh TAG`, then what
`kubectl apply -k DIR` applies, rendered by `kubectl kustomize DIR`; only the registry push is left out
(the image is imported into containerd instead).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cni_redirect.cri import pb
from cni_redirect.node.chaining.confdir import read_conf_dir
from cni_redirect.testing.containerd import GATEWAY, VERSIONS, Containerd
from cni_redirect.testing.netlab import HOST, Netns, connect, enabled, sh
from tests.e2e.conftest import running_containerd
from tests.e2e.kubelet import check, poll, translate, unmount_prepared
from tests.support import Sampler

REPO = Path(__file__).resolve().parents[2]
GLIBC_AND_ZLIB = r"^(ld-linux.*|libc|libm|libdl|libpthread|librt|libz)\.so(\.\d+)*$"
TAG = "localhost/cni-redirect:0.1.0"
KUBECTL = Path(sys.executable).parent / "kubectl"


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def node(host_snapshot, agent_image, request):
    """A containerd whose pod netns live under /var/run/netns, as on a node, with the image imported."""
    sh("ip", "netns", "add", f"cnir-shared-{os.getpid()}")  # iproute2 makes /run/netns a shared mount, as on a node
    sh("ip", "netns", "delete", f"cnir-shared-{os.getpid()}")

    def import_image(runtime: Containerd) -> None:
        ctr = ["ctr", "-a", str(runtime.socket), "-n", "k8s.io", "images"]
        subprocess.run([*ctr, "import", str(agent_image)], check=True, capture_output=True)
        subprocess.run([*ctr, "tag", TAG, "docker.io/library/cni-redirect:0.1.0"], check=True, capture_output=True)

    yield from running_containerd(
        host_snapshot, import_image, with_plugin=False, node_netns=True, version=request.param
    )


def rendered(directory: Path) -> dict[str, dict]:
    out = subprocess.run([str(KUBECTL), "kustomize", str(directory)], capture_output=True, text=True, check=True)
    return {doc["kind"]: doc for doc in yaml.safe_load_all(out.stdout) if doc}


def run_daemonset_pod(client, docs: dict, tmp_path: Path):
    runtime = client.runtime
    tmp_path.mkdir(parents=True, exist_ok=True)
    node_paths = {
        "/opt/cni/bin": runtime.bin_dir,
        "/etc/cni/net.d": runtime.conf_dir,
        "/run/containerd/containerd.sock": runtime.socket,
        # /var/run is /run here. containerd checks a HostToContainer source's propagation without resolving
        # that link; on a systemd node "/" is shared and either spelling passes, on this VM "/" is private and
        # only /run/netns (made shared by iproute2, as on any node) does.
        "/var/run/netns": Path("/run/netns"),
    }
    configmaps = {docs["ConfigMap"]["metadata"]["name"]: docs["ConfigMap"]} if "ConfigMap" in docs else {}
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
        check_the_pod_does_its_job(client, run, container_id, overlay, conflist, log_file, procs, tmp_path)
        stop = pb.StopContainerRequest(container_id=container_id, timeout=run.grace_seconds)
        client.stub.StopContainer(stop, timeout=90)  # SIGTERM, as kubelet sends it: a stop is never an uninstall
        status = client.stub.ContainerStatus(pb.ContainerStatusRequest(container_id=container_id), timeout=30).status
        assert status.exit_code == 0, container_log(run, tmp_path)
        assert _entry_in(conflist), "stopping the container kept our entry"
        assert os.access(runtime.bin_dir / "cni-redirect", os.X_OK), "and the plugin"
    finally:
        remove_daemonset_pod(client, run, sandbox_id, container_id)
    uninstall_the_node(client, conflist, original, tmp_path)
    log_file.unlink(missing_ok=True)


def uninstall_the_node(client, conflist: Path, original: bytes, tmp_path: Path) -> None:
    """The README's uninstall: install/kubernetes/uninstall's pod, Ready once nothing of ours is left."""
    runtime = client.runtime
    docs = rendered(REPO / "install" / "kubernetes" / "uninstall")
    workdir = tmp_path / "uninstall"
    workdir.mkdir()
    run, sandbox_id, container_id = run_daemonset_pod(client, docs, workdir)
    try:
        assert poll(run.readiness, timeout=60, client=client, container_id=container_id) == 200, container_log(
            run, workdir
        )
        assert conflist.read_bytes() == original, "uninstall restored the conflist byte for byte"
        ours = [p.name for p in runtime.bin_dir.iterdir() if p.name.startswith(("cni-redirect", ".cni-redirect"))]
        assert ours == [], "uninstall left plugin files in the bin dir"
    finally:
        remove_daemonset_pod(client, run, sandbox_id, container_id)


def remove_daemonset_pod(client, run, sandbox_id: str, container_id: str) -> None:
    client.stub.StopContainer(pb.StopContainerRequest(container_id=container_id, timeout=run.grace_seconds), timeout=90)
    client.stub.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id), timeout=60)
    client.stop_pod(sandbox_id)
    client.remove_pod(sandbox_id)
    unmount_prepared(run)


def _entry_in(conflist: Path) -> bool:
    """Our entry reaches the runtime: inlined in the conflist (edit mode) or as its drop-in (containerd 2.4)."""
    return read_conf_dir(conflist.parent).entry() is not None


def _captured(client, pod: str) -> bool:
    return "table inet cni_redirect" in Netns.at(client.netns(pod)).ruleset()


def test_a_surge_to_an_agent_that_is_slow_then_fails_keeps_the_node_captured(node, tmp_path):
    """maxSurge: the new pod starts beside the old one. Its agent is slow to install (the bundle install lock
    is held, as a slow disk would hold it) and then fails (its plugin source is missing). Its exec readiness
    probe fails all along, so kubelet never deletes the old pod; the old agent keeps the node: entry in every
    sample, and pods started meanwhile are captured through the old agent's socket."""
    import fcntl

    client = node
    runtime = client.runtime
    docs = rendered(REPO / "install" / "kubernetes")
    (conflist,) = runtime.conf_dir.glob("*.conflist")
    original = conflist.read_bytes()
    log_file = Path(json.loads(docs["ConfigMap"]["data"]["entry.json"])["log_file"])
    old_run, old_sandbox, old_container = run_daemonset_pod(client, docs, tmp_path / "old")
    new = None
    try:
        assert poll(old_run.readiness, timeout=90, client=client, container_id=old_container) == 200
        captured_pod(client, "before-surge")  # containerd has loaded the entry
        failing = rendered(REPO / "install" / "kubernetes")
        (container,) = failing["DaemonSet"]["spec"]["template"]["spec"]["containers"]
        for variable in container["env"]:
            if variable["name"] == "PLUGIN_SOURCE":
                variable["value"] = "/opt/cni-redirect/missing-in-this-version"
        entry = Sampler(lambda: _entry_in(conflist))
        lock = os.open(runtime.bin_dir / ".cni-redirect-agents" / "install.lock", os.O_RDWR)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            new = run_daemonset_pod(client, failing, tmp_path / "new")
            new_run, _, new_container = new
            slow_checks = []
            for _ in range(4):  # the new agent is stuck installing: never Ready; the old one is
                slow_checks.append(
                    (check(new_run.readiness, client, new_container), check(old_run.readiness, client, old_container))
                )
                time.sleep(1)
            assert slow_checks == [(False, True)] * 4, slow_checks
            during = client.run_pod("during-surge", annotations=enabled())
            assert _captured(client, during)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = client.stub.ContainerStatus(pb.ContainerStatusRequest(container_id=new_container), timeout=30)
            if status.status.state == pb.CONTAINER_EXITED:
                break
            assert not check(new_run.readiness, client, new_container), "the failing agent was never Ready"
            time.sleep(0.5)
        assert status.status.exit_code == 1, container_log(new_run, tmp_path / "new")
        assert "cannot start: nothing taken over" in container_log(new_run, tmp_path / "new")
        assert check(old_run.readiness, client, old_container) and check(old_run.liveness, client, old_container)
        after = client.run_pod("after-failed-surge", annotations=enabled())
        assert _captured(client, after)
        samples, failures = entry.end()
        print(f"\n[daemonset:surge] entry present in {samples - failures}/{samples} samples")
        assert failures == 0 and samples > 100
        events = [json.loads(line) for line in log_file.read_text().splitlines()]
        vias = {
            e["via"]
            for e in events
            if e["command"] == "ADD" and any(pod.startswith(e["container_id"]) for pod in (during, after))
        }
        assert vias == {"cni-server"}, "both pods were served warm by the old agent: its socket was never taken"
        for pod in (during, after):
            client.stop_pod(pod)
            client.remove_pod(pod)
    finally:
        if new is not None:
            remove_daemonset_pod(client, *new)
        remove_daemonset_pod(client, old_run, old_sandbox, old_container)
    uninstall_the_node(client, conflist, original, tmp_path)
    log_file.unlink(missing_ok=True)


def test_a_container_restart_while_pods_start_keeps_the_entry_and_captures_every_pod(node, tmp_path):
    """kubelet restarts the agent's container (a liveness failure, an OOM kill): SIGTERM, then a new container in
    the same pod. Pods keep being created all along: the entry is in every sample, and every pod is captured
    (warm through the agent, in-process while none runs)."""
    import threading

    client = node
    runtime = client.runtime
    docs = rendered(REPO / "install" / "kubernetes")
    (conflist,) = runtime.conf_dir.glob("*.conflist")
    original = conflist.read_bytes()
    log_file = Path(json.loads(docs["ConfigMap"]["data"]["entry.json"])["log_file"])
    run, sandbox_id, container_id = run_daemonset_pod(client, docs, tmp_path)
    pods: list[tuple[str, bool]] = []
    try:
        assert poll(run.readiness, timeout=90, client=client, container_id=container_id) == 200
        captured_pod(client, "before-restart")
        entry = Sampler(lambda: _entry_in(conflist))
        stop = threading.Event()

        def create_pods() -> None:
            while not stop.is_set():
                pod = client.run_pod(f"restart-{len(pods)}", annotations=enabled())
                pods.append((pod, _captured(client, pod)))

        creator = threading.Thread(target=create_pods, daemon=True)
        creator.start()
        time.sleep(2)
        client.stub.StopContainer(pb.StopContainerRequest(container_id=container_id, timeout=30), timeout=90)
        client.stub.RemoveContainer(pb.RemoveContainerRequest(container_id=container_id), timeout=60)
        request = pb.CreateContainerRequest(pod_sandbox_id=sandbox_id, config=run.container, sandbox_config=run.sandbox)
        container_id = client.stub.CreateContainer(request, timeout=60).container_id
        client.stub.StartContainer(pb.StartContainerRequest(container_id=container_id), timeout=60)
        assert poll(run.readiness, timeout=90, client=client, container_id=container_id) == 200
        time.sleep(2)
        stop.set()
        creator.join(timeout=60)
        samples, failures = entry.end()
        uncaptured = [pod for pod, captured in pods if not captured]
        events = [json.loads(line) for line in log_file.read_text().splitlines()]
        vias = [
            e["via"] for e in events if e["command"] == "ADD" and any(p.startswith(e["container_id"]) for p, _ in pods)
        ]
        print(
            f"\n[daemonset:restart] {len(pods)} pods, {len(uncaptured)} uncaptured; via: "
            f"{ {v: vias.count(v) for v in set(vias)} }; entry in {samples - failures}/{samples} samples"
        )
        assert failures == 0 and samples > 100, "the entry was gone during the restart"
        assert len(pods) >= 5 and uncaptured == []
    finally:
        for pod, _ in pods:
            client.stop_pod(pod)
            client.remove_pod(pod)
        remove_daemonset_pod(client, run, sandbox_id, container_id)
    uninstall_the_node(client, conflist, original, tmp_path)
    log_file.unlink(missing_ok=True)


def check_the_pod_does_its_job(
    client, run, container_id: str, overlay: str, conflist: Path, log_file: Path, procs, tmp_path
) -> None:
    start = time.monotonic()
    assert poll(run.readiness, timeout=90, client=client, container_id=container_id) == 200, container_log(
        run, tmp_path
    )
    print(f"\n[daemonset:{overlay}] ready {time.monotonic() - start:.1f} s after StartContainer")
    assert poll(run.liveness, timeout=10, client=client, container_id=container_id) == 200
    entry = read_conf_dir(conflist.parent).entry()
    assert entry is not None and entry["type"] == "cni-redirect"
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
