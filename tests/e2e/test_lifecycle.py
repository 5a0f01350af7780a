"""A node never starts a pod uncaptured: repair, handover, a killed agent, uninstall, on a real containerd.

The node agent is the bundle's own executable, as in the image, serving CNI
requests and repairing through containerd's CRI socket. The node's conflist
starts without us (`bare_containerd`); containerd reloads it live.
"""

from __future__ import annotations

import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from cni_redirect.cri import CriClient
from cni_redirect.node.chaining.confdir import read_conf_dir
from cni_redirect.node.pods.nftevents import NftablesEvents
from cni_redirect.node.pods.repair import Repairer
from cni_redirect.testing.containerd import GATEWAY
from cni_redirect.testing.netlab import HOST, Netns, connect, enabled, host_ruleset
from cni_redirect.testing.nodeagent import NodeAgentProcess
from tests.support import wait_for

PROXY_UID, APP_UID = 1337, 1000
INTERVAL = 1.0


@pytest.fixture
def node(bare_containerd, bundle, tmp_path):
    """The private containerd's node, and a way to start node agents on it; everything stopped afterwards."""
    runtime = bare_containerd.runtime
    agents: list[NodeAgentProcess] = []

    def start(*extra: str, entry_settings: dict | None = None, **kwargs) -> NodeAgentProcess:
        entry = {"log_file": str(runtime.log_path), "exclude_namespaces": ["kube-system"], **(entry_settings or {})}
        agent = NodeAgentProcess(
            bundle / "cni-redirect",
            runtime.bin_dir,
            runtime.conf_dir,
            bundle,
            entry,
            tmp_path,
            str(runtime.socket),
            extra=(f"--repair-interval={INTERVAL}", *extra),
            **kwargs,
        )
        agents.append(agent)
        return agent

    conf_before = {p.name: p.read_bytes() for p in runtime.conf_dir.iterdir()}
    yield bare_containerd, start
    for agent in agents:
        if agent.proc.poll() is None:
            agent.terminate()
    # A stopped agent leaves entry and plugin (each DEL would then run in-process, ~0.7 s a pod): the
    # explicit step removes them first, then the pods go.
    removed = uninstall(bundle, runtime)
    assert removed.returncode == 0, removed.stderr
    bare_containerd.wait_for_reload(expect_plugin=False)
    bare_containerd.remove_all()
    assert {p.name: p.read_bytes() for p in runtime.conf_dir.iterdir()} == conf_before


def uninstall(bundle: Path, runtime, *extra: str) -> subprocess.CompletedProcess:
    """`cni-redirect uninstall`, the bundle's own command, as the uninstall DaemonSet runs it."""
    argv = [str(bundle / "cni-redirect"), "uninstall", f"--cni-bin-dir={runtime.bin_dir}"]
    argv += [f"--cni-conf-dir={runtime.conf_dir}", "--uninstall-grace=0.5", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def has_table(client, pod: str) -> bool:
    return "table inet cni_redirect" in Netns.at(client.netns(pod)).ruleset()


def assert_captured(client, procs, pod: str, port: int) -> None:
    netns = Netns.at(client.netns(pod))
    procs.listen(netns, f"proxy-{port}", 15001, uid=PROXY_UID)
    procs.listen(HOST, f"peer-{port}", port, bind=GATEWAY)
    answer = connect(netns, GATEWAY, port, uid=APP_UID)
    assert (answer["listener"], answer["original_dst"]) == (f"proxy-{port}", f"{GATEWAY}:{port}"), answer


def adds(client, pod: str) -> list[dict]:
    return [e for e in client.runtime.events(pod) if e["command"] == "ADD"]


def test_pods_that_started_before_the_agent_are_put_right_within_one_interval(node, procs):
    client, start = node
    host_before = host_ruleset()
    annotated = client.run_pod("early-annotated", annotations=enabled())
    plain = client.run_pod("early-plain")
    system = client.run_pod("early-system", namespace="kube-system", annotations=enabled())
    hostnet = client.run_pod("early-hostnet", annotations=enabled(), host_network=True)
    assert not any(has_table(client, p) for p in (annotated, plain, system)), "nothing chained us yet"

    agent = start()
    agent.wait_ready()
    ready_at = time.monotonic()
    wait_for(lambda: has_table(client, annotated), timeout=INTERVAL + 5)
    print(f"\n[lifecycle] pre-existing annotated pod captured {time.monotonic() - ready_at:.2f} s after ready")
    assert_captured(client, procs, annotated, 18601)
    assert not has_table(client, plain) and not has_table(client, system)
    assert host_ruleset() == host_before, "the host-network sandbox (the host's netns) was not touched"
    repaired = [line for line in agent.lines if line["msg"].startswith("repaired")]
    assert [line["pod"] for line in repaired] == ["default/early-annotated"]
    assert "is missing from the pod network namespace" in repaired[0]["msg"]
    status, metrics = agent.get("/metrics")
    assert status == 200
    assert 'cni_redirect_repairs_total{reason="missing"} 1.0' in metrics
    wait_for(lambda: 'cni_redirect_pods{state="ok"} 1.0' in agent.get("/metrics")[1], timeout=INTERVAL + 5)
    assert 'cni_redirect_pods{state="host-network"} 1.0' in agent.get("/metrics")[1]
    assert hostnet
    assert agent.terminate() == 0


def test_a_deleted_table_is_restored_and_report_mode_only_logs_it(node):
    client, start = node
    agent = start()
    agent.wait_ready()
    client.wait_for_reload(expect_plugin=True)
    pod = client.run_pod("tampered", annotations=enabled())
    assert has_table(client, pod)
    netns = Netns.at(client.netns(pod))
    netns.run("nft", "delete", "table", "inet", "cni_redirect")
    wait_for(lambda: has_table(client, pod), timeout=INTERVAL + 5)
    assert any(line["msg"].startswith("repaired default/tampered") for line in agent.lines)
    assert agent.terminate() == 0

    reporter = start("--repair=report")
    reporter.wait_ready()
    netns.run("nft", "delete", "table", "inet", "cni_redirect")
    reporter.wait_for_message("repair needed: default/tampered", timeout=INTERVAL + 5)
    time.sleep(INTERVAL)
    assert not has_table(client, pod), "report mode changes nothing"
    assert reporter.terminate() == 0


def test_a_tproxy_pods_lost_route_is_restored_through_the_cni_server(node):
    client, start = node
    agent = start()
    agent.wait_ready()
    client.wait_for_reload(expect_plugin=True)
    pod = client.run_pod("tproxy", annotations=enabled(inbound_mode="tproxy"))
    (add,) = adds(client, pod)
    assert (add["outcome"], add["via"]) == ("captured", "cni-server")  # the routes went in from the agent's thread
    netns = Netns.at(client.netns(pod))

    def routes() -> str:
        return netns.run("ip", "route", "show", "table", "133", check=False).stdout

    assert "local default dev lo" in routes()
    netns.run("ip", "route", "del", "local", "default", "dev", "lo", "table", "133")
    repaired = agent.wait_for_message("repaired default/tproxy", timeout=INTERVAL + 5)
    assert "TPROXY policy routing is missing" in repaired["msg"], repaired
    assert "local default dev lo" in routes()
    client.stop_pod(pod)
    client.remove_pod(pod)
    assert agent.terminate() == 0


def test_handover_under_continuous_pod_creation(node):
    client, start = node
    conflist = next(client.runtime.conf_dir.glob("*.conflist"))
    first = start()
    first.wait_ready()
    client.wait_for_reload(expect_plugin=True)

    stop = threading.Event()
    samples: list[bool] = []
    created: list[str] = []
    failures: list[str] = []

    def sample() -> None:
        while not stop.is_set():
            samples.append(read_conf_dir(conflist.parent).entry() is not None)  # inlined or its drop-in
            time.sleep(0.01)

    def create(worker: int) -> None:
        index = 0
        while not stop.is_set():
            try:
                created.append(client.run_pod(f"surge-{worker}-{index}", annotations=enabled()))
            except grpc.RpcError as exc:
                failures.append(exc.details() or str(exc))
            index += 1

    threads = [threading.Thread(target=sample), *(threading.Thread(target=create, args=(w,)) for w in range(3))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        second = start(socket=first.socket)  # the surge: the new pod starts before the old one stops
        second.wait_for_message("agent started")
        first.wait_for_message("a newer node agent took over")
        assert first.terminate() == 0
        assert any(m.startswith("stopping: a newer agent runs this node") for m in first.messages())
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    uncaptured = [pod for pod in created if not has_table(client, pod)]
    print(f"\n[lifecycle] handover: {len(created)} pods created, {len(failures)} failed, {len(uncaptured)} uncaptured")
    assert not failures and not uncaptured and len(created) >= 6
    assert samples and all(samples), f"the entry vanished in {samples.count(False)} of {len(samples)} samples"
    assert second.terminate() == 0


def test_a_killed_agent_costs_speed_not_capture(node, procs):
    client, start = node
    agent = start()
    agent.wait_ready()
    client.wait_for_reload(expect_plugin=True)
    agent.kill()
    orphan = client.run_pod("after-kill", annotations=enabled())
    assert has_table(client, orphan)
    assert_captured(client, procs, orphan, 18602)
    (add,) = adds(client, orphan)
    assert "did not answer" in add["fallback"], "done in-process by the front"

    again = start(socket=agent.socket)
    again.wait_ready()
    served = client.run_pod("after-restart", annotations=enabled())
    (add,) = adds(client, served)
    assert add["outcome"] == "captured" and add.get("fallback") is None, "served by the restarted agent's CNI server"
    assert again.terminate() == 0


def test_a_stopped_agent_leaves_capture_working_and_uninstall_leaves_nothing(node, bundle):
    """SIGTERM keeps entry and plugin: a pod started with no agent is captured in-process. `uninstall` refuses
    while an agent runs, then restores the node: the conflist byte for byte (the fixture checks), the bin dir."""
    client, start = node
    runtime = client.runtime
    bin_before = sorted(p.name for p in runtime.bin_dir.iterdir())
    agent = start()
    agent.wait_ready()
    client.wait_for_reload(expect_plugin=True)
    old = client.run_pod("before-uninstall", annotations=enabled())
    assert has_table(client, old)
    refused = uninstall(bundle, runtime)
    assert refused.returncode == 2 and "still running on this node" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, "one line, no traceback"
    assert agent.terminate() == 0
    assert not Path(agent.socket).exists(), "its own socket goes with it"
    unattended = client.run_pod("no-agent", annotations=enabled())
    (add,) = adds(client, unattended)
    assert has_table(client, unattended) and add["via"] == "in-process", add
    done = uninstall(bundle, runtime)
    assert done.returncode == 0, done.stderr + done.stdout
    assert sorted(p.name for p in runtime.bin_dir.iterdir()) == bin_before, "bundle, link, owner files gone"
    client.wait_for_reload(expect_plugin=False)
    new = client.run_pod("after-uninstall", annotations=enabled())
    assert not has_table(client, new) and not adds(client, new)
    for pod in (old, unattended):
        client.stop_pod(pod)
        client.remove_pod(pod)  # the node fixture then checks the conf dir is byte-identical


def test_repair_of_a_hundred_sandboxes_in_one_pass(node):
    client, start = node
    with ThreadPoolExecutor(max_workers=8) as pool:
        pods = list(pool.map(lambda i: client.run_pod(f"load-{i}", annotations=enabled()), range(100)))
    agent = start("--repair=off")
    agent.wait_ready()
    lines: list[dict] = []
    repairer = Repairer(CriClient(str(client.runtime.socket)), client.runtime.conf_dir, lambda *a, **k: lines.append(k))
    try:
        first = repairer.run_once()
        second = repairer.run_once()
    finally:
        repairer.close()
    assert first.error == "" and len(first.repaired) == 100 and first.states["ok"] == 100
    assert second.repaired == [] and second.states["ok"] == 100
    assert all(has_table(client, pod) for pod in pods)
    print(
        f"\n[lifecycle] repair pass over 100 sandboxes: {first.seconds:.2f} s repairing all "
        f"({first.seconds * 10:.1f} ms per pod), {second.seconds:.2f} s when all are ok"
    )
    assert agent.terminate() == 0


def test_repair_hears_which_pods_had_a_transaction_and_enters_no_other(node):
    """Real containerd pods (bridge: a veth to the node gives each netns an id there): once every pod was read
    after the last transaction, a pass enters no netns at all; a table deleted in one pod is heard, and only
    that pod is read and put right."""
    client, start = node
    with ThreadPoolExecutor(max_workers=8) as pool:
        pods = list(pool.map(lambda i: client.run_pod(f"heard-{i}", annotations=enabled()), range(10)))
    agent = start("--repair=off")
    agent.wait_ready()
    events = NftablesEvents.open()
    repairer = Repairer(CriClient(str(client.runtime.socket)), client.runtime.conf_dir, lambda *a, **k: None,
                        events=events)  # fmt: skip
    try:
        assert len(repairer.run_once().repaired) == 10
        repairer.run_once()  # our own repairs were heard: each pod read once more
        quick = repairer.memo.quick
        quiet = repairer.run_once()
        assert quiet.repaired == [] and quiet.states["ok"] == 10
        assert repairer.memo.heard == 10 and repairer.memo.quick == quick, "not one netns entered"
        Netns.at(client.netns(pods[4])).run("nft", "delete", "table", "inet", "cni_redirect")
        healed = repairer.run_once()
        assert healed.repaired == ["default/heard-4"] and healed.reasons == {"missing": 1}
        assert repairer.memo.heard == 19, "the other nine were not entered"
    finally:
        repairer.close()
        events.close()
    assert all(has_table(client, pod) for pod in pods)
    assert agent.terminate() == 0


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.slow
def test_a_pod_that_fills_its_netns_cannot_blow_the_agents_memory(node, tmp_path):
    """A pod with NET_ADMIN in its own netns adds 300 000 elements to our table and 40 000 policy rules. The
    agent's repair pass counts the table from a stream (never lists it), calls it drifted and replaces it;
    the routing is read as a stream too, and DEL removes it all. The agent's peak RSS stays far below the
    DaemonSet's 192 Mi limit (it was 269 MiB for one read of that table)."""
    client, start = node
    agent = start(entry_settings={"defaults": {"exclude-interfaces": "eth9"}})
    agent.wait_ready()
    client.wait_for_reload(expect_plugin=True)
    pod = client.run_pod("hostile", annotations=enabled())
    netns = Netns.at(client.netns(pod))
    assert "exclude_ifaces" in netns.ruleset()
    baseline = _peak_rss_mib(agent.proc.pid)  # before the pod fills anything (repair runs every second)
    batch = tmp_path / "elements.nft"
    with batch.open("w") as out:
        for chunk in range(30):
            names = ", ".join(f'"x{chunk}-{i}"' for i in range(10_000))
            out.write(f"add element inet cni_redirect exclude_ifaces {{ {names} }}\n")
    netns.run("nft", "-f", str(batch))
    rules = tmp_path / "rules.batch"
    rules.write_text(
        "".join(
            f"rule add from 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255} table 100 pref {41_000 - i}\n"
            for i in range(40_000)
        )
    )
    netns.run("ip", "-batch", str(rules))
    wait_for(lambda: any(m.startswith("repaired default/hostile") for m in agent.messages()), timeout=60)
    (repaired,) = [line for line in agent.lines if line.get("msg", "").startswith("repaired default/hostile")]
    assert "far larger than what the pod's annotations require" in repaired["msg"], repaired
    assert netns.ruleset().count('"x') == 0, "the table was replaced with the one the pod should have"
    after_repair = _peak_rss_mib(agent.proc.pid)
    client.stop_pod(pod)  # DEL through the agent's CNI server: the table and our routing (none) go
    after_del = _peak_rss_mib(agent.proc.pid)
    (delete,) = [e for e in client.runtime.events(pod) if e["command"] == "DEL"]
    assert delete["via"] == "cni-server" and "error" not in delete, delete
    print(
        f"\n[lifecycle] agent peak RSS: {baseline:.0f} MiB before the pod filled its netns, "
        f"{after_repair:.0f} MiB after the repair pass, {after_del:.0f} MiB after DEL (limit 192 MiB)"
    )
    assert after_del < 192
    client.remove_pod(pod)
    assert agent.terminate() == 0


@pytest.mark.slow
def test_a_pod_that_never_opted_in_cannot_oom_the_agent_with_a_table_of_a_million_chains(node, tmp_path):
    """#36 item 4: a pod with NET_ADMIN that never opted in creates `table inet cni_redirect` with a million empty
    chains. Repair removes a table where none belongs; libnftables' `delete table` would load it whole first
    (the agent was OOM-killed at its 192 Mi limit with 150 000 chains). It goes by one netlink message now, by
    the table's handle: the agent's peak RSS is measured before and after."""
    client, start = node
    agent = start(entry_settings={"defaults": {"proxy-uid": "1337"}})
    agent.wait_ready()
    client.wait_for_reload(expect_plugin=True)
    pod = client.run_pod("bystander")  # no annotation: not captured, no table of ours
    netns = Netns.at(client.netns(pod))
    assert "cni_redirect" not in netns.ruleset()
    baseline = _peak_rss_mib(agent.proc.pid)
    batch = tmp_path / "chains.nft"
    with batch.open("w") as out:
        out.write("add table inet cni_redirect\n")
        out.writelines(f"add chain inet cni_redirect pod_{i}\n" for i in range(1_000_000))
    netns.run("nft", "-f", str(batch))
    batch.unlink()
    wait_for(lambda: any(m.startswith("repaired default/bystander") for m in agent.messages()), timeout=120)
    assert "cni_redirect" not in netns.ruleset(), "the table where none belongs is gone"
    after = _peak_rss_mib(agent.proc.pid)
    print(f"\n[lifecycle] agent peak RSS: {baseline:.0f} MiB before, {after:.0f} MiB after removing a table of "
          "1 000 000 chains a pod made (limit 192 MiB)")  # fmt: skip
    assert after < 192 and agent.proc.poll() is None
    client.remove_pod(pod)
    assert agent.terminate() == 0
