"""A private containerd driven over CRI.

Everything containerd owns lives under one temp dir: root, state, sockets,
runc root, CNI bin and conf dirs, host-local's leases. What containerd 1.6
writes elsewhere regardless (libcni's result cache, shim sockets, cgroup
dirs, the bridge link, ip_forward) is left to `host.HostSnapshot`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..cri import CriClient, sandbox_netns
from .images import build_pause_image
from .netlab import PLUGIN

PAUSE_IMAGE = "localhost/cnir-pause:e2e"
NETWORK = "cnir-e2e"
BRIDGE = "cnir-e2e0"
SUBNET = "10.99.0.0/24"
GATEWAY = "10.99.0.1"
CGROUP_PARENT = "cnir-e2e"


def mounts_under(prefix: str) -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            point = line.split()[4]
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return points


def conflist(
    workdir: Path, with_plugin: bool = True, cni_version: str = "1.0.0", subnet: str = SUBNET, gateway: str = GATEWAY,
    **entry: object,
) -> dict:  # fmt: skip
    plugins: list[dict] = [
        {
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": subnet, "gateway": gateway}]],
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": str(workdir / "ipam"),
            },
        },
        {"type": "portmap", "capabilities": {"portMappings": True}},
    ]
    if with_plugin:
        plugins.append(
            {
                "type": "cni-redirect",
                "capabilities": {"io.kubernetes.cri.pod-annotations": True},
                "log_file": str(workdir / "cni-redirect.log"),
                **entry,
            }
        )
    return {"cniVersion": cni_version, "name": NETWORK, "plugins": plugins}


CONTAINERD_CONFIG = """\
version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd-ttrpc.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{image}"
  netns_mounts_under_state_dir = {netns_private}
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni-bin"
    conf_dir = "{d}/cni-conf"
    max_conf_num = 1
"""


# containerd 2.x: config version 3 (the CRI plugin split into io.containerd.cri.v1.images and .runtime,
# `bin_dirs`); nothing outside the workdir: no imports, NRI off, opt under the workdir.
CONTAINERD2_CONFIG = """\
version = 3
root = "{d}/root"
state = "{d}/state"
imports = []

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd-ttrpc.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{image}"

[plugins."io.containerd.cri.v1.runtime"]
  netns_mounts_under_state_dir = {netns_private}
  restrict_oom_score_adj = true
  disable_apparmor = true
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{d}/cni-bin"]
    conf_dir = "{d}/cni-conf"
    max_conf_num = 1
"""

#: The containerd versions every containerd tier runs against: Debian 12's, and the current one built from source.
VERSIONS = ("1.6", "2.4")


@dataclass
class Containerd:
    """A containerd we started, its CRI client, and the pods we made with it."""

    workdir: Path
    with_plugin: bool = True  # False: a node before cni-redirect is installed
    node_netns: bool = False  # True: pod netns under /var/run/netns, as on a real node (the DaemonSet tier)
    version: str = "1.6"  # "1.6": Debian's containerd and CNI plugins; "2.4": built by scripts/peers.sh
    subnet: str = SUBNET  # the pods' addresses (host-local) and their gateway, the bridge's
    gateway: str = GATEWAY
    enter: tuple[str, ...] = ()  # a command prefix: the namespaces containerd runs in (a node of `nodes.NodeFleet`)
    process: subprocess.Popen | None = None
    pods: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.workdir / "containerd.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "cni-redirect.log"

    @property
    def bin_dir(self) -> Path:
        return self.workdir / "cni-bin"

    @property
    def conf_dir(self) -> Path:
        return self.workdir / "cni-conf"

    def events(self, pod_id: str | None = None) -> list[dict]:
        """What our plugin logged, optionally for one sandbox."""
        lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
        found = [json.loads(line) for line in lines]
        if pod_id is None:
            return found
        return [e for e in found if pod_id.startswith(e.get("container_id") or "-")]

    @property
    def cni_version(self) -> str:
        """The conflist's cniVersion: 1.1.0 on 2.x, where it makes containerd run STATUS through the chain."""
        return "1.1.0" if self.version == "2.4" else "1.0.0"

    def start(self) -> None:
        assert self.version in VERSIONS, f"containerd {self.version}: not one of {VERSIONS}"
        assert shutil.which("runc"), "runc is missing: run scripts/setup.sh (apt package runc)"
        env = dict(os.environ)
        if self.version == "1.6":
            binary = shutil.which("containerd")
            assert binary, "containerd is missing: run scripts/setup.sh (apt package containerd)"
            assert Path("/usr/lib/cni/bridge").exists(), "CNI plugins missing: apt package containernetworking-plugins"
            plugins = sorted(Path("/usr/lib/cni").iterdir())
            template = CONTAINERD_CONFIG
        else:
            from .peers import CNI_PLUGINS, peer

            binary = str(peer("containerd"))
            shim = peer("containerd-shim-runc-v2")
            env["PATH"] = f"{shim.parent}:{env.get('PATH', '/usr/bin:/bin')}"  # containerd finds its shim on PATH
            plugins = [peer(name) for name in CNI_PLUGINS]
            template = CONTAINERD2_CONFIG
        d = self.workdir
        bin_dir = d / "cni-bin"
        bin_dir.mkdir()
        (d / "cni-conf").mkdir()
        for plugin in plugins:
            (bin_dir / plugin.name).symlink_to(plugin)
        if self.with_plugin:
            (bin_dir / "cni-redirect").symlink_to(PLUGIN)
        self.write_conflist(self.conflist(with_plugin=self.with_plugin))
        config = d / "containerd.toml"
        netns_private = "false" if self.node_netns else "true"
        config.write_text(template.format(d=d, image=PAUSE_IMAGE, netns_private=netns_private))
        log = (d / "containerd.log").open("w")
        self.process = subprocess.Popen(
            [*self.enter, binary, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        log.close()
        self._wait_for_socket()
        tar = build_pause_image(d, PAUSE_IMAGE)
        subprocess.run(
            ["ctr", "-a", str(self.socket), "-n", "k8s.io", "images", "import", str(tar)],
            check=True,
            capture_output=True,
        )

    def _wait_for_socket(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited: {(self.workdir / 'containerd.log').read_text()[-3000:]}")
            if self.socket.exists():
                return
            time.sleep(0.05)
        raise RuntimeError("containerd did not open its socket within 30 s")

    def connect(self) -> PodClient:
        client = PodClient(self)
        client.wait_ready()
        client.wait_network_ready()
        return client

    def conflist(self, with_plugin: bool = True, **entry: object) -> dict:
        """The tier's conflist for this runtime (its cniVersion), with our entry's settings."""
        return conflist(self.workdir, with_plugin, self.cni_version, self.subnet, self.gateway, **entry)

    def write_conflist(self, document: dict) -> None:
        """Replace the one conflist atomically; containerd reloads it live."""
        target = self.workdir / "cni-conf" / "10-cnir-e2e.conflist"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(document, indent=2))
        os.replace(tmp, target)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._kill_our_shims()
        for point in sorted(mounts_under(str(self.workdir)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)

    def _kill_our_shims(self) -> None:
        """Shims started by our containerd carry our socket path in their command line."""
        marker = str(self.workdir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and marker in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), signal.SIGKILL)


class PodClient(CriClient):
    """The CRI client, plus what kubelet does with it: run, stop and remove pods of our containerd."""

    def __init__(self, runtime: Containerd) -> None:
        super().__init__(str(runtime.socket), timeout=120)
        self.runtime = runtime
        self.configs: dict[str, object] = {}  # sandbox id -> its config, which CreateContainer needs again

    def wait_network_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.stub.Status(self.pb.StatusRequest())
            conditions = {c.type: c.status for c in status.status.conditions}
            if conditions.get("NetworkReady"):
                return
            time.sleep(0.2)
        raise RuntimeError(f"CRI network never became ready: {status}")

    def sandbox_config(
        self, name: str, namespace: str = "default", annotations: dict[str, str] | None = None, host_network=False
    ):
        linux = self.pb.LinuxPodSandboxConfig(cgroup_parent=f"/{CGROUP_PARENT}")
        if host_network:
            linux.security_context.namespace_options.network = self.pb.NODE
        return self.pb.PodSandboxConfig(
            metadata=self.pb.PodSandboxMetadata(name=name, uid=str(uuid.uuid4()), namespace=namespace),
            hostname="" if host_network else name,  # a host-network sandbox shares the node's UTS namespace
            log_directory=str(self.runtime.workdir / "pods" / name),
            annotations=annotations or {},
            linux=linux,
        )

    def run_pod(
        self, name: str, namespace: str = "default", annotations: dict[str, str] | None = None, host_network=False
    ) -> str:
        config = self.sandbox_config(name, namespace, annotations, host_network)
        response = self.stub.RunPodSandbox(self.pb.RunPodSandboxRequest(config=config), timeout=120)
        self.runtime.pods.append(response.pod_sandbox_id)
        self.configs[response.pod_sandbox_id] = config
        return response.pod_sandbox_id

    def start_container(self, pod_id: str, name: str, image: str = PAUSE_IMAGE) -> str:
        """A container in the sandbox, running the (pause) image: what an app container is to us."""
        config = self.pb.ContainerConfig(metadata=self.pb.ContainerMetadata(name=name), log_path=f"{name}.log")
        config.image.image = image
        request = self.pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=config, sandbox_config=self.configs[pod_id]
        )
        container_id = self.stub.CreateContainer(request, timeout=60).container_id
        self.stub.StartContainer(self.pb.StartContainerRequest(container_id=container_id), timeout=60)
        return container_id

    def netns(self, pod_id: str) -> str:
        path = sandbox_netns(self.sandbox_status(pod_id))
        assert path, f"sandbox {pod_id} has no network namespace"
        return path

    def pod_ip(self, pod_id: str) -> str:
        return self.sandbox_status(pod_id).status.network.ip

    def stop_pod(self, pod_id: str) -> None:
        self.stub.StopPodSandbox(self.pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)

    def remove_pod(self, pod_id: str) -> None:
        self.stub.RemovePodSandbox(self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        if pod_id in self.runtime.pods:
            self.runtime.pods.remove(pod_id)

    def wait_for_reload(self, expect_plugin: bool, timeout: float = 20) -> None:
        """containerd reloads its conflist asynchronously: probe with throwaway pods until it took effect."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pod = self.run_pod(f"probe-{time.monotonic_ns()}")
            ran = bool(self.runtime.events(pod))
            self.stop_pod(pod)
            self.remove_pod(pod)
            if ran == expect_plugin:
                return
            time.sleep(0.5)
        raise AssertionError(f"containerd did not reload its conflist (expecting plugin={expect_plugin})")

    def remove_all(self) -> None:
        for pod in self.list_sandboxes():
            self.stop_pod(pod.id)
            self.remove_pod(pod.id)


def new_workdir() -> Path:
    # Short path: unix socket paths are limited to 108 bytes.
    return Path(tempfile.mkdtemp(prefix="cnir-e2e-", dir="/tmp"))
