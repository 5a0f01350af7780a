"""The warm path for real: the installed front forwards to the CNI server, which programs the pod netns."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cni_redirect import wire
from cni_redirect.backend import KernelBackend, libnftables
from cni_redirect.cniserver import CniServer
from cni_redirect.netns import received_fd
from cni_redirect.testing.netlab import PEER_V4, PLUGIN, PluginRun, connect, enabled, plugin_conf, run_plugin
from tests.support import wait_for


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
    server.log_lines = log.lines  # type: ignore[attr-defined]  # the tests read what the server logged
    yield server
    server.stop()
    assert not path.exists()


class Front:
    """One of the two fronts a runtime may exec (the Python one, the bundle's compiled one): the warm path's
    behaviour must not depend on which."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, command: str, netns: str, conf: dict | bytes, **kwargs: Any) -> PluginRun:
        return run_plugin(command, netns, conf, plugin=self.path, **kwargs)


@pytest.fixture(params=["python", "compiled"])
def front(request, fronts) -> Front:
    return Front(fronts[request.param])


def via(agent, annotations=None, **entry):
    return plugin_conf(annotations, agent_socket=str(agent.path), **entry)


def test_socket_is_root_only(agent):
    mode = agent.path.stat().st_mode & 0o777
    assert mode == 0o600
    assert (agent.path.parent.stat().st_mode & 0o777) == 0o700


def test_add_check_del_through_the_agent_match_in_process(front, agent, pod):
    conf = via(agent, enabled(exclude_outbound_ports="22"))
    add = front.run("ADD", pod.path, conf)
    assert add.rc == 0, add.stdout + add.stderr
    via_agent = pod.ruleset()
    assert "elements = { 22 }" in via_agent
    assert front.run("CHECK", pod.path, conf).rc == 0
    assert front.run("DEL", pod.path, conf).rc == 0
    assert agent.served == 3 and agent.failed == 0

    in_process = front.run("ADD", pod.path, plugin_conf(enabled(exclude_outbound_ports="22")))
    assert in_process.stdout == add.stdout, "the same result bytes either way"
    assert pod.ruleset() == via_agent


def test_errors_through_the_agent_are_the_same_cni_errors(front, agent, pod):
    bad = front.run("ADD", pod.path, via(agent, enabled(proxy_uid="root")))
    assert bad.rc == 1
    error = bad.json
    assert error["code"] == 7 and "cni-redirect.io/proxy-uid" in error["msg"]
    assert "cni_redirect" not in pod.ruleset()
    host = front.run("ADD", f"/proc/{os.getpid()}/ns/net", via(agent, enabled()))
    assert host.rc == 1 and "host network namespace" in host.json["msg"], "the agent refuses its own netns"


def test_server_down_means_slower_never_uncaptured(front, pod, tmp_path):
    log = tmp_path / "log"
    conf = plugin_conf(enabled(), agent_socket="/run/cni-redirect/nobody-listens.sock", log_file=str(log))
    add = front.run("ADD", pod.path, conf)
    assert add.rc == 0, add.stdout
    assert "table inet cni_redirect" in pod.ruleset(), "done in-process"
    assert add.stderr.count("warning") == 1 and "did not answer" in add.stderr and "in-process" in add.stderr
    event = json.loads(log.read_text().splitlines()[-1])
    assert event["outcome"] == "captured" and "nobody-listens.sock did not answer" in event["fallback"]
    assert front.run("CHECK", pod.path, conf).rc == 0
    assert front.run("DEL", pod.path, conf).rc == 0
    assert front.run("DEL", "", plugin_conf(None, prev=False, agent_socket="/run/cni-redirect/x.sock")).rc == 0


def test_a_server_that_never_answers_is_given_up_on_after_the_timeout(front, pod, host_unchanged, socket_dir):
    path = f"{socket_dir}/hung-{os.getpid()}.sock"
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(path)
    hung.listen(8)  # accepts into the backlog, never replies
    try:
        add = front.run("ADD", pod.path, plugin_conf(enabled(), agent_socket=path))
    finally:
        hung.close()
        os.unlink(path)
    assert add.rc == 0 and "table inet cni_redirect" in pod.ruleset()
    assert wire.TIMEOUT <= add.seconds < wire.TIMEOUT + 3, add.seconds
    assert "timed out" in add.stderr


def test_a_request_its_front_gave_up_on_is_never_run_late(front, agent, pod):
    conf = plugin_conf(enabled(exclude_outbound_ports="2222"), agent_socket=str(agent.path))
    fd = os.open(pod.path, os.O_RDONLY)
    try:
        with agent.locks.held(fd):  # the server is busy with this netns past the front's timeout
            add = front.run("ADD", pod.path, conf)
            assert add.rc == 0 and "did not answer" in add.stderr, "the front did it in-process"
            wait_for(lambda: agent.locks._locks, timeout=5)
    finally:
        os.close(fd)
    wait_for(lambda: agent.abandoned == 1, timeout=10)
    assert agent.served == 0, "the late request was dropped, not applied"
    assert pod.ruleset().count("table inet cni_redirect") == 1 and "2222" in pod.ruleset()


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
            "try:",  # the server may close before the request is all sent: EPIPE or a reset is a refusal too
            f"    s.sendall({header + body!r})",
            "    s.shutdown(socket.SHUT_WR)",
            "    sys.stdout.write(repr(s.recv(100)))",
            "except (BrokenPipeError, ConnectionResetError):",
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


def test_traffic_is_captured_when_the_agent_programmed_the_rules(front, agent, net, procs):
    procs.listen(net.pod, "proxy-out", 15001, uid=1337)
    procs.listen(net.peer, "peer", 80)
    assert front.run("ADD", net.pod.path, via(agent, enabled())).rc == 0
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
        @contextmanager
        def session(self, netns):
            with super().session(netns) as session:
                yield session
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


def test_a_front_that_has_its_reply_finds_the_request_counted_and_its_fd_closed(agent, pod):
    """The reply ends (EOF) only after the server closed the netns fd it was sent and counted the
    request: metrics, drain and the load test's fd check read the server's state right then."""
    conf = json.dumps(via(agent, enabled())).encode()
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": "eof", "CNI_NETNS": pod.path, "CNI_IFNAME": "eth0"}
    netns_fd = os.open(pod.path, os.O_RDONLY)
    lagging = []
    try:
        fds = _fd_count()
        for index in range(300):
            code, out, _err = wire.exchange(str(agent.path), env, conf, netns_fd)
            assert code == 0, out
            if (agent.served, _fd_count()) != (index + 1, fds):
                lagging.append((index, agent.served, _fd_count() - fds))

            def caught_up(served: int = index + 1) -> bool:
                return agent.served == served and agent.in_flight == 0

            wait_for(caught_up, timeout=10)
    finally:
        os.close(netns_fd)
    assert lagging == [], f"{len(lagging)} of 300 replies ended before the server was done: {lagging[:3]}"


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _send_broken(path: Path, netns_fd: int, kind: int) -> None:
    """A request that breaks after its fd arrived, the way a front whose timeout fired leaves one."""
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, netns_fd.to_bytes(4, sys.byteorder))]
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        if kind == 0:  # truncated body
            sock.sendmsg([wire.MAGIC + (10).to_bytes(8, "big") + (100).to_bytes(8, "big") + b"CNI_"], rights)
        elif kind == 1:  # truncated header
            sock.sendmsg([wire.MAGIC + b"\x00\x00"], rights)
        elif kind == 2:  # not ours
            sock.sendmsg([b"GET / HTTP/1.1\r\nHost: node\r\n\r\n"], rights)
        else:  # too large
            sock.sendmsg([wire.MAGIC + (1 << 40).to_bytes(8, "big") + (1).to_bytes(8, "big")], rights)


def test_a_thousand_broken_requests_leak_no_fd_and_no_memory(agent, pod):
    netns_fd = os.open(pod.path, os.O_RDONLY)
    try:
        for index in range(100):  # warm up allocator pools and thread stacks
            _send_broken(agent.path, netns_fd, index % 4)
        wait_for(lambda: agent.failed == 100, timeout=30)
        fds, rss = _fd_count(), _rss_kb()
        for index in range(1000):
            _send_broken(agent.path, netns_fd, index % 4)
        wait_for(lambda: agent.failed == 1100, timeout=60)
        fd_growth, rss_growth = _fd_count() - fds, _rss_kb() - rss
    finally:
        os.close(netns_fd)
    print(f"\n[cniserver] 1000 broken requests: fd growth {fd_growth}, RSS growth {rss_growth} KB")
    assert fd_growth == 0, "every fd that came with a broken request is closed"
    assert rss_growth < 4096
    assert run_plugin("ADD", pod.path, via(agent, enabled())).rc == 0, "and the next good request is served"


def test_the_accept_loop_survives_running_out_of_fds(pod, host_unchanged):
    """`cni-redirect agent` squeezed to no free fd (prlimit): accept fails, is logged, and recovers."""
    import resource

    path = f"/run/cni-redirect/squeeze-{os.getpid()}.sock"
    server = subprocess.Popen([str(PLUGIN), "agent", "--socket", path], stdout=subprocess.PIPE, text=True)
    lines: list[dict] = []
    stdout = server.stdout
    assert stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any(line["msg"] == "agent serving CNI requests" for line in lines), timeout=30)
        in_use = {int(fd) for fd in os.listdir(f"/proc/{server.pid}/fd")}
        lowest_free = min(set(range(len(in_use) + 1)) - in_use)
        soft, hard = resource.prlimit(server.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (lowest_free, hard))  # every fd below it is taken
        # An accept() already waiting holds the fd it will return: the first connection takes that one.
        with socket.socket(socket.AF_UNIX) as first:
            first.connect(path)
        result: dict = {}
        conf = plugin_conf(enabled(), agent_socket=path)
        front = threading.Thread(target=lambda: result.setdefault("add", run_plugin("ADD", pod.path, conf)))
        front.start()
        wait_for(lambda: sum("could not accept" in line["msg"] for line in lines) >= 3, timeout=20)
        resource.prlimit(server.pid, resource.RLIMIT_NOFILE, (soft, hard))
        front.join(60)
        assert result["add"].rc == 0, result["add"].stdout
        assert "table inet cni_redirect" in pod.ruleset()
        errors = [line for line in lines if "could not accept" in line["msg"]]
        assert "Too many open files" in errors[0]["error"] and errors[-1]["retry_in"] <= 1.0
        assert server.poll() is None, "the agent is still running"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)


def test_the_socket_dir_is_tightened_to_root_only(host_unchanged):
    directory = Path("/run/cni-redirect")
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o755)  # what kubelet's DirectoryOrCreate makes
    server = CniServer(directory / f"mode-{os.getpid()}.sock", lambda *a, **k: None)
    server.start()
    try:
        assert directory.stat().st_mode & 0o777 == 0o700
    finally:
        server.stop()


def test_a_server_whose_socket_was_taken_away_reports_a_problem(agent):
    assert agent.problem() == ""
    agent.path.unlink()
    assert "is gone or was replaced" in agent.problem()


@pytest.mark.parametrize("mode", ["in-process", "agent"])
def test_racing_adds_on_one_netns_leave_exactly_one_table(front, pod, agent, mode):
    from concurrent.futures import ThreadPoolExecutor

    entry: dict[str, Any] = {"agent_socket": str(agent.path)} if mode == "agent" else {}
    conf = plugin_conf(enabled(exclude_outbound_ports="22"), **entry)
    for _ in range(3):
        pod.run("nft", "delete", "table", "inet", "cni_redirect", check=False)
        with ThreadPoolExecutor(max_workers=16) as pool:
            runs = list(pool.map(lambda _: front.run("ADD", pod.path, conf), range(16)))
        assert all(run.rc == 0 for run in runs), [run.stdout for run in runs if run.rc]
        assert pod.ruleset().count("table inet cni_redirect") == 1
        check = front.run("CHECK", pod.path, conf)
        assert check.rc == 0, f"duplicated rules after racing ADDs: {check.stdout}"
    if mode == "agent":
        assert len(agent.locks) == 0, "per-netns locks are released"


def test_status_gc_and_del_of_a_vanished_netns_are_served_by_the_server(front, agent, pod, tmp_path):
    """What an idle node asks over and over (STATUS, GC) and what a node reboot asks (DEL of a netns that is gone)
    are answered by the warm server, never by an in-process start."""
    log = tmp_path / "plugin.log"
    conf = via(agent, enabled(), cniVersion="1.1.0", log_file=str(log), log_level="info")
    for command in ("STATUS", "GC"):
        run = front.run(command, "", conf)
        assert (run.rc, run.stdout) == (0, ""), run.stderr
    gone = front.run("DEL", "/run/netns/cni-redirect-never-was", conf)
    assert gone.rc == 0 and "in-process" not in gone.stderr, gone.stderr
    assert agent.served == 3 and agent.failed == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(e["command"], e["via"]) for e in events] == [
        ("STATUS", "cni-server"),
        ("GC", "cni-server"),
        ("DEL", "cni-server"),
    ]
    assert events[-1]["outcome"] == "nothing to do: no table"
    in_process = front.run("DEL", "/run/netns/cni-redirect-never-was", plugin_conf(enabled(), log_file=str(log)))
    assert in_process.rc == 0 and json.loads(log.read_text().splitlines()[-1])["outcome"] == events[-1]["outcome"]


def test_del_of_what_is_not_a_netns_answers_the_same_either_way(front, agent, pod, tmp_path):
    not_a_netns = tmp_path / "dir"
    not_a_netns.mkdir()
    served = front.run("DEL", str(not_a_netns), via(agent, enabled()))
    in_process = front.run("DEL", str(not_a_netns), plugin_conf(enabled()))
    assert agent.served == 1
    assert (served.rc, served.stdout) == (in_process.rc, in_process.stdout) == (0, ""), "its table went with it"


def test_the_compiled_front_serves_the_warm_path_without_its_python_front(agent, pod, compiled_front, tmp_path):
    """Every forwarded command is answered by the compiled front alone: the Python front beside it refuses to run."""
    import shutil

    shutil.copy2(compiled_front, tmp_path / "cni-redirect")
    tripwire = tmp_path / "cni-redirect-py"
    tripwire.write_text("#!/bin/sh\necho 'the Python front was run' >&2\nexit 97\n")
    tripwire.chmod(0o755)
    compiled = Front(tmp_path / "cni-redirect")
    conf = via(agent, enabled(exclude_outbound_ports="22"), version="1.1.0")  # 1.1.0: STATUS and GC too
    for command in ("ADD", "CHECK", "DEL"):
        run = compiled.run(command, pod.path, conf)
        assert run.rc == 0, (command, run.stdout, run.stderr)
    for command in ("STATUS", "GC"):
        run = compiled.run(command, "", conf)
        assert run.rc == 0, (command, run.stdout, run.stderr)
    assert agent.served == 5 and agent.failed == 0
    assert compiled.run("ADD", pod.path, plugin_conf(enabled())).rc == 97, "the tripwire itself works"
