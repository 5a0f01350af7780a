"""`inspect` and `doctor` on a real containerd, with real processes in real pod netns.

The CLI runs as an admin runs it on the node: `cni-redirect inspect|doctor --cri-socket ... --cni-conf-dir ...`.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from cni_redirect.testing.containerd import GATEWAY
from cni_redirect.testing.netlab import HOST, PLUGIN, Netns, connect, enabled


def cli(containerd, *args: str) -> subprocess.CompletedProcess:
    runtime = containerd.runtime
    flags = [f"--cri-socket={runtime.socket}", f"--cni-conf-dir={runtime.conf_dir}"]
    return subprocess.run([str(PLUGIN), *args, *flags], capture_output=True, text=True, timeout=120)


def inspect(containerd) -> dict[str, dict]:
    run = cli(containerd, "inspect", "--json")
    assert run.returncode == 0, run.stderr
    return {row["name"]: row for row in json.loads(run.stdout)}


def doctor(containerd) -> tuple[int, list[dict]]:
    run = cli(containerd, "doctor", "--json")
    assert run.returncode in (0, 1), run.stderr
    return run.returncode, json.loads(run.stdout)


@pytest.fixture
def clean(containerd):
    """Every test starts and ends with no pod: doctor's exit code speaks of the whole node."""
    containerd.remove_all()
    yield containerd
    containerd.remove_all()


def test_inspect_reports_every_state(clean, procs):
    containerd = clean
    ok = containerd.run_pod("ok", annotations=enabled())
    missing = containerd.run_pod("missing", annotations=enabled())
    drifted = containerd.run_pod("drifted", annotations=enabled())
    containerd.run_pod("plain")
    containerd.run_pod("system", namespace="kube-system", annotations=enabled())
    containerd.run_pod("hostnet", annotations=enabled(), host_network=True)
    Netns.at(containerd.netns(missing)).run("nft", "delete", "table", "inet", "cni_redirect")
    Netns.at(containerd.netns(drifted)).run(
        "nft", "add", "rule", "inet", "cni_redirect", "output", "tcp", "dport", "9", "return"
    )

    rows = inspect(containerd)
    assert {name: (row["decision"], row["state"]) for name, row in rows.items()} == {
        "ok": ("captured", "ok"),
        "missing": ("captured", "missing"),
        "drifted": ("captured", "drifted"),
        "plain": ("not-enabled", None),
        "system": ("excluded-namespace", None),
        "hostnet": ("host-network", None),
    }
    assert set(rows["ok"]) >= {"namespace", "name", "sandbox_id", "decision", "state", "counters"}
    assert rows["ok"]["sandbox_id"] == ok and rows["ok"]["namespace"] == "default"
    assert "is missing" in rows["missing"]["drift"] and "differs" in rows["drifted"]["drift"]
    assert rows["plain"]["counters"] == {} and rows["ok"]["counters"]["outbound_redirected"]["packets"] == 0

    netns = Netns.at(containerd.netns(ok))
    procs.listen(netns, "proxy-out", 15001, uid=1337)
    procs.listen(HOST, "peer", 18801, bind=GATEWAY)
    for _ in range(3):
        assert connect(netns, GATEWAY, 18801, uid=1000)["listener"] == "proxy-out"
    assert connect(netns, GATEWAY, 18801, uid=1337)["listener"] == "peer"
    after = inspect(containerd)["ok"]["counters"]
    assert after["outbound_redirected"]["packets"] == 3, after
    assert after["proxy_exempt"]["packets"] >= 1 and after["outbound_redirected"]["bytes"] > 0

    human = cli(containerd, "inspect")
    lines = human.stdout.splitlines()
    assert human.returncode == 0 and lines[0].startswith("chain mode: edit: our entry inlined in ")
    assert lines[1].startswith("NAMESPACE/NAME")
    assert any(line.split()[:3] == ["default/ok", "captured", "ok"] for line in human.stdout.splitlines())
    detail = cli(containerd, "inspect", "--pod", "default/ok")
    assert detail.returncode == 0, detail.stderr
    assert "annotation cni-redirect.io/enabled" in detail.stdout and "built-in default" in detail.stdout
    assert "counter packets 3 bytes" in detail.stdout and 'comment "capture outbound"' in detail.stdout


def _captured_pod_with_proxy(containerd, procs, name: str, uid: int = 1337, **annotations: str) -> Netns:
    pod = containerd.run_pod(name, annotations=enabled(**annotations))
    netns = Netns.at(containerd.netns(pod))
    procs.listen(netns, "proxy", int(annotations.get("outbound_port", "15001")), uid=uid, program="envoy")
    return netns


def test_doctor_catches_the_seeds_uid_101_trap_and_passes_the_fix(clean, procs):
    containerd = clean
    netns = _captured_pod_with_proxy(
        containerd, procs, "web", uid=101, proxy_uid="101", outbound_port="10000", inbound_port="10000"
    )
    nginx = procs.listen(netns, "nginx", 8080, uid=101, program="nginx")
    rc, findings = doctor(containerd)
    assert rc == 1
    (finding,) = findings
    assert finding["check"] == "proxy-uid" and finding["pod"] == "default/web"
    assert finding["message"].startswith(f"default/web: nginx (pid {nginx.pid}) runs as UID 101, the proxy UID")
    human = cli(containerd, "doctor")
    assert human.returncode == 1 and "FOUND  default/web: nginx" in human.stdout
    assert human.stdout.startswith("chain mode: edit: our entry inlined in ")

    nginx.kill()
    nginx.wait()
    procs.listen(netns, "nginx", 8080, uid=102, program="nginx")  # the fix: the app on a UID of its own
    rc, findings = doctor(containerd)
    assert (rc, findings) == (0, [])
    assert cli(containerd, "doctor").stdout.strip().endswith("no trap found")


def test_doctor_finds_an_exempt_uid_that_outlives_the_init_containers(clean, procs):
    containerd = clean
    netns = _captured_pod_with_proxy(containerd, procs, "batch", exclude_uids="1000")
    procs.listen(netns, "job", 9000, uid=1000, program="curl")
    assert doctor(containerd) == (0, []), "no container started after it yet: it may be an init container"
    time.sleep(0.05)
    pod = containerd.list_sandboxes()[0].id
    containerd.start_container(pod, "app")
    rc, findings = doctor(containerd)
    assert rc == 1 and [f["check"] for f in findings] == ["exempt"]
    assert "curl (pid" in findings[0]["message"] and "in exclude-uids" in findings[0]["message"]


def test_doctor_finds_a_proxy_port_taken_by_the_app(clean, procs):
    containerd = clean
    netns = _captured_pod_with_proxy(containerd, procs, "squat")
    procs.listen(netns, "app", 15006, uid=1000, program="python3")
    rc, findings = doctor(containerd)
    assert rc == 1 and [f["check"] for f in findings] == ["port"]
    assert "listens on 15006, one of the proxy's ports" in findings[0]["message"]


def test_doctor_reports_missing_and_drifted_tables(clean, procs):
    containerd = clean
    netns = _captured_pod_with_proxy(containerd, procs, "lost")
    netns.run("nft", "delete", "table", "inet", "cni_redirect")
    rc, findings = doctor(containerd)
    assert rc == 1 and [f["check"] for f in findings] == ["table"]
    assert "is missing from the pod network namespace" in findings[0]["message"]
