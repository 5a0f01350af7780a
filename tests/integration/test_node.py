"""The node agent where it needs root: read-only and full conf dirs (mounts), and the CNI server's socket under /run."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support import PRIMARY_DIR, wait_for
from tests.support import AgentThread as Agent


@pytest.fixture
def mounted(tmp_path):
    """Mount points under tmp_path for fault tests; always unmounted."""
    points: list[Path] = []

    def mount(*args: str, target: Path) -> Path:
        subprocess.run(["mount", *args, str(target)], check=True)
        points.append(target)
        return target

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_read_only_conf_dir_gives_a_clear_error_and_no_partial_file(host, mounted):
    original = host.put("10-calico.conflist")
    mounted("--bind", str(host.conf), target=host.conf)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(host.conf)], check=True)
    installer = host.agent()
    installer.install()
    assert not installer.reconcile()
    assert "cannot write into --cni-conf-dir" in installer.ready_reason
    assert "Read-only file system" in installer.ready_reason
    assert os.listdir(host.conf) == ["10-calico.conflist"]
    assert (host.conf / "10-calico.conflist").read_bytes() == original


def test_full_conf_dir_gives_a_clear_error_and_no_truncated_file(host, mounted):
    full = host.root / "full"
    full.mkdir()
    mounted("-t", "tmpfs", "-o", "size=64k", "tmpfs", target=full)
    original = (PRIMARY_DIR / "10-calico.conflist").read_bytes()
    (full / "10-calico.conflist").write_bytes(original)
    fd = os.open(full / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: the dir is full
    finally:
        os.close(fd)
    installer = host.agent(cni_conf_dir=full)
    installer.install()
    assert not installer.reconcile()
    assert "No space left on device" in installer.ready_reason
    assert sorted(os.listdir(full)) == ["10-calico.conflist", "filler"]
    assert (full / "10-calico.conflist").read_bytes() == original


def test_agent_socket_is_served_and_named_in_the_entry(host):
    socket_path = Path(f"/run/cni-redirect/installer-{os.getpid()}.sock")
    host.put("10-calico.conflist")
    agent = Agent(host, agent_socket=socket_path)
    try:
        wait_for(lambda: bool(host.entries("10-calico.conflist")))
        (entry,) = host.entries("10-calico.conflist")
        assert entry["agent_socket"] == str(socket_path)
        assert socket_path.is_socket() and (socket_path.stat().st_mode & 0o777) == 0o600
    finally:
        assert agent.terminate() == 0
    assert not socket_path.exists()


def _server_sockets() -> list[str]:
    return sorted(p.name for p in Path("/run/cni-redirect").iterdir() if p.name.startswith((".agent-", "agent-")))


@pytest.mark.parametrize("failure", ["no-plugin-source", "port-taken"])
def test_a_successor_that_cannot_start_never_takes_the_socket(host, socket_dir, tmp_path, failure):
    """The new agent cannot install (its plugin source is missing) or cannot bind its port: it exits 1 and
    the shared socket path is still the old agent's, which stays healthy and keeps the node."""
    import socket

    from cni_redirect.node.agent.probe import ask

    path = socket_dir / f"agent-{os.getpid()}.sock"
    host.put("10-calico.conflist")
    old_probe = tmp_path / "old.sock"
    old = Agent(host, agent_socket=path, probe_socket=old_probe)
    squatter = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        wait_for(lambda: ask(str(old_probe), "ready")[0])
        before = path.stat().st_ino
        token = (host.bin / ".cni-redirect-owner").read_bytes()
        if failure == "no-plugin-source":
            new = Agent(host, agent_socket=path, plugin_source=tmp_path / "missing")
        else:
            squatter.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            squatter.bind(("::", 18395))
            squatter.listen(1)
            from unittest import mock

            with mock.patch("cni_redirect.node.agent.httpport._bind_with_retry", lambda make, log, port: make()):
                new = Agent(host, agent_socket=path, readiness_port=18395)
                new.thread.join(timeout=30)
        assert new.terminate() == 1
        assert path.stat().st_ino == before, "the old agent's socket is still the shared path"
        assert (host.bin / ".cni-redirect-owner").read_bytes() == token
        assert ask(str(old_probe), "healthy") == (True, "ok") and ask(str(old_probe), "ready") == (True, "ok")
        assert _server_sockets() == [path.name], "the successor's temp socket is gone too"
    finally:
        squatter.close()
        assert old.terminate() == 0
    assert not path.exists()


def test_the_old_agent_serves_the_socket_again_after_an_undone_handover(host, socket_dir, tmp_path):
    """A successor took the socket and the node, then went away: the old agent publishes a new socket."""
    from cni_redirect.node.agent.probe import ask

    path = socket_dir / f"agent-{os.getpid()}.sock"
    host.put("10-calico.conflist")
    old_probe = tmp_path / "old.sock"
    old = Agent(host, agent_socket=path, probe_socket=old_probe, recheck_interval=60.0)
    try:
        wait_for(lambda: ask(str(old_probe), "ready")[0])
        first = path.stat().st_ino
        new = Agent(host, agent_socket=path)
        wait_for(lambda: ask(str(old_probe), "ready")[1].startswith("standby"))
        assert path.stat().st_ino != first
        assert new.terminate() == 0
        wait_for(lambda: ask(str(old_probe), "ready")[0])
        wait_for(lambda: path.exists())
        assert ask(str(old_probe), "healthy") == (True, "ok"), "its socket is the shared path again"
        assert _server_sockets() == [path.name]
    finally:
        assert old.terminate() == 0
