"""The datapath side by side: a real proxy as the sidecar, a real app, each capture's rules.

    app (wrk, UID 1000) -> [capture] -> haproxy (UID 1337, :15001) -> nginx (another netns)

Each variant gets a fresh pod netns and backend netns (PodNetwork), its own haproxy and nginx, and
its own rules; wrk then runs three loads: keep-alive, one request per connection, and a bulk
download. Reported per load: requests/s, p50/p99 latency (wrk's), CPU per request (the whole
machine's busy time from /proc/stat over the run: app, proxy, backend and softirq all count), and
loopback packets per request in the pod netns, with the MSS wrk's socket used and the receive buffer it grew
to (from `ss -tim`).

haproxy's captured frontend connects to the connection's original destination (SO_ORIGINAL_DST,
`server 0.0.0.0:0`), so a variant that lost the original destination would fail its requests.
The explicit-proxy variant dials a second frontend that forwards to the backend by address.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cni_redirect.testing.netlab import PEER_V4, Netns, PodNetwork

PROXY_UID = 1337
APP_UID = 1000
CAPTURED_PORT = 15001  # the capture's outbound port (Istio's, our istio profile's)
EXPLICIT_PORT = 15002  # a plain forward to the backend, for the app that dials its proxy itself
REDIRECTED_PORT = 15003  # (b+nat): the app dials this, a loopback port redirect sends it to EXPLICIT_PORT
BULK_MB = 256
NO_SOCKET_READING: dict[str, int | None] = {"app_mss": None, "app_rcvbuf": None}  # not a download, or wrk ended
LOADS = ("keep-alive", "one request per connection", "bulk download")

HAPROXY_CFG = """\
global
    uid {uid}
    gid {uid}
    nbthread 1
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend captured
    bind 0.0.0.0:{captured}
    default_backend original_destination
backend original_destination
    server original 0.0.0.0:0
frontend explicit
    bind 127.0.0.1:{explicit}
    default_backend backend_by_address
backend backend_by_address
    server nginx {backend}:80
"""

NGINX_CFG = """\
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    sendfile on;
    keepalive_requests 1000000;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 80 backlog=4096;
        root {root}/www;
    }}
}}
"""

ARTICLE_RULES = f"""\
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m owner ! --uid-owner {PROXY_UID} -j REDIRECT --to-ports {CAPTURED_PORT}
-A PREROUTING -p tcp -j REDIRECT --to-ports 15006
COMMIT
"""


def injected_annotations() -> dict[str, str]:
    """The pod as Istio's injector writes it (the test fixture), for every capture variant alike."""
    fixture = Path(__file__).resolve().parents[1] / "tests/fixtures/mesh/istio-injected.json"
    return json.loads(fixture.read_text())["annotations"]


def _busy_jiffies() -> int:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _lo_packets(ns: Netns) -> int:
    stats = json.loads(ns.run("ip", "-s", "-j", "link", "show", "lo").stdout)[0]["stats64"]
    return int(stats["tx"]["packets"])


_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _latency_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _SECONDS[unit] * 1000


def parse_wrk(out: str) -> dict:
    """wrk's summary with --latency: requests/s, transfer/s, p50/p99 (None when wrk printed no distribution,
    which it sometimes does for a few long requests; the bulk table reports none), errors."""
    if "Requests/sec:" not in out:
        raise RuntimeError(f"wrk printed no summary: {out!r}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    number, unit = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?)B", out).groups()  # type: ignore[union-attr]
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    failed = int(errors.group(1)) if errors else 0
    failed += sum(int(v) for v in socket_errors.groups()) if socket_errors else 0
    return {
        "requests": requests,
        "rps": rps,
        "mb_s": float(number) * _UNITS[unit] / 1e6,
        "p50_ms": _latency_ms(latency["50"]) if "50" in latency else None,
        "p99_ms": _latency_ms(latency["99"]) if "99" in latency else None,
        "failed": failed,
    }


class Sidecar:
    """One variant's pod: a fresh pod netns and backend netns, nginx in the backend, haproxy in the pod."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.chmod(0o755)  # nginx's workers run as an unprivileged user
        self.net = PodNetwork.create()
        self.procs: list[subprocess.Popen] = []
        self.facts: list[Callable[[], dict]] = []  # what a variant reads back before its netns goes
        www = root / "www"
        www.mkdir(parents=True)
        (www / "small").write_bytes(b"x" * 612)  # the size of nginx's welcome page
        with (www / "bulk").open("wb") as f:
            f.truncate(BULK_MB << 20)
        for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (root / name).mkdir()
        (root / "nginx.conf").write_text(NGINX_CFG.format(root=root))
        (root / "haproxy.cfg").write_text(
            HAPROXY_CFG.format(uid=PROXY_UID, captured=CAPTURED_PORT, explicit=EXPLICIT_PORT, backend=PEER_V4)
        )
        try:
            self._start(self.net.peer, ["nginx", "-e", str(root / "error.log"), "-c", str(root / "nginx.conf")])
            self._start(self.net.pod, ["haproxy", "-W", "-db", "-f", str(root / "haproxy.cfg")])
            self._wait_listening(self.net.peer, 80)
            self._wait_listening(self.net.pod, CAPTURED_PORT)
        except BaseException:
            self.close()
            raise

    def _start(self, ns: Netns, argv: list[str]) -> None:
        daemon_off = ["-g", "daemon off;"] if argv[0] == "nginx" else []
        self.procs.append(
            subprocess.Popen(
                ["nsenter", f"--net={ns.path}", *argv, *daemon_off],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    @staticmethod
    def _wait_listening(ns: Netns, port: int) -> None:
        deadline = time.monotonic() + 10
        while f":{port} " not in ns.run("ss", "-Htln").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on :{port} in {ns.name}")
            time.sleep(0.05)

    def wrk(self, target: str, load: str, seconds: float) -> dict:
        """wrk as the app's UID in the pod, one thread, with the loopback packets and CPU it cost."""
        path, connections, headers = {
            "keep-alive": ("/small", 16, []),
            "one request per connection": ("/small", 16, ["-H", "Connection: close"]),
            # wrk keeps no latency above its timeout (2 s by default); a slow machine's download can take longer
            "bulk download": ("/bulk", 1, ["--timeout", "30s"]),
        }[load]
        argv = ["nsenter", f"--net={self.net.pod.path}", "setpriv", f"--reuid={APP_UID}", f"--regid={APP_UID}"]
        argv += ["--clear-groups", "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", *headers]
        argv.append(f"http://{target}{path}")
        lo, busy, start = _lo_packets(self.net.pod), _busy_jiffies(), time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        socket = self._app_socket(target, proc) if load == "bulk download" else dict(NO_SOCKET_READING)
        out, _ = proc.communicate(timeout=seconds + 30)
        wall = time.perf_counter() - start
        result = parse_wrk(out)
        cpu_seconds = (_busy_jiffies() - busy) / 100  # USER_HZ
        result["cpu_us_per_request"] = cpu_seconds / max(result["requests"], 1) * 1e6
        result["cpu_cores"] = cpu_seconds / wall
        result["lo_packets_per_request"] = (_lo_packets(self.net.pod) - lo) / max(result["requests"], 1)
        result.update(socket)
        return result

    def _app_socket(self, target: str, proc: subprocess.Popen) -> dict:
        """wrk's own socket (the app UID's, not the proxy's upstream one to the same address) while the download
        runs: its MSS and the receive buffer autotuning has grown it to."""
        time.sleep(0.5)
        host, _, port = target.partition(":")
        out = self.net.pod.run("ss", "-Htinme", "state", "established", "dst", f"{host}:{port or 80}").stdout
        lines = out.splitlines()
        for head, info in itertools.pairwise(lines):
            if f"uid:{APP_UID} " in head and proc.poll() is None:
                mss, rcvbuf = re.search(r"\bmss:(\d+)", info), re.search(r"\brb(\d+)", info)
                return {
                    "app_mss": int(mss.group(1)) if mss else None,
                    "app_rcvbuf": int(rcvbuf.group(1)) if rcvbuf else None,
                }
        return dict(NO_SOCKET_READING)

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.net.delete()


Capture = Callable[[Sidecar], None]


def no_rules(sidecar: Sidecar) -> None:
    """(a) and (b): nothing in the pod's netfilter."""


def article_rules(sidecar: Sidecar) -> None:
    sidecar.net.pod.run("iptables-restore", input=ARTICLE_RULES)


def ours(sidecar: Sidecar) -> None:
    from cni_redirect.backend import KernelBackend
    from cni_redirect.config import PodRef, parse_conf
    from cni_redirect.evaluation import evaluate
    from cni_redirect.testing.netlab import plugin_conf
    from cni_redirect.testing.sessions import at

    pod = PodRef("default", "bench", None)
    ruleset = evaluate(parse_conf(plugin_conf(injected_annotations(), profile="istio")), pod).ruleset
    assert ruleset is not None, "the Istio-injected pod is captured under the istio profile"
    at(KernelBackend(), sidecar.net.pod.path).apply(ruleset)


def ours_with(**settings: str) -> Capture:
    """(g), (h): our capture with settings an admin turns on in the entry's `defaults` (`loopback-mss`, the TCP
    buffers), applied exactly as ADD applies them (the table, the routes' advmss, the sysctls). The SYNs that
    leave the pod through eth0 are counted in a table of the bench's own: none may offer more than 1460."""

    def capture(sidecar: Sidecar) -> None:
        from cni_redirect.backend import KernelBackend
        from cni_redirect.config import PodRef, parse_conf
        from cni_redirect.evaluation import evaluate
        from cni_redirect.testing.netlab import plugin_conf
        from cni_redirect.testing.sessions import at

        pod = PodRef("default", "bench", None)
        conf = parse_conf(plugin_conf(injected_annotations(), profile="istio", defaults=settings))
        ruleset = evaluate(conf, pod).ruleset
        assert ruleset is not None and ruleset.route_mss is not None
        at(KernelBackend(), sidecar.net.pod.path).apply(ruleset)
        sidecar.net.pod.run("nft", "-f", "-", input=SYN_COUNTERS)

        def clamped() -> dict:
            table = sidecar.net.pod.run("nft", "-j", "list", "counters", "table", "inet", "bench_syns").stdout
            packets = {c["counter"]["name"]: c["counter"]["packets"] for c in json.loads(table)["nftables"]
                       if "counter" in c}  # fmt: skip
            return {"syns_leaving_eth0": packets["leaving"], "syns_leaving_eth0_over_1460": packets["over"]}

        sidecar.facts.append(clamped)

    return capture


# After our postrouting clamp (mangle, -150): what the SYNs leaving the pod offer, counted.
SYN_COUNTERS = """\
table inet bench_syns {
    counter over { }
    counter leaving { }
    chain postrouting {
        type filter hook postrouting priority 0; policy accept;
        oifname != "lo" tcp flags & (syn | rst) == syn tcp option maxseg size > 1460 counter name "over"
        oifname != "lo" tcp flags & (syn | rst) == syn counter name "leaving"
    }
}
"""


def explicit_with_conntrack(sidecar: Sidecar) -> None:
    """(b) with our table loaded: the app still dials the proxy itself (loopback is never captured), but
    conntrack now follows every packet, as it does for any NAT capture: the floor under (c) to (g)."""
    ours(sidecar)


PORT_REDIRECT = f"""\
table ip bench_port_redirect {{
    chain output {{
        type nat hook output priority -100; policy accept;
        tcp dport {REDIRECTED_PORT} redirect to :{EXPLICIT_PORT}
    }}
}}
"""


def explicit_through_nat(sidecar: Sidecar) -> None:
    """(b+nat): (b+ct) with NAT on every packet: the app dials a loopback port that one rule redirects to the
    explicit frontend. Conntrack and NAT as under any capture, but loopback's MSS from connect() on: the NAT
    floor without the MSS of the pod's route that (c) to (f) carry."""
    ours(sidecar)
    sidecar.net.pod.run("nft", "-f", "-", input=PORT_REDIRECT)


def istio_cni(native_nftables: bool) -> Capture:
    def capture(sidecar: Sidecar) -> None:
        from cni_redirect.testing.istio import FakeKube, IstioCni, injected_pod

        kube = FakeKube()
        try:
            plugin = IstioCni(sidecar.root / "istio-cni", kube, native_nftables=native_nftables)
            done = plugin.run("ADD", sidecar.net.pod.path, injected_pod("bench", "default", injected_annotations()))
            if done.returncode != 0:
                raise RuntimeError(f"istio-cni ADD failed: {done.stdout.decode()} {done.stderr.decode()}")
        finally:
            kube.close()

    return capture


BACKEND = f"{PEER_V4}:80"
VARIANTS: dict[str, tuple[Capture, str]] = {
    "(a) no proxy: app -> backend": (no_rules, BACKEND),
    "(b) app dials the proxy explicitly": (no_rules, f"127.0.0.1:{EXPLICIT_PORT}"),
    "(b+ct) explicit, conntrack on (our table loaded)": (explicit_with_conntrack, f"127.0.0.1:{EXPLICIT_PORT}"),
    "(b+nat) explicit, through a loopback port redirect": (explicit_through_nat, f"127.0.0.1:{REDIRECTED_PORT}"),
    "(c) cni-redirect capture": (ours, BACKEND),
    "(d) istio-cni (iptables) capture": (istio_cni(False), BACKEND),
    "(e) istio-cni (nftables) capture": (istio_cni(True), BACKEND),
    "(f) the article's two iptables rules": (article_rules, BACKEND),
    "(g) (c) with loopback-mss: true": (ours_with(**{"loopback-mss": "true"}), BACKEND),
    "(h) (g) with tcp-rmem: 4096 8388608 33554432": (
        ours_with(**{"loopback-mss": "true", "tcp-rmem": "4096 8388608 33554432"}),
        BACKEND,
    ),
}


def _median(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


@contextmanager
def sidecar_for(capture: Capture) -> Iterator[Sidecar]:
    root = Path(tempfile.mkdtemp(prefix="cni-redirect-datapath-"))
    sidecar = None
    try:
        sidecar = Sidecar(root)
        capture(sidecar)
        yield sidecar
    finally:
        if sidecar is not None:
            sidecar.close()
        shutil.rmtree(root, ignore_errors=True)


def bench_datapath_side_by_side(seconds: float = 5.0, rounds: int = 5, variants: dict | None = None) -> dict:
    """Every variant `rounds` times in shuffled order; each figure is the median over rounds."""
    variants = variants or VARIANTS
    samples: dict[str, dict[str, list[dict]]] = {name: {load: [] for load in LOADS} for name in variants}
    facts: dict[str, dict[str, int]] = {}
    names = list(variants)
    for index in range(rounds):
        random.Random(index).shuffle(names)
        for name in names:
            capture, target = variants[name]
            with sidecar_for(capture) as sidecar:
                sidecar.wrk(target, "keep-alive", 1.0)  # warm-up, discarded
                for load in LOADS:
                    samples[name][load].append(sidecar.wrk(target, load, seconds))
                for read in sidecar.facts:
                    for key, value in read().items():
                        facts.setdefault(name, {}).setdefault(key, 0)
                        facts[name][key] += value
    explicit = "(b) app dials the proxy explicitly"
    results: dict = {}
    for name, loads in samples.items():
        results[name] = {}
        for load, runs in loads.items():
            row = {key: _median(r[key] for r in runs) for key in runs[0] if key != "app_mss"}
            row["app_mss"] = runs[-1]["app_mss"]  # the same in every round; the rcvbuf is a median
            row["failed"] = sum(r["failed"] for r in runs)
            row["rounds"] = len(runs)
            results[name][load] = row
    for loads in results.values():
        for load, row in loads.items():
            base = results[explicit][load]
            row["rps_vs_explicit"] = row["rps"] / base["rps"]
            row["mb_s_vs_explicit"] = row["mb_s"] / base["mb_s"]
    return {"loads": results, "facts": facts, "seconds": seconds, "rounds": rounds, "bulk_mb": BULK_MB}
