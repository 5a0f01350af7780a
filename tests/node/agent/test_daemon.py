"""The node agent's process (`run`) in a thread, as the DaemonSet runs it: waiting, rewrites, readiness, settings."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from unittest import mock

import pytest

from cni_redirect.errors import NodeError
from cni_redirect.logs import JsonLog
from cni_redirect.node.admin.uninstall import leftovers, uninstall
from cni_redirect.node.agent.ownership import Ownership
from cni_redirect.node.agent.probe import ask
from tests.support import NODE_SETTINGS as SETTINGS
from tests.support import AgentThread as Agent
from tests.support import free_port, wait_for


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
    assert len(host.entries("10-calico.conflist")) == 1, "stopping keeps the entry"
    assert uninstall(host.bin, host.conf, JsonLog(host.log), grace=0.0) == []
    last = json.loads(original)
    last["plugins"][0]["mtu"] = 49
    assert (host.conf / "10-calico.conflist").read_bytes() == json.dumps(last, indent=4).encode()
    assert sorted(os.listdir(host.bin)) == ["bridge"]


@pytest.mark.parametrize("address", ["127.0.0.1", "[::1]"], ids=["ipv4", "ipv6"])
def test_agent_readiness_endpoint(host, address):
    """Probes and scrapes answer on both families: an IPv6 single-stack cluster probes over IPv6."""
    port = free_port()
    agent = Agent(host, readiness_port=port)
    try:

        def status() -> int:
            try:
                return urllib.request.urlopen(f"http://{address}:{port}/readyz", timeout=2).status
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
    assert new.terminate() == 0
    assert len(host.entries("10-calico.conflist")) == 1, "the last agent's stop is no uninstall either"


def test_a_stop_is_never_an_uninstall_and_uninstall_restores_the_node(host):
    """SIGTERM comes from liveness restarts and drains as well as from deleting the DaemonSet: entry and bundle
    stay (the plugin works in-process meanwhile). `uninstall` restores the primary byte for byte."""
    original = host.put("10-calico.conflist")
    agent = Agent(host)
    wait_for(lambda: bool(host.entries("10-calico.conflist")))
    with pytest.raises(NodeError, match="still running on this node"):
        uninstall(host.bin, host.conf, JsonLog(host.log), grace=0.0)
    assert agent.terminate() == 0
    assert host.entries("10-calico.conflist") and os.access(host.bin / "cni-redirect", os.X_OK)
    restarted = Agent(host)  # the container's restart: it adopts what is there
    wait_for(lambda: any(e["msg"] == "agent started" for e in host.events()))
    assert restarted.terminate() == 0
    assert len(host.entries("10-calico.conflist")) == 1
    assert leftovers(host.bin, host.conf)[0] != []
    assert uninstall(host.bin, host.conf, JsonLog(host.log), grace=0.0) == []
    assert sorted(os.listdir(host.conf)) == ["10-calico.conflist"]
    assert (host.conf / "10-calico.conflist").read_bytes() == original
    assert sorted(os.listdir(host.bin)) == ["bridge"], "bundle, link, owner token and agents' locks gone"
    assert leftovers(host.bin, host.conf) == ([], [])


def test_probes_reach_only_their_own_agent_through_a_surge(host, tmp_path):
    """Host network: both surge pods share every port. The exec probe asks its own agent: the new one is not
    ready while it installs (here: waiting for the install lock, as on a slow disk), the old one stays the
    owner and ready until the new one has claimed the node."""
    host.put("10-calico.conflist")
    old_probe, new_probe = tmp_path / "old" / "probe.sock", tmp_path / "new" / "probe.sock"
    old = Agent(host, probe_socket=old_probe)
    new = None
    try:
        wait_for(lambda: ask(str(old_probe), "ready")[0])
        with Ownership(host.bin).installing():  # the new agent's install cannot finish
            new = Agent(host, probe_socket=new_probe)
            wait_for(lambda: new_probe.exists())
            time.sleep(0.3)
            assert ask(str(new_probe), "ready") == (False, "starting: installing the plugin")
            assert ask(str(new_probe), "healthy")[0]
            assert ask(str(old_probe), "ready") == (True, "ok"), "the old agent still runs the node"
        wait_for(lambda: ask(str(new_probe), "ready")[0])
        wait_for(lambda: ask(str(old_probe), "ready")[1].startswith("standby: agent "))
        assert ask(str(old_probe), "healthy")[0], "standing by is healthy: no liveness restart of the old pod"
    finally:
        if new is not None:
            new.terminate()
        old.terminate()
    assert ask(str(old_probe), "ready")[0] is False and not old_probe.exists()


def test_an_undone_handover_gives_the_node_back_to_the_old_agent(host, tmp_path):
    """The successor claimed the node, then went away (rollout undone, surge pod deleted): the old agent
    follows the owner, not a latch: it claims the node again, answers ready, and keeps the entry again."""
    original = host.put("10-calico.conflist")
    old_probe = tmp_path / "old.sock"
    old = Agent(host, probe_socket=old_probe, recheck_interval=60.0)  # no periodic re-check helps here
    try:
        wait_for(lambda: bool(host.entries("10-calico.conflist")))
        old_token = (host.bin / ".cni-redirect-owner").read_text()
        new = Agent(host)
        wait_for(lambda: (host.bin / ".cni-redirect-owner").read_text() != old_token)
        wait_for(lambda: ask(str(old_probe), "ready")[1].startswith("standby"))
        assert new.terminate() == 0
        wait_for(lambda: (host.bin / ".cni-redirect-owner").read_text() == old_token)
        wait_for(lambda: ask(str(old_probe), "ready")[0])
        host.put("10-calico.conflist", original)  # the primary rewrites its file: the old agent edits again
        wait_for(lambda: len(host.entries("10-calico.conflist")) == 1)
    finally:
        assert old.terminate() == 0
    assert any(e["msg"].startswith("the agent that had taken over this node is gone") for e in host.events())


def test_a_port_squatter_stops_the_agent_before_it_claims_anything(host):
    """Something else holds the readiness port: the agent exits 1 with one line, before claiming the node,
    chaining or touching its predecessor's token."""
    import socket

    host.put("10-calico.conflist")
    (host.bin / ".cni-redirect-owner").write_text("0123456789abcdef\n")  # a predecessor's token
    squatter = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    squatter.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    port = free_port()
    squatter.bind(("::", port))
    squatter.listen(1)
    try:
        with mock.patch("cni_redirect.node.agent.httpport._bind_with_retry", lambda make, log, port: make()):
            agent = Agent(host, readiness_port=port)
            assert agent.terminate() == 1
    finally:
        squatter.close()
    (error,) = [e for e in host.events() if e["level"] == "error"]
    assert error["msg"].startswith("cannot start: nothing taken over") and "Address already in use" in error["error"]
    assert (host.bin / ".cni-redirect-owner").read_text() == "0123456789abcdef\n"
    assert host.entries("10-calico.conflist") == []
    left = sorted(os.listdir(host.bin / ".cni-redirect-agents"))
    assert left == ["install.lock", "runtime"], "its lifetime lock is gone with it (the runtime's record stays)"


def test_agent_socket_outside_the_trusted_dir_is_refused(host):
    agent = Agent(host, agent_socket=Path("/tmp/agent.sock"))
    assert agent.terminate() == 2
    assert any("--agent-socket" in e.get("error", "") for e in host.events())


def test_readyz_carries_the_warning_while_ready(host):
    host.put("10-calico.conflist")
    host.put("20-stale-entry.conflist")
    port = free_port()
    agent = Agent(host, readiness_port=port)
    try:

        def body() -> str:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).read().decode()
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
    port = free_port()
    agent = Agent(host, plugin_source=source, readiness_port=port, recheck_interval=0.2)

    def readyz() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
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

    port = free_port()
    agent = Agent(host, readiness_port=port)
    idle = []
    try:
        wait_for(lambda: _port_open(port))
        before = threading.active_count()
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
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
        assert _port_open(port)
    finally:
        for conn in idle:
            conn.close()
        agent.terminate()


@pytest.mark.slow
def test_clients_dripping_their_request_hold_no_slot_past_the_whole_request_deadline(host):
    """Every slot taken by a client that sends its request line a byte every 2 s (each read well inside the
    5 s idle timeout): each is cut off at the whole-request deadline, and the port answers again."""
    import select
    import socket
    import threading

    from cni_redirect.node.agent.httpport import REQUEST_DEADLINE

    port = free_port()
    agent = Agent(host, readiness_port=port)
    stop = threading.Event()
    cut_off: list[float] = []

    def drip() -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            for byte in b"GET /readyz HTTP/1.0 and on and on and on and on and on":
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    break
                if stop.wait(2):
                    return
                if select.select([conn], [], [], 0)[0]:
                    break  # readable: closed, or an answer: the server is done with it
            else:
                return  # never cut off
            cut_off.append(time.monotonic() - started)

    try:
        wait_for(lambda: _port_open(port))
        drippers = [threading.Thread(target=drip, daemon=True) for _ in range(16)]
        for thread in drippers:
            thread.start()
        time.sleep(3)
        assert not _port_open(port), "the drippers hold every slot"
        wait_for(lambda: _port_open(port), timeout=REQUEST_DEADLINE + 5, interval=0.5)
        for thread in drippers:
            thread.join(timeout=5)
        assert len(cut_off) == 16 and max(cut_off) < REQUEST_DEADLINE + 5, cut_off
    finally:
        stop.set()
        agent.terminate()


def _port_open(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_uninstall_force_under_a_running_agent_leaves_one_agent_one_repair_thread_and_real_backups(host):
    """`uninstall --force` removes the entry, backups, bundle, owner file and the agents' lock dir while an agent
    runs: the agent takes the node back with its own lock file, one repair thread, and a backup of the primary's
    real bytes; a second uninstall then restores them byte for byte."""
    import threading

    from cni_redirect.node.admin.uninstall import uninstall
    from cni_redirect.node.agent.ownership import AGENTS_DIR, OWNER_FILE

    original = host.put("10-calico.conflist")
    agent = Agent(host, repair="in-place", cri_socket="/nonexistent/cri.sock", recheck_interval=0.2)
    try:
        wait_for(lambda: host.entries("10-calico.conflist"))
        assert uninstall(host.bin, host.conf, JsonLog(host.log), grace=0.0, force=True) == []
        wait_for(lambda: host.entries("10-calico.conflist") and (host.bin / OWNER_FILE).exists(), timeout=15)
        token = (host.bin / OWNER_FILE).read_text().strip()
        # its lifetime lock is back (others see it alive), also when the uninstall removed the agents' dir just
        # after the agent had claimed the node again: its next pass sees its lock gone and claims once more
        wait_for(lambda: (host.bin / AGENTS_DIR / f"{token}.lock").exists(), timeout=15)
        assert [t.name for t in threading.enumerate()].count("repair") == 1

        def backups() -> list[bytes]:
            return [(host.conf / n).read_bytes() for n in os.listdir(host.conf) if n.startswith(".cni-redirect-orig")]

        wait_for(lambda: backups() == [original], timeout=5)  # even if the uninstall removed one it had just written
    finally:
        assert agent.terminate() == 0
    assert host.uninstall() == []
    assert (host.conf / "10-calico.conflist").read_bytes() == original


def test_the_new_node_taint_comes_off_once_chained_and_a_refusal_is_retried_and_logged_once(host):
    """The agent asks only once it is installed and chained; the API's refusals are logged once per reason and
    retried on the next iterations (readiness never waits for them); once off, it never asks again."""
    from cni_redirect.errors import NodeApiError

    answers = [NodeApiError("PATCH node n1: HTTP 403: forbidden")] * 2 + [True]
    calls: list[tuple[str, str]] = []

    class Api:
        def __init__(self, node: str) -> None:
            self.node = node

        def remove_taint(self, key: str) -> bool:
            calls.append((self.node, key))
            answer = answers.pop(0) if answers else False
            if isinstance(answer, Exception):
                raise answer
            return answer

    with mock.patch("cni_redirect.node.agent.nodetaint.NodeApi.in_cluster", side_effect=Api):
        agent = Agent(host, node_name="n1", not_ready_taint="example.com/not-ready", recheck_interval=0.05)
        try:
            wait_for(lambda: any("waiting for the primary" in e["msg"] for e in host.events()))
            assert calls == [], "not chained yet: the taint stays"
            host.put("10-calico.conflist")
            wait_for(lambda: any(e["msg"].startswith("took the new-node taint off") for e in host.events()))
            time.sleep(0.3)  # several more iterations
        finally:
            assert agent.terminate() == 0
    assert calls == [("n1", "example.com/not-ready")] * 3
    errors = [e for e in host.events() if e["msg"].startswith("cannot take the new-node taint off")]
    assert len(errors) == 1 and "HTTP 403" in errors[0]["error"], errors
