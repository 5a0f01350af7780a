"""Several real nodes on one machine: one control plane (`cluster.Cluster`) and, per node, a real kubelet and its own
containerd in the node's own network and mount namespaces. kind needs a pulled image, kubemark and KWOK run no CNI:
this is the recipe docs/CONTRIBUTING.md writes down.

- **Fabric**: a netns of ours with one bridge (10.98.0.1/24). The control plane runs there and listens on that
  address; kubectl and helm run there too (`Cluster.enter`). The host's netns gets no link and no address.
- **A node's network**: its own netns, a veth into the fabric bridge (10.98.0.<10+i>), the pods' bridge (the bridge
  plugin makes it inside the node's netns) with 10.100.<i>.0/24, and a route to every other node's pod subnet via
  that node: pods reach pods on other nodes unNATed, as on a routed cluster.
- **A node's mounts**: a mount namespace (private propagation) held by one `sleep` we start, where
  - the node's own dir is bind-mounted on one common path (`NodeFleet.node_dir`): the chart's values name one set
    of host paths for every node, and on each node they resolve to its own CNI dirs and CRI socket;
  - /run/netns, /run/cni-redirect and /var/lib/cni are the node's own tmpfs (shared propagation, for the agent's
    HostToContainer mount): the pods' netns mounts, the agent's socket and libcni's cache stay on the node.
  The test process reaches a node's paths through `/proc/<holder>/root` (`Node.path`).
- **A node's kubelet**: its own cgroup root (`/cnir-<node>` in every hierarchy, made here): kubelets that shared
  /kubepods would remove each other's pods as orphans. Its root dir, certificates and pod logs are the node's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .cluster import KERNEL_SYSCTLS, Cluster, kubelet_config
from .containerd import Containerd, PodClient
from .netlab import sh
from .peers import peer

FABRIC_PREFIX = "10.98.0"
API_HOST = f"{FABRIC_PREFIX}.1"
CGROUPS = Path("/sys/fs/cgroup")
#: Host dirs each node gets its own tmpfs over (the host's stay as they are).
NODE_TMPFS = ("/run/netns", "/run/cni-redirect", "/var/lib/cni")


@dataclass(frozen=True)
class CniDirs:
    """A node's CNI conf dir (every file's bytes, by relative path) and bin dir (its names)."""

    conf: dict[str, bytes]
    bins: list[str]

    @classmethod
    def read(cls, runtime: Containerd) -> CniDirs:
        conf = {str(p.relative_to(runtime.conf_dir)): p.read_bytes() for p in sorted(runtime.conf_dir.rglob("*"))
                if p.is_file()}  # fmt: skip
        return cls(conf, sorted(p.name for p in runtime.bin_dir.iterdir()))


@dataclass
class Node:
    """One node: its netns on the fabric, its mount namespace (held by `holder`), its containerd and kubelet."""

    name: str
    index: int
    version: str  # its containerd: "1.6" (edits the primary) or "2.4" (loads drop-ins)
    root: Path  # its own dir on the host; bind-mounted at the fleet's node_dir inside its mount namespace
    netns: str  # the netns's name under /run/netns
    holder: subprocess.Popen | None = None
    runtime: Containerd | None = None
    before: CniDirs = CniDirs({}, [])  # its CNI dirs as the primary left them, before anything of ours ran

    def cni_dirs(self) -> CniDirs:
        assert self.runtime is not None
        return CniDirs.read(self.runtime)

    @property
    def ip(self) -> str:
        return f"{FABRIC_PREFIX}.{10 + self.index}"

    @property
    def subnet(self) -> str:
        return f"10.100.{self.index}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.100.{self.index}.1"

    @property
    def cgroup_root(self) -> str:
        return f"/cnir-{self.name}"

    @property
    def enter(self) -> tuple[str, ...]:
        """The prefix that runs a command in the node's network and mount namespaces."""
        assert self.holder is not None
        return ("nsenter", f"--target={self.holder.pid}", "--mount", "--net")

    def path(self, inside: str) -> str:
        """A path as the node's processes see it, opened from the test process (a pod's netns mount). An absolute
        link on the way resolves against the opener's root, not the node's: /var/run (a link to /run) is
        resolved here."""
        assert self.holder is not None
        if inside.startswith("/var/run/"):
            inside = inside.removeprefix("/var")
        return f"/proc/{self.holder.pid}/root{inside}"

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh(*self.enter, *cmd, check=check)


@dataclass
class NodeFleet:
    """A control plane in the fabric netns and the nodes `add` joins to it; `stop` leaves the host as it was
    (with `host.HostSnapshot` for what runtimes write regardless)."""

    cluster: Cluster
    nodes: dict[str, Node] = field(default_factory=dict)
    fabric: str = ""
    _cgroups: list[Path] = field(default_factory=list)

    @property
    def node_dir(self) -> Path:
        """The one path every node's own dir is mounted at (the chart's host paths are under it)."""
        return self.cluster.workdir / "node"

    @classmethod
    def create(cls, workdir: Path, node_names: tuple[str, ...]) -> NodeFleet:
        """The fabric netns and its bridge; the control plane is told to run there (`start` starts it)."""
        fabric = f"cnir-fab-{os.getpid()}"
        sh("ip", "netns", "add", fabric)
        for cmd in (
            ("ip", "link", "set", "lo", "up"),
            ("ip", "link", "add", "fabric0", "type", "bridge"),
            ("ip", "addr", "add", f"{API_HOST}/24", "dev", "fabric0"),
            ("ip", "link", "set", "fabric0", "up"),
        ):
            sh("ip", "-n", fabric, *cmd[1:])
        cluster = Cluster(workdir, api_host=API_HOST, netns=f"/run/netns/{fabric}", node_names=node_names)
        fleet = cls(cluster, fabric=fabric)
        fleet.node_dir.mkdir()
        return fleet

    def start(self) -> None:
        self.cluster.start_control_plane()

    def add(self, name: str, version: str, prepare: Callable[[Containerd], None] | None = None,
            taints: tuple[str, ...] = ()) -> Node:  # fmt: skip
        """A new node: its netns joined to the fabric and routed to the others, its mount namespace, containerd
        (`prepare(runtime)` imports images) and a kubelet that registers with `taints`."""
        assert name in self.cluster.node_names, f"{name}: the control plane has no token for it"
        node = Node(name, len(self.nodes) + 1, version, self.cluster.workdir / "nodes" / name,
                    f"cnir-n{os.getpid()}-{len(self.nodes) + 1}")  # fmt: skip
        node.root.mkdir(parents=True)
        self.nodes[name] = node
        self._network(node)
        self._mounts(node)
        self._cgroup_root(node)
        runtime = Containerd(node.root, with_plugin=False, node_netns=True, version=version, subnet=node.subnet,
                             gateway=node.gateway, enter=node.enter)  # fmt: skip
        node.runtime = runtime
        runtime.start()
        node.before = node.cni_dirs()
        if prepare is not None:
            prepare(runtime)
        self._kubelet(node, taints)
        return node

    def _network(self, node: Node) -> None:
        sh("ip", "netns", "add", node.netns)
        veth = f"veth{node.index}"
        sh("ip", "-n", self.fabric, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        sh("ip", "-n", self.fabric, "link", "set", veth, "master", "fabric0", "up")
        for cmd in (
            ("link", "set", "lo", "up"),
            ("addr", "add", f"{node.ip}/24", "dev", "eth0"),
            ("link", "set", "eth0", "up"),
        ):
            sh("ip", "-n", node.netns, *cmd)
        sh("ip", "netns", "exec", node.netns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for other in self.nodes.values():
            if other is not node:
                sh("ip", "-n", node.netns, "route", "add", other.subnet, "via", other.ip)
                sh("ip", "-n", other.netns, "route", "add", node.subnet, "via", node.ip)

    def _mounts(self, node: Node) -> None:
        for point in NODE_TMPFS:
            Path(point).mkdir(parents=True, exist_ok=True)  # a new one is removed by HostSnapshot.restore
        script = [f"mount --bind {node.root} {self.node_dir}"]
        for point in NODE_TMPFS:
            # iproute2's own bind of /run/netns (our copy is private) goes first: with two mounts on one path,
            # containerd judges HostToContainer by the lower one and refuses it
            script += [
                f"{{ ! mountpoint -q {point} || umount -R {point}; }}",
                f"mount -t tmpfs -o mode=0755 cnir-{node.name} {point}",
                f"mount --make-shared {point}",
            ]
        script += ["echo ready", "exec sleep infinity"]
        node.holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{node.netns}", "unshare", "--mount", "--propagation", "private",
             "sh", "-ec", " && ".join(script)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        assert node.holder.stdout is not None
        line = node.holder.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"node {node.name}: its mount namespace failed: {node.holder.communicate()[1]}")

    def _cgroup_root(self, node: Node) -> None:
        """The kubelet's cgroup root in every hierarchy (it refuses a root that does not exist); cpuset's needs
        its CPUs and memory nodes before a task can join."""
        for hierarchy in sorted(p for p in CGROUPS.iterdir() if p.is_dir()):
            path = hierarchy / node.cgroup_root.lstrip("/")
            path.mkdir(exist_ok=True)
            self._cgroups.append(path)
            if hierarchy.name == "cpuset":
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (path / name).write_text((hierarchy / name).read_text())

    def _kubelet(self, node: Node, taints: tuple[str, ...]) -> None:
        cluster = self.cluster
        for name in KERNEL_SYSCTLS:
            cluster.sysctls.setdefault(name, (Path("/proc/sys") / name).read_text().strip())
        config = kubelet_config(node.root, 10250, 10248, address=node.ip)
        config["cgroupRoot"] = node.cgroup_root
        config_path = node.root / "kubelet.yaml"
        config_path.write_text(json.dumps(config, indent=1))
        args = [
            str(peer("kubelet")),
            f"--config={config_path}",
            f"--kubeconfig={cluster.workdir / f'{node.name}.kubeconfig'}",
            f"--root-dir={node.root / 'kubelet'}",
            f"--cert-dir={node.root / 'kubelet-pki'}",
            f"--hostname-override={node.name}",
            f"--node-ip={node.ip}",
            f"--container-runtime-endpoint=unix://{node.root / 'containerd.sock'}",
            "--v=1",
        ]
        if taints:
            args.append(f"--register-with-taints={','.join(taints)}")
        path = cluster.path_without_iptables()
        cluster._spawn(f"kubelet-{node.name}", args, env={"PATH": str(path)}, enter=list(node.enter))

    def wait_ready(self, name: str, timeout: float = 120) -> None:
        self.cluster.wait_node_ready(timeout, name, f"kubelet-{name}")

    def memory_kib(self) -> dict[str, int]:
        """Resident memory of what each node runs (kubelet, containerd, shims and pods are in its cgroups or are
        our processes): the kubelet's and containerd's RSS, by node."""
        out: dict[str, int] = {}
        for name, node in self.nodes.items():
            pids = [self.cluster.processes[f"kubelet-{name}"].pid]
            if node.runtime is not None and node.runtime.process is not None:
                pids.append(node.runtime.process.pid)
            out[name] = sum(_rss_kib(pid) for pid in pids)
        for name in ("kine", "kube-apiserver", "kube-controller-manager", "kube-scheduler"):
            if name in self.cluster.processes:
                out[name] = _rss_kib(self.cluster.processes[name].pid)
        return out

    def stop(self) -> None:
        """Kubelets, then each node's pods (CNI DEL runs for each) and containerd, then the control plane; then the
        holders (the mount namespaces go with them), the netns, the cgroup roots."""
        cluster = self.cluster
        try:
            for name in list(self.nodes):
                cluster._stop(f"kubelet-{name}")
            for node in self.nodes.values():
                if node.runtime is None:
                    continue
                with contextlib.suppress(Exception):
                    client = PodClient(node.runtime)
                    try:
                        client.remove_all()
                    finally:
                        client.close()
                node.runtime.stop()
            cluster.stop()
        finally:
            for node in self.nodes.values():
                if node.holder is not None and node.holder.poll() is None:
                    node.holder.send_signal(signal.SIGKILL)
                    node.holder.wait(timeout=10)
                    for stream in (node.holder.stdout, node.holder.stderr):
                        if stream is not None:
                            stream.close()
                sh("ip", "netns", "delete", node.netns, check=False)
            if self.fabric:
                sh("ip", "netns", "delete", self.fabric, check=False)
            for path in reversed(self._cgroups):
                for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    with contextlib.suppress(OSError):
                        child.rmdir()
                with contextlib.suppress(OSError):
                    path.rmdir()


def _rss_kib(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pod_netns_paths(fleet: NodeFleet) -> Iterator[tuple[str, str]]:
    """(node, a pod's netns path as the test process opens it) for every ready sandbox of every node."""
    from ..cri import CriClient, sandbox_netns

    for name, node in fleet.nodes.items():
        assert node.runtime is not None
        client = CriClient(str(node.runtime.socket), timeout=30)
        try:
            for sandbox in client.list_sandboxes(ready_only=True):
                path = sandbox_netns(client.sandbox_status(sandbox.id))
                if path:
                    yield name, node.path(path)
        finally:
            client.close()
