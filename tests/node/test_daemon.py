"""The node agent's process (`run`) in a thread, as the DaemonSet runs it: waiting, rewrites, readiness, settings."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import NODE_SETTINGS as SETTINGS
from tests.support import AgentThread as Agent
from tests.support import wait_for


def test_agent_waits_for_primary_then_keeps_entry_through_50_rewrites(host, tmp_path):
    entry_file = tmp_path / "entry.json"
    entry_file.write_text(json.dumps(SETTINGS))
    agent = Agent(host, entry_file=entry_file)
    try:
        wait_for(lambda: any("waiting for the primary" in e["msg"] for e in host.events()))
        original = host.put("10-calico.conflist")
        wait_for(lambda: (host.conf / "10-calico.conflist").read_bytes() != original)
        latencies = []
        for index in range(50):
            document = json.loads(original)
            document["plugins"][0]["mtu"] = index  # the primary rewrites its own file, without our entry
            rewritten = json.dumps(document, indent=4).encode()
            host.put("10-calico.conflist", rewritten)
            latencies.append(wait_for(lambda: len(host.entries("10-calico.conflist")) == 1))
        final = json.loads((host.conf / "10-calico.conflist").read_text())
        assert len([p for p in final["plugins"] if p["type"] == "cni-redirect"]) == 1
        assert final["plugins"][0]["mtu"] == 49, "the primary's last write is kept"
        print(f"\n[installer] re-insert latency over 50 rewrites: max {max(latencies) * 1000:.0f} ms")

        def writes() -> int:
            return sum(1 for e in host.events() if e["msg"] == "added our entry to the primary CNI config")

        # One write for the first insert and one per rewrite; the log line follows the rename, so wait for it.
        wait_for(lambda: writes() == 51)
        time.sleep(0.3)
        assert writes() == 51, "no rewrite when nothing changed"
    finally:
        assert agent.terminate() == 0
    last = json.loads(original)
    last["plugins"][0]["mtu"] = 49
    assert (host.conf / "10-calico.conflist").read_bytes() == json.dumps(last, indent=4).encode()
    assert sorted(os.listdir(host.bin)) == ["bridge"]


@pytest.mark.parametrize("address", ["127.0.0.1", "[::1]"], ids=["ipv4", "ipv6"])
def test_agent_readiness_endpoint(host, address):
    """Probes and scrapes answer on both families: an IPv6 single-stack cluster probes over IPv6."""
    agent = Agent(host, readiness_port=18399)
    try:

        def status() -> int:
            try:
                return urllib.request.urlopen(f"http://{address}:18399/readyz", timeout=2).status
            except urllib.error.HTTPError as exc:
                return exc.code
            except OSError:
                return 0

        wait_for(lambda: status() == 503)
        host.put("10-flannel.conflist")
        wait_for(lambda: status() == 200)
        (host.conf / "10-flannel.conflist").write_text("{ broken")
        wait_for(lambda: status() == 503)
    finally:
        agent.terminate()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"defaults": {"outbound-port": "http"}}, "outbound-port"),
        # Valid without the profile; under it, Istio's always-excluded ports exceed 2: every injected pod would fail.
        ({"profile": "istio", "max_set_elements": 2}, "max_set_elements"),
        ({"profile": "linkerd", "defaults": {"proxy-uid": "0"}}, "allow_root_proxy_uid"),
        ([1], "must hold a JSON object"),
    ],
    ids=["bad-value", "istio-limit", "linkerd-root", "not-an-object"],
)
def test_agent_refuses_invalid_settings(host, tmp_path, settings, named):
    entry_file = tmp_path / "entry.json"
    entry_file.write_text(json.dumps(settings))
    host.put("10-calico.conflist")
    agent = Agent(host, entry_file=entry_file)
    assert agent.terminate() == 2
    (error,) = [e for e in host.events() if e["level"] == "error"]
    assert named in error["error"]
    assert sorted(os.listdir(host.bin)) == ["bridge"], "nothing installed"
    assert host.entries("10-calico.conflist") == [], "nothing chained"


def test_agent_refuses_an_entry_file_it_cannot_read(host, tmp_path):
    agent = Agent(host, entry_file=tmp_path / "missing.json")
    assert agent.terminate() == 2
    (error,) = [e for e in host.events() if e["level"] == "error"]
    assert "missing.json: cannot be read" in error["error"]


def test_a_successor_takes_over_and_the_old_agent_leaves_everything_in_place(host):
    host.put("10-calico.conflist")
    old = Agent(host)
    wait_for(lambda: bool(host.entries("10-calico.conflist")))
    new = Agent(host)
    wait_for(lambda: any(e["msg"].startswith("a newer node agent took over") for e in host.events()))
    assert old.terminate() == 0
    assert len(host.entries("10-calico.conflist")) == 1 and (host.bin / "cni-redirect").exists()
    assert any(e["msg"].startswith("stopping: a newer agent runs this node") for e in host.events())
    assert new.terminate() == 0, "the last agent uninstalls"
    assert not host.entries("10-calico.conflist") and sorted(os.listdir(host.bin)) == ["bridge"]


def test_sigterm_waits_for_a_successor_before_uninstalling(host):
    host.put("10-calico.conflist")
    old = Agent(host, handover_wait=10.0)
    wait_for(lambda: bool(host.entries("10-calico.conflist")))
    old.stop.set()  # SIGTERM, before the successor has even started
    new = Agent(host)
    assert old.terminate() == 0
    assert len(host.entries("10-calico.conflist")) == 1, "the old agent saw the successor arrive and handed over"
    assert new.terminate() == 0
    assert sorted(os.listdir(host.bin)) == ["bridge"] and not host.entries("10-calico.conflist")


def test_sigterm_without_a_successor_uninstalls_everything(host):
    original = host.put("10-calico.conflist")
    agent = Agent(host, handover_wait=0.2)
    wait_for(lambda: bool(host.entries("10-calico.conflist")))
    assert agent.terminate() == 0
    assert (
        sorted(os.listdir(host.conf)) == ["10-calico.conflist"]
        and (host.conf / "10-calico.conflist").read_bytes() == original
    )
    assert sorted(os.listdir(host.bin)) == ["bridge"], "bundle, link and owner token gone"


def test_agent_socket_outside_the_trusted_dir_is_refused(host):
    agent = Agent(host, agent_socket=Path("/tmp/agent.sock"))
    assert agent.terminate() == 2
    assert any("--agent-socket" in e.get("error", "") for e in host.events())


def test_readyz_carries_the_warning_while_ready(host):
    host.put("10-calico.conflist")
    host.put("20-stale-entry.conflist")
    agent = Agent(host, readiness_port=18398)
    try:

        def body() -> str:
            try:
                return urllib.request.urlopen("http://127.0.0.1:18398/readyz", timeout=2).read().decode()
            except OSError:
                return ""

        wait_for(lambda: body().startswith("ok"))
        assert "warning: other network configs exist (20-stale-entry.conflist)" in body()
    finally:
        agent.terminate()


def test_a_failing_iteration_makes_the_agent_unready_and_is_retried_never_an_uninstall(host, tmp_path):
    """The plugin vanishes from the bin dir and cannot be reinstalled (its source is gone too): the loop logs it,
    turns unready with the reason, keeps the entry, and recovers once it can reinstall."""
    import shutil

    host.put("10-calico.conflist")
    source = tmp_path / "source"
    shutil.copytree(host.bundle, source, symlinks=True)
    agent = Agent(host, plugin_source=source, readiness_port=18398, recheck_interval=0.2)

    def readyz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen("http://127.0.0.1:18398/readyz", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    try:
        wait_for(lambda: readyz()[0] == 200)
        shutil.rmtree(source)
        (host.bin / "cni-redirect").unlink()
        wait_for(lambda: readyz()[0] == 503)
        assert "cannot keep the plugin installed" in readyz()[1] and "does not exist" in readyz()[1]
        assert agent.thread.is_alive() and host.entries("10-calico.conflist"), "entry kept, agent still running"
        shutil.copytree(host.bundle, source, symlinks=True)
        wait_for(lambda: readyz()[0] == 200)
        assert (host.bin / "cni-redirect").exists()
    finally:
        agent.terminate()
    errors = [e for e in host.events() if e["level"] == "error"]
    assert len(errors) == 1, "the failure is logged once, not once per retry"


@pytest.mark.slow
def test_idle_connections_cost_a_bounded_number_of_threads_and_are_closed(host):
    """Idle connections made a thread each, open for good (600 from one client: 600 threads): now 100 of them
    cost at most 16 threads, the rest are closed on arrival, and an idle one is closed after its 5 s read
    timeout."""
    import socket
    import threading

    agent = Agent(host, readiness_port=18397)
    idle = []
    try:
        wait_for(lambda: _port_open(18397))
        before = threading.active_count()
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", 18397), timeout=5))
        time.sleep(0.5)
        assert threading.active_count() - before <= 16 + 2
        closed = 0
        for conn in idle:
            conn.settimeout(8)
            try:
                closed += conn.recv(1) == b""
            except OSError:
                closed += 1
        assert closed == len(idle), "every idle connection ends: at once past the cap, else by the read timeout"
        assert _port_open(18397)
    finally:
        for conn in idle:
            conn.close()
        agent.terminate()


def _port_open(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
