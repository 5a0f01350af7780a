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
