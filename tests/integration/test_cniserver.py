"""The warm path for real: the installed front forwards to the CNI server, which programs the pod netns."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cni_redirect import wire
from cni_redirect.backend import KernelBackend, libnftables
from cni_redirect.cniserver import CniServer
from cni_redirect.netns import received_fd
from cni_redirect.testing.netlab import PEER_V4, connect, enabled, plugin_conf, run_plugin


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
    server = CniServer(path, log)
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


def test_non_root_callers_are_refused_by_the_socket_mode_and_by_the_server(agent, pod):
    connect_as_1000 = f"import os, socket; os.setuid(1000); socket.socket(socket.AF_UNIX).connect({str(agent.path)!r})"
    proc = subprocess.run([sys.executable, "-c", connect_as_1000], capture_output=True, text=True)
    assert proc.returncode != 0 and "PermissionError" in proc.stderr, "mode 0600 keeps other users out"

    # Past the file modes (as if someone widened them), the server's own SO_PEERCRED check refuses the request.
    os.chmod(agent.path, 0o666)
    dir_mode = agent.path.parent.stat().st_mode & 0o777
    os.chmod(agent.path.parent, 0o711)
    request = json.dumps(plugin_conf(enabled())).encode()
    header, body = wire.encode_request({"CNI_COMMAND": "ADD", "CNI_NETNS": pod.path}, request)
    send_as_1000 = "\n".join(
        [
            "import os, socket, sys",
            "os.setuid(1000)",
            "s = socket.socket(socket.AF_UNIX)",
            f"s.connect({str(agent.path)!r})",
            f"s.sendall({header + body!r})",
            "s.shutdown(socket.SHUT_WR)",
            "try:",
            "    sys.stdout.write(repr(s.recv(100)))",
            "except ConnectionResetError:",
            "    sys.stdout.write('reset')",
        ]
    )
    try:
        proc = subprocess.run([sys.executable, "-c", send_as_1000], capture_output=True, text=True, timeout=30)
    finally:
        os.chmod(agent.path.parent, dir_mode)
    assert proc.returncode == 0 and proc.stdout in ("b''", "reset"), f"no reply for a non-root peer: {proc}"
    refusals = [line for line in agent.log_lines if line["msg"] == "refused a request from a non-root peer"]
    assert [line["uid"] for line in refusals] == [1000]
    assert agent.served == 0 and "cni_redirect" not in pod.ruleset()


def test_traffic_is_captured_when_the_agent_programmed_the_rules(agent, net, procs):
    procs.listen(net.pod, "proxy-out", 15001, uid=1337)
    procs.listen(net.peer, "peer", 80)
    assert run_plugin("ADD", net.pod.path, via(agent, enabled())).rc == 0
    answer = connect(net.pod, PEER_V4, 80, uid=1000)
    assert (answer["listener"], answer["original_dst"]) == ("proxy-out", f"{PEER_V4}:80")


def test_a_worker_is_in_the_pod_netns_while_it_works_and_home_before_it_ends(pod, host_unchanged, tmp_path):
    """Observed from outside, while the worker thread is alive: inside the pod's netns, then back in ours."""
    home = os.stat("/proc/self/ns/net").st_ino
    pod_inode = os.stat(pod.path).st_ino
    seen: dict[str, int] = {}
    paused, resume = threading.Event(), threading.Event()

    def thread_netns() -> int:
        return os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino

    def context_inside():
        seen["inside"] = thread_netns()
        return libnftables()

    class PausingBackend(KernelBackend):
        def apply(self, netns, ruleset):
            super().apply(netns, ruleset)
            seen["tid"] = threading.get_native_id()
            paused.set()
            resume.wait(10)  # keep the worker alive while the test looks at it

    server = CniServer(
        Path(f"/run/cni-redirect/pause-{os.getpid()}.sock"),
        lambda *a, **k: None,
        backend_factory=lambda fd: PausingBackend(received_fd(fd), context=context_inside),
    )
    server.start()
    try:
        result: dict = {}
        conf = plugin_conf(enabled(), agent_socket=str(server.path))
        front = threading.Thread(target=lambda: result.setdefault("run", run_plugin("ADD", pod.path, conf)))
        front.start()
        assert paused.wait(30), "the worker never reached the pause"
        after = os.stat(f"/proc/self/task/{seen['tid']}/ns/net").st_ino  # the worker is still running
        resume.set()
        front.join(30)
    finally:
        resume.set()
        server.stop()
    assert seen["inside"] == pod_inode != home, "the libnftables context was made inside the pod netns"
    assert after == home, "the worker had returned to the host netns before it finished"
    assert result["run"].rc == 0 and "table inet cni_redirect" in pod.ruleset()


def test_garbage_on_the_socket_does_not_hurt_the_agent(agent, pod):
    for payload in (b"", b"GET / HTTP/1.0\r\n\r\n", b"CNIR1" + (10**12).to_bytes(8, "big") * 2):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(agent.path))
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            sock.recv(10)
    assert run_plugin("ADD", pod.path, via(agent, enabled())).rc == 0
    assert agent.failed == 3
    assert all(line["level"] != "error" or "request failed" in line["msg"] for line in agent.log_lines)
