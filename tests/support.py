"""Test-only harnesses, builders and data; the lab they share with the demo and benchmarks is
`cni_redirect.testing`.

- `call`: the CNI dispatcher driven in-process with injected env, stdin and
  stdout over the fake kernel: the one dispatch harness of the unit tier;
- `wait_for`: poll a condition with a deadline;
- the golden cases (`CASES`, `render`) and hostile strings (`INJECTIONS`).
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni_redirect.config import PluginConf, PodRef, parse_conf
from cni_redirect.evaluation import Evaluation, evaluate
from cni_redirect.fake import MemoryBackend
from cni_redirect.logs import EventLog, JsonLog
from cni_redirect.node.agent.daemon import NodeAgent, Options, run
from cni_redirect.node.chaining import conflists
from cni_redirect.plugin import RedirectPlugin
from cni_redirect.ruleset import Ruleset
from cni_redirect.skel import dispatch
from cni_redirect.testing.netlab import enabled, plugin_conf

TESTS = Path(__file__).resolve().parent
GOLDEN_DIR = TESTS / "golden"
MESH_FIXTURES = TESTS / "fixtures" / "mesh"
FAKE_NETNS = "/run/netns/fake"
DEFAULT_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc",
    "CNI_NETNS": FAKE_NETNS,
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
    "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
}


@dataclass
class Call:
    rc: int
    stdout: str
    stderr: str
    backend: MemoryBackend

    @property
    def out(self) -> Any:
        """The JSON the command printed (a result or an error object), None when it printed nothing."""
        return json.loads(self.stdout) if self.stdout else None


def call(command: str, conf: dict | bytes, backend: MemoryBackend | None = None, **env: str | None) -> Call:
    """Run one CNI command through the dispatcher; an env value of None removes the variable."""
    environment = {k: v for k, v in {**DEFAULT_ENV, "CNI_COMMAND": command, **env}.items() if v is not None}
    stdout, stderr = io.StringIO(), io.StringIO()
    backend = backend if backend is not None else MemoryBackend()
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    rc = dispatch(RedirectPlugin(backend, EventLog(stderr)), environment, stdin, stdout, stderr)
    return Call(rc, stdout.getvalue(), stderr.getvalue(), backend)


def injected(mesh: str, **extra: str) -> dict[str, str]:
    """The annotations a mesh's injector writes (tests/fixtures/mesh/<mesh>-injected.json), plus `extra`."""
    annotations = json.loads((MESH_FIXTURES / f"{mesh}-injected.json").read_text())["annotations"]
    return {**annotations, **extra}


def free_port() -> int:
    """A TCP port nobody holds now, on both families (the agent's port is dual-stack): never a fixed number that a
    parallel run or another service may hold."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", 0))
        return probe.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.005) -> float:
    """Poll until predicate() is true; return how long it took. Fails the test at the deadline."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise AssertionError(f"condition not reached within {timeout} s")


# --- the golden cases: annotation sets whose rendered rulesets are kept under tests/golden ---

CASES: dict[str, dict[str, str]] = {
    "defaults": {},
    "include-ports": {"include-outbound-ports": "80,443,8000-8100", "include-inbound-ports": "8080"},
    "exclude-everything": {
        "exclude-outbound-ports": "22,6000-6999,6500",
        "exclude-outbound-cidrs": "10.0.0.0/8,10.1.0.0/16,169.254.169.254,fd00::/8,2001:db8::1",
        "exclude-inbound-ports": "15090,15021",
        "exclude-uids": "0,1000",
        "exclude-interfaces": "eth1,wg0",
    },
    "include-cidrs-v4-only": {"include-outbound-cidrs": "10.96.0.0/12,192.168.0.0/16"},
    "dns-and-gid": {"capture-dns": "true", "dns-port": "15054", "proxy-gid": "1337"},
    "no-inbound": {"include-inbound-ports": ""},
    "no-outbound": {"include-outbound-ports": ""},
    "custom-proxy": {"proxy-uid": "101", "outbound-port": "10000", "inbound-port": "10000"},
    "tproxy": {"inbound-mode": "tproxy", "exclude-inbound-cidrs": "10.0.0.0/8,fd00::/8", "exclude-interfaces": "eth1"},
    "reroute-and-capture-ports": {
        "reroute-interfaces": "tap0,k6t-eth0",
        "include-outbound-cidrs": "10.96.0.0/12,fd00::/8",
        "capture-outbound-ports": "3306,5432",
        "exclude-inbound-cidrs": "192.168.0.0/16",
    },
    "ipv4-only-tproxy": {"capture-ipv6": "false", "inbound-mode": "tproxy", "capture-dns": "true"},
    "linkerd-like": {
        "capture-own-ip": "false",
        "loopback-cidrs": "127.0.0.1/32,127.0.0.53/32,::1/128",
        "capture-dns": "true",
        "exclude-outbound-ports": "53,4567-4568",
    },
    "proxy-mark": {"proxy-mark": "0x539/0xfff", "proxy-gid": "1337"},
    "loopback-mss": {"loopback-mss": "true", "tcp-rmem": "4096 8388608 33554432"},
}

#: Entries of the conflist that some cases need.
CASE_CONF: dict[str, dict] = {"exclude-everything": {"allow_root_proxy_uid": True}}


def case_annotations(case: str) -> dict[str, str]:
    return enabled(**CASES[case])


def decide(conf: PluginConf, pod: PodRef) -> Evaluation:
    """ADD's evaluation of a pod, raising its error as ADD does when the pod's settings are invalid."""
    evaluation = evaluate(conf, pod)
    evaluation.raise_if_invalid()
    return evaluation


def render(case: str) -> Ruleset:
    """The ruleset a golden case renders to, through the same decision ADD makes."""
    conf = parse_conf(plugin_conf(case_annotations(case), **CASE_CONF.get(case, {})))
    decision = decide(conf, PodRef("default", "p", None))
    assert decision.ruleset is not None, decision.reason
    return decision.ruleset


#: Strings an attacker would try in an annotation value.
INJECTIONS = [
    "80; flush ruleset",
    '" } ; table ip x {',
    "22\nflush ruleset\n",
    "add table ip evil",
    "../../etc/passwd",
    "eth0/../../lo",
    "$(reboot)",
    "`id`",
    "10.0.0.0/8\x00,1.1.1.1",
    "@in_exclude_ports",
    "{ 1, 2 }",
    "lo",
    "\u202e80",
    "\uff18\uff10",  # full-width digits
    "1" * 5000,
    ",".join(["80"] * 1000),
]


# --- the node agent against a temp "host" ---

PRIMARY_DIR = TESTS.parent / "conflist" / "primary"
NODE_SETTINGS = {"defaults": {"proxy-uid": "1337"}, "exclude_namespaces": ["kube-system", "istio-system"]}


class NodeHost:
    """A temp node: CNI bin and conf dirs, and a plugin bundle to install."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "opt-cni-bin"
        self.conf = root / "etc-cni-net.d"
        self.bundle = root / "bundle" / "cni-redirect"
        for path in (self.bin, self.conf, self.bundle / "_internal"):
            path.mkdir(parents=True)
        (self.bin / "bridge").write_text("#!/bin/sh\n")
        self.set_bundle_version("v1")
        self.log = io.StringIO()

    def set_bundle_version(self, version: str) -> None:
        exe = self.bundle / "cni-redirect"
        exe.write_text(f"#!/bin/sh\necho {version}\n")
        exe.chmod(0o755)
        (self.bundle / "_internal" / "lib.txt").write_text(version)

    def options(self, **overrides) -> Options:
        base = dict(
            cni_bin_dir=self.bin,
            cni_conf_dir=self.conf,
            plugin_source=self.bundle,
            poll_interval=0.02,
            uninstall_grace=0.0,
            wait_log_interval=0.1,
            agent_socket=None,  # the CNI server binds under /run: the root tier's business
            repair="off",  # no container runtime in the unit tier
        )
        return Options(**{**base, **overrides})

    def agent(self, **overrides) -> NodeAgent:
        return NodeAgent(self.options(**overrides), JsonLog(self.log), conflists.entry(NODE_SETTINGS))

    def uninstall(self) -> list[str]:
        """`cni-redirect uninstall` on this node: a new process, knowing only what is on disk."""
        from cni_redirect.node.admin.uninstall import uninstall

        return uninstall(self.bin, self.conf, JsonLog(self.log), grace=0.0, cache_dir=self.root / "cni-cache")

    def put(self, name: str, data: bytes | None = None) -> bytes:
        data = data if data is not None else (PRIMARY_DIR / name).read_bytes()
        (self.conf / name).write_bytes(data)
        return data

    def entries(self, name: str) -> list[dict]:
        document = json.loads((self.conf / name).read_text())
        return [p for p in document["plugins"] if p["type"] == "cni-redirect"]

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.log.getvalue().splitlines()]


class AgentThread:
    """`run()` in a thread, as the DaemonSet runs it, stopped like SIGTERM would."""

    def __init__(self, host: NodeHost, **overrides) -> None:
        self.stop = threading.Event()
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(host.options(**overrides), JsonLog(host.log)))
        self.thread.start()

    def _run(self, options: Options, log: JsonLog) -> None:
        self.rc = run(options, log, self.stop)

    def terminate(self) -> int:
        self.stop.set()
        self.thread.join(timeout=30)
        assert self.rc is not None, "the agent did not stop within 30 s"
        return self.rc


# --- batches the kernel refuses: the fake must refuse each too (tests/test_fake.py, and the kernel tier) ---

_T = {"family": "inet", "table": "cni_redirect"}
_TABLE = {"family": "inet", "name": "cni_redirect"}


def _rule(chain: str, *expr: dict) -> dict:
    return {"add": {"rule": {**_T, "chain": chain, "expr": [*expr, {"counter": None}, {"return": None}]}}}


def _match(left: dict, right: object) -> dict:
    return {"match": {"op": "==", "left": left, "right": right}}


_TCP_DPORT = {"payload": {"protocol": "tcp", "field": "dport"}}
_L4PROTO = {"meta": {"key": "l4proto"}}
_IP_DADDR = {"payload": {"protocol": "ip", "field": "daddr"}}

#: Each: a command the kernel refuses after `render("defaults")` is in place.
REFUSED: dict[str, dict] = {
    "create-existing-table": {"create": {"table": _TABLE}},
    "delete-absent-table": {"delete": {"table": {"family": "inet", "name": "absent"}}},
    "rule-in-absent-chain": _rule("nochain", _match(_TCP_DPORT, 22)),
    "rule-uses-absent-set": _rule("output", _match(_TCP_DPORT, "@nosuchset")),
    "set-type-mismatch": _rule("output", _match(_IP_DADDR, "@in_exclude_ports")),
    "set-in-absent-table": {"add": {"set": {"family": "inet", "table": "absent", "name": "s", "type": "uid"}}},
    "prefix-without-interval": {
        "add": {"set": {**_T, "name": "s", "type": "ipv4_addr", "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}}
    },
    "overlapping-intervals": {
        "add": {
            "set": {
                **_T,
                "name": "s",
                "type": "inet_service",
                "flags": ["interval"],
                "elem": [{"range": [10, 20]}, {"range": [15, 25]}],
            }
        }
    },
    "port-out-of-range": {"add": {"set": {**_T, "name": "s", "type": "inet_service", "elem": [70000]}}},
    "wrong-family-address": {"add": {"set": {**_T, "name": "s", "type": "ipv4_addr", "elem": ["fd00::1"]}}},
    "redirect-in-filter-chain": {
        "add": {"chain": {**_T, "name": "f", "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}}
    },
    "nat-chain-on-forward": {
        "add": {"chain": {**_T, "name": "n", "type": "nat", "hook": "forward", "prio": -100, "policy": "accept"}}
    },
    "tproxy-on-output-hook": {
        "add": {"chain": {**_T, "name": "o", "type": "filter", "hook": "output", "prio": -150, "policy": "accept"}}
    },
    "socket-on-postrouting": {
        "add": {"chain": {**_T, "name": "p", "type": "filter", "hook": "postrouting", "prio": 0, "policy": "accept"}}
    },
}
#: Commands that must follow a REFUSED entry for it to be refused (the chain exists, the redirect does not fit).
REFUSED_FOLLOW_UP: dict[str, list[dict]] = {
    "redirect-in-filter-chain": [{"add": {"rule": {**_T, "chain": "f", "expr": [{"redirect": {"port": 15001}}]}}}],
    "tproxy-on-output-hook": [
        {"add": {"rule": {**_T, "chain": "o", "expr": [_match(_L4PROTO, 6), {"tproxy": {"family": "ip", "port": 1}}]}}}
    ],
    "socket-on-postrouting": [
        {
            "add": {
                "rule": {**_T, "chain": "p", "expr": [_match({"socket": {"key": "transparent"}}, 1), {"accept": None}]}
            }
        }
    ],
}


class Sampler:
    """Samples `probe()` every few ms in a thread; `failures` is how many samples were False."""

    def __init__(self, probe: Callable[[], bool]) -> None:
        self.probe, self.samples, self.failures = probe, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples += 1
            self.failures += not self.probe()
            time.sleep(0.01)

    def end(self) -> tuple[int, int]:
        self.stop.set()
        self.thread.join(timeout=10)
        return self.samples, self.failures
