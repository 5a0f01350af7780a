"""Benchmarks with their baselines, in one run: ./scripts/bench.sh  ->  docs/benchmarks.md, docs/benchmarks.svg

Every figure is measured in the same process run as its baseline and reported
with p50/p95/p99 and as a ratio to that baseline. Nothing here asserts a time.

1. ADD latency of the installed plugin (the bundle), fresh process, real netns,
   full ruleset: through the agent and in-process; baselines: the bundle's bare
   start (VERSION), Debian's Go portmap pass-through, nsenter + iptables-restore.
2. ADD's share of a real containerd RunPodSandbox.
3. A burst of 100 concurrent ADDs through the agent.
4. Datapath: connections/s and throughput through capture with 1, 100, 10 000
   excluded CIDRs and ports, nft sets against the same lists as linear iptables rules.
5. Peak RSS of the plugin process and the agent.
6. One repair pass over 10, 50, 100 sandboxes on a real containerd; baseline: the CRI calls alone.
7. Kernel work per pod, warm: REDIRECT against TPROXY.
8. An idle node: STATUS, GC and DEL of a vanished netns through the front against VERSION; repair passes that
   remember earlier ones against a full pass, on a real containerd.
9. Side by side with the real peer (`--only peers`): istio-cni's ADD (iptables and native_nftables modes,
   against a local fake API) beside ours via the agent and in-process, Go portmap v1.10 and the bundle's bare
   start, all for the same Istio-injected pod; and RunPodSandbox on containerd 2.4 with each last in the chain.
10. The datapath side by side (`--only datapath-peers`, bench/datapath.py): haproxy as the sidecar (proxy UID),
   nginx behind it, wrk as the app: no proxy, the explicit proxy (bare, with conntrack, through a port NAT),
   our capture, istio-cni's two modes, the article's two iptables rules, and the loopback-MSS experiment;
   keep-alive, a request per connection, bulk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench.report, beside this file

from bench.datapath import bench_datapath_side_by_side  # noqa: E402
from cni_redirect.backend import KernelBackend  # noqa: E402
from cni_redirect.config import PodRef, parse_conf  # noqa: E402
from cni_redirect.evaluation import evaluate  # noqa: E402
from cni_redirect.node.pods.repair import PassResult  # noqa: E402
from cni_redirect.ruleset import Ruleset  # noqa: E402
from cni_redirect.testing.netlab import PEER_V4, POD_V4, Netns, PodNetwork, enabled, plugin_conf  # noqa: E402
from cni_redirect.testing.sessions import at  # noqa: E402

TOOLS = REPO / "bench" / "tools.py"
PORTMAP = "/usr/lib/cni/portmap"
FULL = enabled(
    exclude_outbound_cidrs="10.96.0.0/12,169.254.169.254",
    exclude_outbound_ports="22,6443",
    exclude_inbound_ports="15090,15021",
    exclude_uids="1000",
    proxy_gid="1337",
    capture_dns="true",
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": pct(values, 50), "p95": pct(values, 95), "p99": pct(values, 99)}


def spawn(argv: list[str], env: dict[str, str], stdin: bytes) -> tuple[float, int]:
    """Run one process; return wall seconds and exit status."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, input=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start, proc.returncode


def peak_rss_kb(argv: list[str], env: dict[str, str], stdin: bytes) -> int:
    """Peak RSS of the exec'd program itself, as GNU time reports it (wait4 from a small parent)."""
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *argv], env=env, input=stdin, capture_output=True)
    return int(proc.stderr.decode().strip().splitlines()[-1])


def cni_env(command: str, netns: str) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "bench",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": "K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench",
    }


def iptables_rules(exclude_cidrs: list[str], exclude_ports: list[int]) -> str:
    """The init-container approach: roughly what our table does, as linear iptables nat rules."""
    lines = ["*nat", ":PREROUTING ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]", ":CAPTURE_OUT - [0:0]", ":CAPTURE_IN - [0:0]"]
    lines += ["-A OUTPUT -p tcp -j CAPTURE_OUT", "-A PREROUTING -p tcp -j CAPTURE_IN"]
    lines += [
        "-A CAPTURE_IN -p tcp --dport 15001 -j RETURN",
        "-A CAPTURE_IN -p tcp --dport 15006 -j RETURN",
        "-A CAPTURE_IN -p tcp -j REDIRECT --to-ports 15006",
        "-A CAPTURE_OUT -o lo -s 127.0.0.6/32 -j RETURN",
        "-A CAPTURE_OUT -o lo -j RETURN",
        "-A CAPTURE_OUT -m owner --uid-owner 1337 -j RETURN",
        "-A CAPTURE_OUT -d 127.0.0.0/8 -j RETURN",
    ]
    lines += [f"-A CAPTURE_OUT -d {cidr} -j RETURN" for cidr in exclude_cidrs]
    lines += [f"-A CAPTURE_OUT -p tcp --dport {port} -j RETURN" for port in exclude_ports]
    lines += ["-A CAPTURE_OUT -p tcp -j REDIRECT --to-ports 15001", "COMMIT", ""]
    return "\n".join(lines)


class Agent:
    """The bundle's own agent process, warm, as the DaemonSet runs it."""

    def __init__(self, bundle: Path) -> None:
        self.path = Path(f"/run/cni-redirect/bench-{os.getpid()}.sock")
        self.proc = subprocess.Popen(
            [str(bundle), "agent", "--socket", str(self.path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        while not self.path.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("the agent did not start")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)


def bench_add(bundle: Path, agent: Agent, runs: int) -> dict:
    launcher = REPO / "bench" / "front_launcher.py"
    via_agent = json.dumps(plugin_conf(FULL, agent_socket=str(agent.path))).encode()
    in_process = json.dumps(plugin_conf(FULL)).encode()
    portmap_conf = json.dumps(
        {**plugin_conf(None), "type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
    ).encode()
    spec = evaluate(parse_conf(plugin_conf(FULL)), PodRef("default", "bench", None)).ruleset
    v4_excludes = ["10.96.0.0/12", "169.254.169.254/32"]
    restore = iptables_rules(v4_excludes, [22, 6443]).encode()
    variants = {
        "bundle: bare start (VERSION)": ([str(bundle)], "VERSION", b'{"cniVersion":"1.0.0"}'),
        "bundle: ADD via agent": ([str(bundle)], "ADD", via_agent),
        "bundle: ADD in-process": ([str(bundle)], "ADD", in_process),
        "bundle's Python front (cni-redirect-py): bare start (VERSION)": (
            [str(bundle.parent / "cni-redirect-py")],
            "VERSION",
            b'{"cniVersion":"1.0.0"}',
        ),
        "bundle's Python front (cni-redirect-py): ADD via agent": (
            [str(bundle.parent / "cni-redirect-py")],
            "ADD",
            via_agent,
        ),
        "python3 -I -S: bare start (VERSION)": (["/usr/bin/python3", "-I", "-S", str(launcher)], "VERSION", b"{}"),
        "python3 -I -S: ADD via agent": (["/usr/bin/python3", "-I", "-S", str(launcher)], "ADD", via_agent),
        "venv console script: ADD via agent": ([str(REPO / ".venv/bin/cni-redirect")], "ADD", via_agent),
        "Go portmap: pass-through ADD": ([PORTMAP], "ADD", portmap_conf),
        "init-container way: nsenter + iptables-restore": (None, "ADD", restore),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    rss: dict[str, int] = dict.fromkeys(variants, 0)
    failures: dict[str, int] = dict.fromkeys(variants, 0)
    names = list(variants)
    for index in range(runs):
        random.Random(index).shuffle(names)  # interleaved, in a different order each round
        for name in names:
            argv, command, stdin = variants[name]
            ns = Netns.create("b")
            try:
                if argv is None:
                    argv = ["nsenter", f"--net={ns.path}", "iptables-restore"]
                seconds, code = spawn(argv, cni_env(command, ns.path), stdin)
                ok = code == 0
                ours = name.endswith(("ADD via agent", "ADD in-process"))
                if ok and ours and at(KernelBackend(), ns.path).read() != _normalized(spec):
                    ok = False  # a fast wrong answer is no answer
                samples[name].append(seconds * 1000)
                failures[name] += 0 if ok else 1
                if index < 3:
                    rss[name] = max(rss[name], peak_rss_kb(argv, cni_env(command, ns.path), stdin))
            finally:
                ns.delete()
    floor = statistics.median(samples["bundle: bare start (VERSION)"])
    return {
        name: {
            **summary(values),
            "ratio_to_bundle_start": statistics.median(values) / floor,
            "peak_rss_kb": rss[name],
            "failures": failures[name],
        }
        for name, values in samples.items()
    }


def _normalized(ruleset):
    from cni_redirect.backend import normalize

    return normalize(ruleset.objects())


def bench_burst(bundle: Path, agent: Agent, pods: int = 100) -> dict:
    namespaces = [Netns.create(f"burst{i}") for i in range(pods)]
    try:
        confs = [
            json.dumps(
                plugin_conf(enabled(exclude_outbound_ports=str(30000 + i)), agent_socket=str(agent.path))
            ).encode()
            for i in range(pods)
        ]
        cpu_before = agent.cpu_seconds()
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=pods) as pool:
            results = list(
                pool.map(lambda i: spawn([str(bundle)], cni_env("ADD", namespaces[i].path), confs[i]), range(pods))
            )
        wall = time.perf_counter() - start
        cpu = agent.cpu_seconds() - cpu_before
        failures = sum(1 for _, code in results if code != 0)
        wrong = 0
        for i, ns in enumerate(namespaces):
            listing = at(KernelBackend(), ns.path).read() or []
            sets = [o["set"] for o in listing if "set" in o and o["set"]["name"] == "out_exclude_ports"]
            wrong += 0 if sets and sets[0]["elem"] == [30000 + i] else 1
    finally:
        for ns in namespaces:
            ns.delete()
    latencies = [seconds * 1000 for seconds, _ in results]
    return {
        "pods": pods,
        "wall_s": wall,
        **summary(latencies),
        "failures": failures,
        "wrong_tables": wrong,
        "agent_cpu_s": cpu,
        "agent_peak_rss_kb": agent.peak_rss_kb(),
    }


def bench_datapath(seconds: float, sizes: tuple[int, ...]) -> list[dict]:
    net = PodNetwork.create()
    procs = []
    rows = []

    def helper(*args: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(TOOLS), *args], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    def measure(label: str, mechanism: str, size: int) -> None:
        rates = []
        for _ in range(3):
            out = subprocess.run(
                [sys.executable, str(TOOLS), "connect", net.pod.path, "1000", PEER_V4, "8080", str(seconds)],
                capture_output=True,
                text=True,
                check=True,
            )
            rates.append(float(out.stdout))
        mbps = float(
            subprocess.run(
                [sys.executable, str(TOOLS), "stream", net.pod.path, "1000", PEER_V4, "8080", "512"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        rows.append(
            {
                "config": label,
                "mechanism": mechanism,
                "excluded": size,
                "conn_per_s": statistics.median(rates),
                "conn_samples": rates,
                "throughput_mb_s": mbps,
            }
        )

    try:
        for ns, uid in ((net.pod, "1337"), (net.peer, "0")):
            port = "15001" if ns is net.pod else "8080"
            proc = helper("sink", ns.path, uid, port)
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        measure("warm-up (discarded)", "none", 0)
        rows.clear()
        measure("direct, no capture", "none", 0)
        backend = KernelBackend()
        for size in sizes:
            cidrs = [f"172.{16 + (2 * i) // 65536}.{((2 * i) // 256) % 256}.{(2 * i) % 256}/32" for i in range(size)]
            ports = [20000 + 2 * i for i in range(size)]
            conf = plugin_conf(
                enabled(exclude_outbound_cidrs=",".join(cidrs), exclude_outbound_ports=",".join(map(str, ports)))
            )
            ruleset = evaluate(parse_conf(conf), PodRef("default", "b", None)).ruleset
            assert ruleset is not None
            at(backend, net.pod.path).apply(ruleset)
            measure(f"nft sets, {size} CIDRs + {size} ports excluded", "nft", size)
            at(backend, net.pod.path).remove()
            restore = iptables_rules(cidrs, ports)
            subprocess.run(
                ["nsenter", f"--net={net.pod.path}", "iptables-restore"], input=restore, text=True, check=True
            )
            measure(f"iptables linear, {size} CIDRs + {size} ports excluded", "iptables", size)
            subprocess.run(["nsenter", f"--net={net.pod.path}", "iptables", "-t", "nat", "-F"], check=True)
            subprocess.run(["nsenter", f"--net={net.pod.path}", "iptables", "-t", "nat", "-X"], check=True)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        net.delete()
    return rows


def bench_run_pod_sandbox(bundle: Path, runs: int) -> dict:
    from cni_redirect.testing.containerd import Containerd, conflist, new_workdir
    from cni_redirect.testing.host import HostSnapshot

    snapshot = HostSnapshot.take()
    workdir = new_workdir()
    runtime = Containerd(workdir)
    agent = None
    client = None
    results: dict[str, list[float]] = {}
    try:
        runtime.start()
        link = runtime.bin_dir / "cni-redirect"
        link.unlink()
        link.symlink_to(bundle)  # the installed plugin is the bundle
        client = runtime.connect()
        agent = Agent(bundle)
        annotations = FULL

        def timed(label: str, entry: dict | None) -> None:
            runtime.write_conflist(conflist(workdir, with_plugin=entry is not None, **(entry or {})))
            time.sleep(2)
            client.wait_for_reload(expect_plugin=entry is not None)
            samples = []
            for index in range(runs):
                start = time.perf_counter()
                pod = client.run_pod(f"bench-{label}-{index}", annotations=annotations)
                samples.append((time.perf_counter() - start) * 1000)
                client.stop_pod(pod)
                client.remove_pod(pod)
            results[label] = samples

        timed("without cni-redirect", None)
        timed("cni-redirect via agent", {"agent_socket": str(agent.path)})
        timed("cni-redirect in-process", {})
    finally:
        if agent:
            agent.stop()
        if client:
            client.remove_all()
        runtime.stop()
        snapshot.restore()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(results["without cni-redirect"])
    return {label: {**summary(v), "ratio": statistics.median(v) / base} for label, v in results.items()}


def profile_front(agent: Agent) -> dict:
    """Where a via-agent ADD spends its time: interpreter start, our imports (-X importtime), the rest."""
    launcher = REPO / "bench" / "front_launcher.py"
    ns = Netns.create("prof")
    try:
        conf = json.dumps(plugin_conf(FULL, agent_socket=str(agent.path))).encode()
        proc = subprocess.run(
            ["/usr/bin/python3", "-I", "-S", "-X", "importtime", str(launcher)],
            env=cni_env("ADD", ns.path),
            input=conf,
            capture_output=True,
        )
    finally:
        ns.delete()
    rows = [line for line in proc.stderr.decode().splitlines() if line.startswith("import time:")]
    parsed = []
    for line in rows[1:]:  # the first line is the header
        first, cumulative_us, name = line.split("|")
        parsed.append((int(cumulative_us), int(first.rsplit(":", 1)[1]), name.strip()))
    total_imports = sum(self_us for _, self_us, _ in parsed)
    bare = [spawn(["/usr/bin/python3", "-I", "-S", "-c", "pass"], {}, b"")[0] * 1000 for _ in range(50)]
    return {
        "python_bare_start_ms": statistics.median(bare),
        "all_imports_ms": total_imports / 1000,
        "top_imports": sorted(parsed, reverse=True)[:8],
    }


@contextmanager
def private_node(venv_plugin: bool = True) -> Iterator[tuple[Any, Any, Path]]:
    """A private containerd (no plugin chained yet) and its CRI client; everything stopped and the host
    restored afterwards. `venv_plugin`: the venv's cni-redirect is in its CNI bin dir."""
    from cni_redirect.testing.containerd import Containerd, new_workdir
    from cni_redirect.testing.host import HostSnapshot

    snapshot = HostSnapshot.take()
    workdir = new_workdir()
    runtime = Containerd(workdir, with_plugin=False)
    client = None
    try:
        runtime.start()
        client = runtime.connect()
        if venv_plugin:
            (runtime.bin_dir / "cni-redirect").symlink_to(Path(sys.executable).parent / "cni-redirect")
        yield runtime, client, workdir
    finally:
        if client is not None:
            client.remove_all()
            client.close()
        runtime.stop()
        snapshot.restore()
        shutil.rmtree(workdir, ignore_errors=True)


def bench_repair(sizes: tuple[int, ...] = (10, 50, 100)) -> list[dict]:
    """One repair pass over N ready sandboxes on a real containerd: all missing, then all ok; baseline: the
    CRI calls alone (list + one status per sandbox) in the same process."""
    from cni_redirect.cri import CriClient
    from cni_redirect.node.pods.repair import Repairer
    from cni_redirect.testing.containerd import conflist

    rows = []
    with private_node() as (runtime, client, workdir):
        made = 0
        for size in sizes:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda i: client.run_pod(f"repair-{i}", annotations=enabled()), range(made, size)))
            made = size
            runtime.write_conflist(conflist(workdir))  # chained now; the pods above started without us
            cri = CriClient(str(runtime.socket))
            start = time.perf_counter()
            for sandbox in cri.list_sandboxes(ready_only=True):
                cri.sandbox_status(sandbox.id)
            baseline = time.perf_counter() - start
            cri.close()
            repairer = Repairer(CriClient(str(runtime.socket)), runtime.conf_dir, lambda *a, **k: None)
            missing = repairer.run_once()
            ok = repairer.run_once()
            repairer.close()
            assert len(missing.repaired) == size and ok.states["ok"] == size, (missing, ok)
            rows.append(
                {"sandboxes": size, "cri_only_s": baseline, "all_ok_s": ok.seconds, "all_missing_s": missing.seconds}
            )
            for pod in client.list_sandboxes():  # next size starts from uncaptured pods again
                Netns.at(client.netns(pod.id)).run("nft", "delete", "table", "inet", "cni_redirect", check=False)
            runtime.write_conflist(conflist(workdir, with_plugin=False))
    return rows


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench_idle_front(bundle: Path, runs: int) -> dict:
    """What an idle node's runtime asks over and over, through the bundle's front: STATUS and GC with and without
    a CNI server, and DEL of a netns that is gone (every stale sandbox after a reboot); baseline: VERSION. CPU is
    the child's user+sys (rusage), wall its lifetime; medians of interleaved runs."""
    agent = Agent(bundle)
    try:
        served = {"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect", "agent_socket": str(agent.path)}
        alone = {"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect"}
        variants = {
            "VERSION (baseline)": ("VERSION", alone, "/run/netns/none"),
            "STATUS via the CNI server": ("STATUS", served, ""),
            "STATUS, no CNI server": ("STATUS", alone, ""),
            "GC via the CNI server": ("GC", served, ""),
            "GC, no CNI server": ("GC", alone, ""),
            "DEL of a vanished netns via the CNI server": ("DEL", served, "/run/netns/cni-redirect-bench-gone"),
            "DEL of a vanished netns in-process": ("DEL", alone, "/run/netns/cni-redirect-bench-gone"),
        }
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        wall: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for index in range(runs):
            random.Random(index).shuffle(names)
            for name in names:
                command, conf, netns = variants[name]
                before = _child_cpu()
                seconds, code = spawn([str(bundle)], cni_env(command, netns), json.dumps(conf).encode())
                assert code == 0, (name, code)
                cpu[name].append((_child_cpu() - before) * 1000)
                wall[name].append(seconds * 1000)
    finally:
        agent.stop()
    base_cpu = statistics.median(cpu["VERSION (baseline)"])
    base_wall = statistics.median(wall["VERSION (baseline)"])
    return {
        name: {
            "cpu_ms_p50": statistics.median(cpu[name]),
            "wall_ms_p50": statistics.median(wall[name]),
            "cpu_ratio": statistics.median(cpu[name]) / base_cpu,
            "wall_ratio": statistics.median(wall[name]) / base_wall,
            "runs": runs,
        }
        for name in variants
    }


def bench_idle_repair(sizes: tuple[int, ...] = (10, 50, 100)) -> list[dict]:
    """Repair passes over N ready sandboxes, all fine, on a real containerd: the CPU a pass costs (this process's,
    every thread) when it remembers earlier passes, against the first pass that compares every pod in full, a full
    pass (every `full_every`-th), and a pass after every table was deleted by hand (all need repair)."""
    from cni_redirect.cri import CriClient
    from cni_redirect.node.pods.nftevents import NftablesEvents
    from cni_redirect.node.pods.repair import Repairer
    from cni_redirect.testing.containerd import conflist

    rows = []
    with private_node() as (runtime, client, workdir):
        runtime.write_conflist(conflist(workdir))
        made = 0
        for size in sizes:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda i: client.run_pod(f"idle-{i}", annotations=enabled()), range(made, size)))
            made = size
            repairer = Repairer(CriClient(str(runtime.socket)), runtime.conf_dir, lambda *a, **k: None)

            def timed_pass(repairer: Repairer = repairer) -> tuple[float, float, PassResult]:
                cpu, start = time.process_time(), time.perf_counter()
                result = repairer.run_once()
                return (time.process_time() - cpu) * 1000, (time.perf_counter() - start) * 1000, result

            first_cpu, _, first = timed_pass()
            every = repairer.memo.full_every
            quick = [timed_pass() for _ in range(every - 1)]  # the passes that remember
            full_cpu, _, _ = timed_pass()  # every `every`-th pass compares in full
            for pod in client.list_sandboxes():
                Netns.at(client.netns(pod.id)).run("nft", "delete", "table", "inet", "cni_redirect", check=False)
            fix_cpu, fix_wall, fixed = timed_pass()
            repairer.close()
            # As the agent runs it: nftables transactions heard from this netns, quiet pods not entered.
            events = NftablesEvents.open()
            hearing = Repairer(CriClient(str(runtime.socket)), runtime.conf_dir, lambda *a, **k: None, events=events)
            for _ in range(3):  # the first pass in full, then reads after the repairs above were heard
                timed_pass(hearing)
            heard = [timed_pass(hearing) for _ in range(20)]
            hearing.close()
            assert all(r.states["ok"] == size for *_, r in heard) and hearing.memo.heard >= 20 * size, hearing.memo
            heard_cpu = statistics.median(c for c, _, _ in heard)
            assert first.states["ok"] == size and all(r.states["ok"] == size for *_, r in quick), (first, quick)
            assert len(fixed.repaired) == size, fixed
            quick_cpu = statistics.median(c for c, _, _ in quick)
            rows.append(
                {
                    "sandboxes": size,
                    "first_pass_cpu_ms": first_cpu,
                    "quick_pass_cpu_ms": quick_cpu,
                    "quick_pass_wall_ms": statistics.median(w for _, w, _ in quick),
                    "full_pass_cpu_ms": full_cpu,
                    "all_missing_cpu_ms": fix_cpu,
                    "all_missing_wall_ms": fix_wall,
                    "quick_cpu_ms_per_sandbox": quick_cpu / size,
                    # The default interval: 30 s, and every `every`-th pass in full.
                    "full_every": every,
                    "core_share_at_30s": ((every - 1) * quick_cpu + full_cpu) / every / 30_000,
                    "heard_pass_cpu_ms": heard_cpu,
                    "core_share_heard_at_30s": ((every - 1) * heard_cpu + full_cpu) / every / 30_000,
                }
            )
    return rows


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds by OS thread name (the agent names its threads: cni_redirect.threads) of the live threads."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def bench_idle_stack(bundle_dir: Path, minutes: float, pods: int = 100, status_every: float = 5.0) -> dict:
    """The whole idle stack on a real containerd: the bundle's node agent (CNI server, repair at the default 30 s
    interval, its dirs watched) with `pods` ready sandboxes, and kubelet's STATUS cadence simulated (a STATUS
    through the installed front every `status_every` s). The agent's CPU from /proc/<pid>/stat and the fronts'
    (rusage) over `minutes`, as a share of one core."""
    from cni_redirect.testing.nodeagent import NodeAgentProcess

    agent = None
    with private_node(venv_plugin=False) as (runtime, client, workdir):
        try:
            with ThreadPoolExecutor(max_workers=8) as pool:
                list(pool.map(lambda i: client.run_pod(f"stack-{i}", annotations=enabled()), range(pods)))
            entry = {"exclude_namespaces": ["kube-system"]}
            executable, socket = bundle_dir / "cni-redirect", str(runtime.socket)
            agent = NodeAgentProcess(executable, runtime.bin_dir, runtime.conf_dir, bundle_dir, entry, workdir, socket)
            agent.wait_ready()
            deadline = time.monotonic() + 60
            while sum(m.startswith("repaired ") for m in agent.messages()) < pods and time.monotonic() < deadline:
                time.sleep(0.5)  # the first pass captures the pods that started before the agent
            conflist_doc = json.loads(next(runtime.conf_dir.glob("*.conflist")).read_text())
            ours = next(p for p in conflist_doc["plugins"] if p["type"] == "cni-redirect")
            status_conf = json.dumps({**ours, "cniVersion": "1.1.0", "name": conflist_doc["name"]}).encode()
            front = runtime.bin_dir / "cni-redirect"
            time.sleep(35)  # past the next (remembered) pass before measuring
            threads_start = _threads_cpu(agent.proc.pid)
            agent_start, fronts_start, start = _proc_cpu(agent.proc.pid), _child_cpu(), time.monotonic()
            statuses = failures = 0
            while time.monotonic() - start < minutes * 60:
                _, code = spawn([str(front)], cni_env("STATUS", ""), status_conf)
                statuses += 1
                failures += code != 0
                time.sleep(max(0.0, start + statuses * status_every - time.monotonic()))
            seconds = time.monotonic() - start
            agent_cpu, fronts_cpu = _proc_cpu(agent.proc.pid) - agent_start, _child_cpu() - fronts_start
            threads_end = _threads_cpu(agent.proc.pid)
            by_thread = {name: cpu - threads_start.get(name, 0.0) for name, cpu in threads_end.items()}
            by_thread["threads that ended (one per CNI request)"] = agent_cpu - sum(by_thread.values())
            passes = sum(1 for line in agent.lines if line.get("msg", "").startswith("repair"))
            assert agent.terminate() == 0
            agent = None
        finally:
            if agent is not None:
                agent.kill()
    return {
        "pods": pods,
        "seconds": seconds,
        "statuses": statuses,
        "status_failures": failures,
        "agent_cpu_s": agent_cpu,
        "fronts_cpu_s": fronts_cpu,
        "agent_core_share": agent_cpu / seconds,
        "fronts_core_share": fronts_cpu / seconds,
        "total_core_share": (agent_cpu + fronts_cpu) / seconds,
        "repair_log_lines": passes,
        "agent_cpu_by_thread_s": dict(sorted(by_thread.items(), key=lambda item: -item[1])),
    }


def bench_backend(runs: int = 200) -> dict:
    """The kernel work of one ADD and one DEL as the warm CNI server does it (in this process, a fresh netns
    each): REDIRECT against TPROXY, whose ADD also adds policy routing and whose DEL removes it. Baseline:
    the REDIRECT ADD, in the same process, interleaved."""
    rulesets: dict[str, Ruleset] = {}
    for mode in ("redirect", "tproxy"):
        ruleset = evaluate(
            parse_conf(plugin_conf(enabled(inbound_mode=mode))), PodRef("default", "bench", None)
        ).ruleset
        assert ruleset is not None
        rulesets[mode] = ruleset

    class NoRouting:
        """Routing that is never there and costs nothing: the REDIRECT path as it was before TPROXY."""

        def ipv6(self) -> bool:
            return False

        def read(self) -> list[dict]:
            return []

        def any_rule(self) -> bool:
            return False

        def add(self, objects: list[dict]) -> list[dict]:
            return []

        def delete(self, objects: list[dict]) -> None:
            return None

        def without_mss(self) -> list[str]:
            return []

        def set_mss(self, advmss: dict[str, int]) -> int:
            return 0

        def clear_mss(self, advmss: dict[str, int]) -> int:
            return 0

    backends = {
        "redirect": KernelBackend(),
        "tproxy": KernelBackend(),
        "redirect, no routing code": KernelBackend(routes=NoRouting),
    }
    samples: dict[str, list[float]] = {}
    order = list(backends)
    for index in range(runs):
        random.Random(index).shuffle(order)
        for name in order:
            backend, ruleset = backends[name], rulesets[name.split(",")[0]]
            ns = Netns.create("bb")
            try:
                start = time.perf_counter()
                at(backend, ns.path).apply(ruleset)
                added = time.perf_counter()
                observed = at(backend, ns.path).observe(ruleset.routing is not None)
                checked = time.perf_counter()
                assert bool(observed.routing) == (ruleset.routing is not None) and at(backend, ns.path).remove()
                removed = time.perf_counter()
            finally:
                ns.delete()
            samples.setdefault(f"ADD {name}", []).append((added - start) * 1000)
            samples.setdefault(f"CHECK's read (table and routing), {name}", []).append((checked - added) * 1000)
            samples.setdefault(f"DEL {name}", []).append((removed - checked) * 1000)
    floor = statistics.median(samples["ADD redirect"])
    return {name: {**summary(v), "ratio_to_redirect_add": statistics.median(v) / floor} for name, v in samples.items()}


def _istio_pod_conf(agent: Agent | None) -> tuple[dict, dict]:
    """Our entry under the istio profile and the annotations Istio's injector writes (the fixture's)."""
    annotations = json.loads((REPO / "tests/fixtures/mesh/istio-injected.json").read_text())["annotations"]
    entry: dict = {"profile": "istio"}
    if agent is not None:
        entry["agent_socket"] = str(agent.path)
    return entry, annotations


def bench_peers_add(bundle: Path, agent: Agent, runs: int) -> dict:
    """ADD of one Istio-injected pod: istio-cni (both modes) beside ours, interleaved, fresh netns each."""
    from cni_redirect.testing.istio import FakeKube, IstioCni, injected_pod
    from cni_redirect.testing.peers import peer

    kube = FakeKube()
    run_dir = Path(tempfile_dir("istio-cni-bench"))
    try:
        via_entry, annotations = _istio_pod_conf(agent)
        ours_agent = json.dumps(plugin_conf(annotations, **via_entry)).encode()
        ours_local = json.dumps(plugin_conf(annotations, profile="istio")).encode()
        portmap_conf = json.dumps(
            {**plugin_conf(None), "type": "portmap", "capabilities": {"portMappings": True}, "snat": True}
        ).encode()
        pod = injected_pod("bench", "default", annotations)
        kube.pods[("default", "bench")] = pod
        plugins = {
            mode: IstioCni(run_dir / mode, kube, native_nftables=mode == "nftables")
            for mode in ("iptables", "nftables")
        }
        variants: dict[str, tuple[list[str], str, bytes, dict[str, str]]] = {
            "bundle: bare start (VERSION)": ([str(bundle)], "VERSION", b'{"cniVersion":"1.0.0"}', {}),
            "cni-redirect: ADD via agent": ([str(bundle)], "ADD", ours_agent, {}),
            "cni-redirect: ADD in-process": ([str(bundle)], "ADD", ours_local, {}),
            "Go portmap v1.10: pass-through ADD": ([str(peer("portmap"))], "ADD", portmap_conf, {}),
        }
        k8s_args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=bench;K8S_POD_INFRA_CONTAINER_ID=x"
        for mode, plugin in plugins.items():
            stdin = json.dumps(plugin.config()).encode()
            variants[f"istio-cni ({mode}): ADD"] = ([str(peer("istio-cni"))], "ADD", stdin, {"CNI_ARGS": k8s_args})
        samples: dict[str, list[float]] = {name: [] for name in variants}
        failures: dict[str, int] = dict.fromkeys(variants, 0)
        names = list(variants)
        for index in range(runs):
            random.Random(index).shuffle(names)
            for name in names:
                argv, command, stdin, extra = variants[name]
                ns = Netns.create("p")
                try:
                    # istio-cni needs the pod's interface and address (as the primary plugin left them)
                    ns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")  # no dummy module
                    ns.run("ip", "addr", "add", f"{POD_V4}/24", "dev", "eth0")
                    ns.run("ip", "link", "set", "eth0", "up")
                    seconds, code = spawn(argv, {**cni_env(command, ns.path), **extra}, stdin)
                    captured = (
                        command != "ADD" or "portmap" in name or "nat" in ns.ruleset() or "cni_redirect" in ns.ruleset()
                    )
                    samples[name].append(seconds * 1000)
                    failures[name] += 0 if code == 0 and captured else 1
                finally:
                    ns.delete()
    finally:
        kube.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    istio = statistics.median(samples["istio-cni (iptables): ADD"])
    floor = statistics.median(samples["bundle: bare start (VERSION)"])
    return {
        name: {
            **summary(values),
            "ratio_to_istio_cni": statistics.median(values) / istio,
            "ratio_to_bundle_start": statistics.median(values) / floor,
            "failures": failures[name],
        }
        for name, values in samples.items()
    }


def bench_peers(bundle: Path, runs: int, pod_runs: int) -> dict:
    agent = Agent(bundle)
    try:
        add = bench_peers_add(bundle, agent, min(runs, 100))
    finally:
        agent.stop()
    return {"add": add, "run_pod_sandbox": bench_peers_run_pod_sandbox(bundle, pod_runs)}


def tempfile_dir(prefix: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f"{prefix}-")


def bench_peers_run_pod_sandbox(bundle: Path, runs: int) -> dict:
    """RunPodSandbox on containerd 2.4 (cniVersion 1.1.0, CNI plugins v1.10), the Istio-injected pod, with
    nothing, cni-redirect (via its agent) or istio-cni (each mode) last in the chain."""
    from cni_redirect.testing.containerd import Containerd, new_workdir
    from cni_redirect.testing.host import HostSnapshot
    from cni_redirect.testing.istio import FakeKube, IstioCni, injected_pod
    from cni_redirect.testing.peers import peer

    snapshot = HostSnapshot.take()
    workdir = new_workdir()
    runtime = Containerd(workdir, version="2.4")
    kube = FakeKube()
    agent = client = None
    results: dict[str, list[float]] = {}
    try:
        runtime.start()
        link = runtime.bin_dir / "cni-redirect"
        link.unlink()
        link.symlink_to(bundle)
        (runtime.bin_dir / "istio-cni").symlink_to(peer("istio-cni"))
        client = runtime.connect()
        agent = Agent(bundle)
        entry, annotations = _istio_pod_conf(agent)

        def timed(label: str, last: dict | None) -> None:
            document = runtime.conflist(with_plugin=False)
            if last is not None:
                document["plugins"].append(last)
            runtime.write_conflist(document)
            time.sleep(2)
            client.wait_for_reload(expect_plugin=last is not None and last["type"] == "cni-redirect")
            samples = []
            for index in range(runs):
                name = f"bench-{label.split()[0]}-{index}-{time.monotonic_ns()}"
                kube.pods[("default", name)] = injected_pod(name, "default", annotations)
                start = time.perf_counter()
                pod = client.run_pod(name, annotations=annotations)
                samples.append((time.perf_counter() - start) * 1000)
                client.stop_pod(pod)
                client.remove_pod(pod)
            results[label] = samples

        ours = {
            "type": "cni-redirect",
            "capabilities": {"io.kubernetes.cri.pod-annotations": True},
            "log_file": str(runtime.log_path),
            **entry,
        }
        timed("without a capture plugin", None)
        timed("cni-redirect via agent", ours)
        timed("Go portmap v1.10 (pass-through)", {"type": "portmap", "capabilities": {"portMappings": True}})
        for mode in ("iptables", "nftables"):
            config = IstioCni(workdir / f"istio-{mode}", kube, native_nftables=mode == "nftables").config()
            timed(
                f"istio-cni ({mode})",
                {k: v for k, v in config.items() if k not in ("cniVersion", "name", "prevResult")},
            )
    finally:
        if agent:
            agent.stop()
        if client:
            client.remove_all()
            client.close()
        kube.close()
        runtime.stop()
        snapshot.restore()
        shutil.rmtree(workdir, ignore_errors=True)
    base = statistics.median(results["without a capture plugin"])
    return {
        label: {**summary(v), "overhead_ms": statistics.median(v) - base, "ratio": statistics.median(v) / base}
        for label, v in results.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, default=REPO / "build" / "bundle" / "cni-redirect" / "cni-redirect")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--pod-runs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument(
        "--only",
        choices=[
            "add",
            "repair",
            "backend",
            "idle",
            "idle-stack",
            "peers",
            "datapath-peers",
            "pod-start",
            "pod-start-30",
        ],
        help="run one section and merge it into the last results",
    )
    parser.add_argument("--datapath-seconds", type=float, default=5.0, help="each wrk load, per variant and round")
    parser.add_argument("--pod-start-rounds", type=int, default=10, help="rounds of --only pod-start-30")
    parser.add_argument("--idle-minutes", type=float, default=10.0, help="how long the idle stack is measured")
    args = parser.parse_args()
    assert os.geteuid() == 0, "benchmarks need root"
    if args.only:
        results: dict = json.loads((args.out / "benchmarks.json").read_text())
        if args.only == "add":  # sections 1 to 3 and the front's profile: what a pod start pays
            agent = Agent(args.bundle)
            try:
                results["add"] = bench_add(args.bundle, agent, args.runs)
                results["burst"] = bench_burst(args.bundle, agent)
                results["profile"] = profile_front(agent)
            finally:
                agent.stop()
            results["run_pod_sandbox"] = bench_run_pod_sandbox(args.bundle, args.pod_runs)
        elif args.only == "idle":
            results["idle_front"] = bench_idle_front(args.bundle, min(args.runs, 60))
            results["idle_repair"] = bench_idle_repair()
        elif args.only == "idle-stack":
            results["idle_stack"] = bench_idle_stack(args.bundle.parent, args.idle_minutes)
        elif args.only == "peers":
            results["peers"] = bench_peers(args.bundle, args.runs, args.pod_runs)
        elif args.only == "datapath-peers":
            results["datapath_peers"] = bench_datapath_side_by_side(args.datapath_seconds)
        elif args.only == "pod-start-30":  # the 30-pod burst alone, capture against none, many rounds
            from bench.podstart import VARIANTS, bench_pod_start

            results["pod_start_30"] = bench_pod_start((30,), args.pod_start_rounds, VARIANTS[:2])
        elif args.only == "pod-start":
            from bench.podstart import bench_pod_start

            results["pod_start"] = bench_pod_start()
        else:
            results[args.only] = bench_repair() if args.only == "repair" else bench_backend(args.runs)
        (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1))
        from bench.report import write_report

        write_report(results, args.out)
        print(f"wrote {args.out / 'benchmarks.md'}")
        return 0
    results = {"machine": {"cores": os.cpu_count(), "kernel": os.uname().release}}
    agent = Agent(args.bundle)
    try:
        print("ADD latency ...", flush=True)
        results["add"] = bench_add(args.bundle, agent, args.runs)
        print("burst ...", flush=True)
        results["burst"] = bench_burst(args.bundle, agent)
        results["profile"] = profile_front(agent)
    finally:
        agent.stop()
    print("RunPodSandbox ...", flush=True)
    results["run_pod_sandbox"] = bench_run_pod_sandbox(args.bundle, args.pod_runs)
    print("datapath ...", flush=True)
    results["datapath"] = bench_datapath(args.seconds, (1, 100, 10000))
    print("repair ...", flush=True)
    results["repair"] = bench_repair()
    print("backend (REDIRECT vs TPROXY) ...", flush=True)
    results["backend"] = bench_backend(args.runs)
    print("idle: STATUS, GC, DEL of a vanished netns; repair passes that remember ...", flush=True)
    results["idle_front"] = bench_idle_front(args.bundle, min(args.runs, 60))
    results["idle_repair"] = bench_idle_repair()
    print("side by side with istio-cni ...", flush=True)
    results["peers"] = bench_peers(args.bundle, args.runs, args.pod_runs)
    print("the datapath side by side (haproxy, nginx, wrk) ...", flush=True)
    results["datapath_peers"] = bench_datapath_side_by_side(args.datapath_seconds)
    print("pod start on a real cluster (the SLO's way) ...", flush=True)
    from bench.podstart import bench_pod_start

    results["pod_start"] = bench_pod_start()
    print(f"idle stack, {args.idle_minutes} minutes ...", flush=True)
    results["idle_stack"] = bench_idle_stack(args.bundle.parent, args.idle_minutes)
    args.out.mkdir(exist_ok=True)
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1))
    from bench.report import write_report

    write_report(results, args.out)
    print(f"wrote {args.out / 'benchmarks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
