"""Shared test machinery: network namespaces, listeners, and invoking the plugin as a runtime would.

Everything here is created by the test run itself and removed by it: netns
names carry our PID, processes are killed by the PIDs we started.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NETTOOLS = Path(__file__).resolve().parent / "nettools.py"
PLUGIN = Path(sys.executable).parent / "cni-redirect"
POD_V4, PEER_V4 = "10.77.0.2", "10.77.0.1"
POD_V6, PEER_V6 = "fd77::2", "fd77::1"
ANNOTATIONS_KEY = "io.kubernetes.cri.pod-annotations"
_names = itertools.count()


def sh(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kwargs)


def host_ruleset() -> str:
    return sh("nft", "list", "ruleset").stdout


@dataclass
class Netns:
    """A network namespace by path; `create` makes a named one under /run/netns that `delete` removes."""

    name: str
    path: str

    @classmethod
    def create(cls, role: str) -> Netns:
        name = f"cnir-{os.getpid()}-{next(_names)}-{role}"
        sh("ip", "netns", "add", name)
        ns = cls(name, f"/run/netns/{name}")
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    @classmethod
    def at(cls, path: str, name: str = "") -> Netns:
        """An existing netns we did not create (a sandbox's, or our own)."""
        return cls(name or path, path)

    def run(self, *cmd: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        return sh("nsenter", f"--net={self.path}", *cmd, check=check, input=input)

    def ruleset(self) -> str:
        return self.run("nft", "list", "ruleset").stdout

    def delete(self) -> None:
        if self.path == f"/run/netns/{self.name}":
            sh("ip", "netns", "delete", self.name, check=False)


#: The test process's own (host) netns, for listeners and clients "outside the pod".
HOST = Netns.at("/proc/self/ns/net", "host")


@dataclass
class PodNetwork:
    """A pod netns and a peer netns joined by a veth pair, IPv4 and IPv6."""

    pod: Netns
    peer: Netns

    @classmethod
    def create(cls) -> PodNetwork:
        pod, peer = Netns.create("pod"), Netns.create("peer")
        sh("ip", "-n", pod.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", peer.name)
        for ns, v4, v6 in ((pod, POD_V4, POD_V6), (peer, PEER_V4, PEER_V6)):
            sh("ip", "-n", ns.name, "addr", "add", f"{v4}/24", "dev", "eth0")
            sh("ip", "-n", ns.name, "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns.name, "link", "set", "eth0", "up")
        # apps like nginx bind :80 without root inside a pod; this sysctl is per netns
        pod.run("sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0")
        # a pod has a default route via its gateway (Linkerd's validator dials an address off-link)
        pod.run("ip", "route", "add", "default", "via", PEER_V4)
        pod.run("ip", "-6", "route", "add", "default", "via", PEER_V6)
        return cls(pod, peer)

    def delete(self) -> None:
        self.pod.delete()
        self.peer.delete()


@dataclass
class Processes:
    """Background helpers we started; stopped by PID, never by name."""

    running: list[subprocess.Popen] = field(default_factory=list)

    def listen(
        self,
        netns: Netns,
        name: str,
        port: int,
        uid: int = 0,
        udp: bool = False,
        bind: str = "any",
        program: str | None = None,
        transparent: bool = False,
        gid: int | None = None,
    ) -> subprocess.Popen:
        """A listener in netns as uid (and gid, else the uid's number); `program` names the process (its /proc
        comm), as nginx or envoy would be."""
        python = sys.executable
        if program is not None:  # exec the interpreter through a link of that name: comm is the link's name
            link = Path(tempfile.mkdtemp(prefix="cnir-prog-")) / program
            link.symlink_to(sys.executable)
            python = str(link)
        cmd = [python, str(NETTOOLS), "--netns", netns.path, "--uid", str(uid)]
        cmd += ["--gid", str(gid)] if gid is not None else []
        cmd += ["listen", name, str(port), "--bind", bind] + (["--udp"] if udp else [])
        cmd += ["--transparent"] if transparent else []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.running.append(proc)
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            detail = proc.stderr.read() if proc.poll() is not None else ""
            raise RuntimeError(f"listener {name} did not start: {detail}")
        return proc

    def forward(
        self, netns: Netns, port: int, uid: int, source: str | None = None, transparent: bool = False,
        to: str | None = None,
    ) -> subprocess.Popen:  # fmt: skip
        """A stand-in sidecar that forwards each captured connection to its original destination (nettools)."""
        cmd = [sys.executable, str(NETTOOLS), "--netns", netns.path, "--uid", str(uid), "forward", str(port)]
        cmd += (["--source", source] if source else []) + (["--transparent"] if transparent else [])
        cmd += ["--to", to] if to else []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.running.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", "the forwarder did not start"
        return proc

    @contextmanager
    def syns(self, netns: Netns, interface: str) -> Iterator[list[dict]]:
        """The TCP SYNs and SYN-ACKs seen on `interface` in netns while the block runs (read after it)."""
        cmd = [sys.executable, str(NETTOOLS), "--netns", netns.path, "--uid", "0", "sniff-syns", interface]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.running.append(proc)
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", "the SYN sniffer did not start"
        seen: list[dict] = []
        try:
            yield seen
            time.sleep(0.2)  # the last frames reach the socket
        finally:
            proc.kill()
            out, _ = proc.communicate(timeout=10)
            seen += [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def stop(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.running.clear()


def connect(
    netns: Netns,
    host: str,
    port: int,
    uid: int = 1000,
    udp: bool = False,
    source: str | None = None,
    gid: int | None = None,
    mark: int | None = None,
) -> dict:
    """Connect from inside netns as uid (and gid, else the uid's number); return the answering listener's JSON
    (or an error dict)."""
    cmd = [sys.executable, str(NETTOOLS), "--netns", netns.path, "--uid", str(uid)]
    cmd += ["--gid", str(gid)] if gid is not None else []
    cmd += ["connect", host, str(port)]
    cmd += (["--udp"] if udp else []) + (["--source", source] if source else [])
    cmd += ["--mark", hex(mark)] if mark is not None else []
    proc = sh(*cmd, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"nettools connect {host} {port} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    out = proc.stdout.strip()
    return json.loads(out) if out else {"error": "no answer"}


def burst(
    netns: Netns, host: str, port: int, count: int, uid: int = 1000, timeout: float = 2.0, rate: float = 0.0
) -> dict:
    """`count` short connections one after another from netns as uid (at most `rate` a second); how many failed
    (by errno), how many were slow (over 0.5 s)."""
    cmd = [sys.executable, str(NETTOOLS), "--netns", netns.path, "--uid", str(uid)]
    cmd += ["burst", host, str(port), str(count), "--timeout", str(timeout), "--rate", str(rate)]
    return json.loads(sh(*cmd, timeout=count * timeout + 60).stdout.strip().splitlines()[-1])


def validate(netns: Netns, mesh: str, uid: int, timeout: float | None = None) -> tuple[int, dict]:
    """Run the mesh's validator (nettools istio-validate / linkerd-validate) in netns as uid: (exit code, report)."""
    cmd = [sys.executable, str(NETTOOLS), "--netns", netns.path, "--uid", str(uid), f"{mesh}-validate"]
    cmd += ["--timeout", str(timeout)] if timeout is not None else []
    proc = sh(*cmd, check=False, timeout=30)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else {"stderr": proc.stderr[-2000:]}


def prev_result(version: str) -> dict:
    ips = [
        {"address": f"{POD_V4}/24", "gateway": PEER_V4, "interface": 0},
        {"address": f"{POD_V6}/64", "interface": 0},
    ]
    if version < "1.0.0":
        for ip, fam in zip(ips, ("4", "6"), strict=True):
            ip["version"] = fam
    return {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "mac": "0a:58:0a:4d:00:02", "sandbox": "/run/netns/x"}],
        "ips": ips,
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


def plugin_conf(
    annotations: dict[str, str] | None = None,
    version: str = "1.0.0",
    prev: bool = True,
    **entry: Any,
) -> dict:
    conf: dict = {
        "cniVersion": version,
        "name": "test-net",
        "type": "cni-redirect",
        "capabilities": {ANNOTATIONS_KEY: True},
        **entry,
    }
    if annotations is not None:
        conf["runtimeConfig"] = {ANNOTATIONS_KEY: annotations}
    if prev:
        conf["prevResult"] = prev_result(version)
    return conf


def enabled(**annotations: str) -> dict[str, str]:
    """Annotations for an opted-in pod; keyword names use _ for - ."""
    out = {"cni-redirect.io/enabled": "true"}
    out.update({f"cni-redirect.io/{key.replace('_', '-')}": value for key, value in annotations.items()})
    return out


@dataclass
class PluginRun:
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)


def run_plugin(
    command: str,
    netns: str,
    conf: dict | bytes,
    cni_args: str = "K8S_POD_NAMESPACE=default;K8S_POD_NAME=demo;K8S_POD_UID=u-1",
    container_id: str = "c0ffee",
    extra_env: dict[str, str] | None = None,
    plugin: Path = PLUGIN,
) -> PluginRun:
    """Exec the installed plugin exactly as a runtime does: CNI_* env, config on stdin."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": cni_args,
        **(extra_env or {}),
    }
    data = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    start = time.monotonic()
    proc = subprocess.run([str(plugin)], input=data, env=env, capture_output=True, timeout=60)
    return PluginRun(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), time.monotonic() - start)
