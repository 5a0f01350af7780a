"""The warm path for real: the installed front forwards to an agent, which programs the pod netns."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cni_redirect.agent import AgentServer
from tests.support import PEER_V4, connect, enabled, plugin_conf, run_plugin


class Log:
    def __init__(self) -> None:
        self.lines: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, level: str, msg: str, **fields) -> None:
        with self.lock:
            self.lines.append({"level": level, "msg": msg, **fields})


@pytest.fixture
def agent(host_unchanged):
    path = Path(f"/run/cni-redirect/test-{os.getpid()}.sock")
    log = Log()
    server = AgentServer(path, log)
    server.start()
    server.log_lines = log.lines
    yield server
    server.stop()
    assert not path.exists()


def via(agent, annotations=None, **entry):
    return plugin_conf(annotations, agent_socket=str(agent.path), **entry)


def test_socket_is_root_only(agent):
    mode = agent.path.stat().st_mode & 0o777
    assert mode == 0o600
    assert (agent.path.parent.stat().st_mode & 0o777) == 0o700


def test_add_check_del_through_the_agent_match_in_process(agent, pod):
    conf = via(agent, enabled(exclude_outbound_ports="22"))
    add = run_plugin("ADD", pod.path, conf)
    assert add.rc == 0, add.stdout + add.stderr
    via_agent = pod.ruleset()
    assert "elements = { 22 }" in via_agent
    assert run_plugin("CHECK", pod.path, conf).rc == 0
    assert run_plugin("DEL", pod.path, conf).rc == 0
    assert agent.served == 3 and agent.failed == 0

    in_process = run_plugin("ADD", pod.path, plugin_conf(enabled(exclude_outbound_ports="22")))
    assert in_process.stdout == add.stdout, "the same result bytes either way"
    assert pod.ruleset() == via_agent


def test_errors_through_the_agent_are_the_same_cni_errors(agent, pod):
    bad = run_plugin("ADD", pod.path, via(agent, enabled(proxy_uid="root")))
    assert bad.rc == 1
    error = bad.json
    assert error["code"] == 7 and "cni-redirect.io/proxy-uid" in error["msg"]
    assert "cni_redirect" not in pod.ruleset()
    host = run_plugin("ADD", f"/proc/{os.getpid()}/ns/net", via(agent, enabled()))
    assert host.rc == 1 and "host network namespace" in host.json["msg"], "the agent refuses its own netns"


def test_agent_down_means_try_again_for_add_and_success_for_del(pod):
    conf = plugin_conf(enabled(), agent_socket="/run/cni-redirect/nobody-listens.sock")
    add = run_plugin("ADD", pod.path, conf)
    assert add.rc == 1 and add.json["code"] == 11 and "agent unreachable" in add.json["msg"]
    assert "cni_redirect" not in pod.ruleset(), "no pod starts uncaptured, and none half-captured"
    assert run_plugin("CHECK", pod.path, conf).json["code"] == 11
    assert run_plugin("DEL", pod.path, conf).rc == 0
    assert run_plugin("DEL", "", plugin_conf(None, prev=False, agent_socket="/run/cni-redirect/x.sock")).rc == 0


def test_non_root_callers_are_refused(agent, pod):
    import subprocess
    import sys

    code = f"import os, socket; os.setuid(1000); s = socket.socket(socket.AF_UNIX);s.connect({str(agent.path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "PermissionError" in proc.stderr


def test_traffic_is_captured_when_the_agent_programmed_the_rules(agent, net, procs):
    procs.listen(net.pod, "proxy-out", 15001, uid=1337)
    procs.listen(net.peer, "peer", 80)
    assert run_plugin("ADD", net.pod.path, via(agent, enabled())).rc == 0
    answer = connect(net.pod, PEER_V4, 80, uid=1000)
    assert (answer["listener"], answer["original_dst"]) == ("proxy-out", f"{PEER_V4}:80")


def test_agent_threads_always_return_to_the_host_netns(agent, pod):
    home = os.stat("/proc/self/ns/net").st_ino
    for _ in range(5):
        assert run_plugin("ADD", pod.path, via(agent, enabled())).rc == 0
    threads = [t.native_id for t in threading.enumerate() if t.native_id]
    for tid in threads:
        path = f"/proc/self/task/{tid}/ns/net"
        if os.path.exists(path):
            assert os.stat(path).st_ino == home, f"thread {tid} is still in a pod netns"


def test_garbage_on_the_socket_does_not_hurt_the_agent(agent, pod):
    import socket

    for payload in (b"", b"GET / HTTP/1.0\r\n\r\n", b"CNIR1" + (10**12).to_bytes(8, "big") * 2):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(agent.path))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(10)
    assert run_plugin("ADD", pod.path, via(agent, enabled())).rc == 0
    assert agent.failed == 3
    assert all(line["level"] != "error" or "request failed" in line["msg"] for line in agent.log_lines)
