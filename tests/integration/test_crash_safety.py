"""Chaining never loses the admin's config or the node's network, whatever step a kill -9 lands on (#31, #36).

The real `cni-redirect install` (the agent) and `cni-redirect uninstall` run under strace, which kills them
with SIGKILL at the N-th call of one file-changing syscall (`-e inject=SYSCALL:signal=SIGKILL:when=N`), for
every N until a run gets through: every write, link (a temp file getting its name), rename, exchange, unlink,
mkdir and rmdir of a whole run is a kill point. After each kill:

- every config in the conf dir is valid JSON, and the runtimes' own loaders (containerd's go-cni, CRI-O's
  ocicni: tests/loaders) still run the primary network, with our entry at most once and last (a `.conf`
  beside its `.conflist` for the instant of a conversion is fine: the loaders run one of them);
- the same command run again (a restarted agent, a second uninstall) finishes or undoes the step: one config,
  our entry once (the new one after an upgrade), no temp file or journal left;
- a final uninstall leaves the conf dir byte-identical to before the install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cni_redirect.node.chaining import conflists
from tests.integration.nodeproc import ENV, Node, run_agent, run_uninstall, terminate_agent, tree

pytestmark = [pytest.mark.root, pytest.mark.slow]

#: Every syscall that changes a file, by path or beneath a directory fd (what `Folder` uses).
SYSCALLS = ("write", "linkat", "symlink", "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir", "mkdir",
            "mkdirat")  # fmt: skip
ENTRY_A = {"defaults": {"proxy-uid": "1337"}}
ENTRY_B = {"defaults": {"proxy-uid": "1400"}}


@pytest.fixture(scope="module", autouse=True)
def strace_required():
    assert shutil.which("strace"), "strace is missing: run scripts/setup.sh (apt package strace)"


def assert_consistent_at_the_kill(node: Node, where: str) -> None:
    """Every config valid JSON, and both runtimes' loaders (tests/loaders) still run the primary network, with
    our entry at most once and last: a kill never leaves a node that starts no pod, or runs us twice."""
    for name in sorted(os.listdir(node.conf)):
        if not name.endswith(conflists.CONF_SUFFIXES):
            continue
        data = (node.conf / name).read_bytes()
        try:
            conflists.parse(name, data)
        except Exception as exc:
            raise AssertionError(f"{where}: {name} is not a valid config at the kill: {exc}") from None
    problems = node.loaders.problems(node.network, None)
    assert not problems, f"{where}: {problems}"


def assert_chained_once(node: Node, settings: dict, where: str) -> None:
    configs = [n for n in os.listdir(node.conf) if n.endswith(conflists.CONF_SUFFIXES)]
    assert len(configs) == 1, f"{where}: {configs}"
    document, _ = conflists.parse(configs[0], (node.conf / configs[0]).read_bytes())
    ours = [p for p in document["plugins"] if conflists.is_ours(p)]
    assert len(ours) == 1 and ours[0]["defaults"] == settings["defaults"], f"{where}: {ours}"
    assert not node.leftovers(), f"{where}: {node.leftovers()}"
    problems = node.loaders.problems(node.network, True, {"defaults": settings["defaults"]})
    assert not problems, f"{where}: {problems}"


def kill_points(attempt) -> list[str]:
    """Every kill point of a run: for each syscall, N = 1, 2, ... until a run is not killed."""
    covered = []
    for syscall in SYSCALLS:
        when = 1
        while attempt(syscall, when):
            covered.append(f"{syscall}#{when}")
            when += 1
            assert when < 200, f"{syscall}: no end to the kill points"
    return covered


PRIMARIES = ["10-calico.conflist", "10-legacy-bridge.conf"]


def assert_check_sees_all_of_ours(node: Node, where: str) -> None:
    """`uninstall --check` (the uninstall pod's readiness) names everything in the bin dir that was not there
    before the install: a killed install's temp file, link or staging dir included (#36: on main 4-5 of 18 kill
    points left files it missed)."""
    extra = sorted(set(os.listdir(node.bin)) - {name.split("/")[0] for name in node.original_bin})
    proc = subprocess.run([*node.uninstall_argv(), "--check"], capture_output=True, text=True, env=ENV, timeout=60)
    reported = proc.stdout.split("left on this node: ", 1)[-1] if "left on this node: " in proc.stdout else ""
    missed = [name for name in extra if name not in reported]
    assert not missed, f"{where}: uninstall --check missed {missed} ({proc.stdout.strip()})"
    assert (proc.returncode == 1) == bool(extra), f"{where}: {proc.returncode} {proc.stdout}"


@pytest.mark.parametrize(("primary", "bundle"), [(PRIMARIES[0], False), (PRIMARIES[1], False), (PRIMARIES[0], True)],
                         ids=["insert", "convert", "bundle"])  # fmt: skip
def test_install_killed_at_every_write(tmp_path, primary, bundle):
    def attempt(syscall: str, when: int) -> bool:
        node = Node(tmp_path / f"{syscall}-{when}", primary, bundle=bundle)
        killed = run_agent(node, ENTRY_A, syscall, when)
        where = f"install {primary} killed at {syscall}#{when}"
        if killed:
            assert_consistent_at_the_kill(node, where)
            assert_check_sees_all_of_ours(node, where)
        run_agent(node, ENTRY_A)  # restarted: it finishes or undoes the step
        assert_chained_once(node, ENTRY_A, where)
        assert not run_uninstall(node)
        assert tree(node.conf) == node.original, f"{where}: uninstall did not restore the conf dir"
        assert tree(node.bin) == node.original_bin, f"{where}: uninstall left {sorted(os.listdir(node.bin))}"
        assert_check_sees_all_of_ours(node, f"{where}, after uninstall")
        return killed

    covered = kill_points(attempt)
    print(f"\n[crash] install {primary}{' (bundle folder)' if bundle else ''}: {len(covered)} kill points: "
          f"{' '.join(covered)}")  # fmt: skip
    assert any(point.startswith("rename") for point in covered) and any(p.startswith("write") for p in covered)


def test_an_upgrade_killed_at_every_write(tmp_path):
    def attempt(syscall: str, when: int) -> bool:
        node = Node(tmp_path / f"{syscall}-{when}", "10-calico.conflist")
        run_agent(node, ENTRY_A)
        killed = run_agent(node, ENTRY_B, syscall, when)
        where = f"upgrade killed at {syscall}#{when}"
        if killed:
            assert_consistent_at_the_kill(node, where)
        run_agent(node, ENTRY_B)
        assert_chained_once(node, ENTRY_B, where)
        assert not run_uninstall(node)
        assert tree(node.conf) == node.original, f"{where}: uninstall did not restore the conf dir"
        return killed

    covered = kill_points(attempt)
    print(f"\n[crash] upgrade: {len(covered)} kill points: {' '.join(covered)}")
    assert covered


@pytest.mark.parametrize("primary", PRIMARIES, ids=["restore", "unconvert"])
def test_uninstall_killed_at_every_write(tmp_path, primary):
    def attempt(syscall: str, when: int) -> bool:
        node = Node(tmp_path / f"{syscall}-{when}", primary)
        run_agent(node, ENTRY_A)
        killed = run_uninstall(node, syscall, when)
        where = f"uninstall {primary} killed at {syscall}#{when}"
        if killed:
            assert_consistent_at_the_kill(node, where)
        assert not run_uninstall(node)  # run again: it finishes
        assert tree(node.conf) == node.original, f"{where}: the conf dir is not as before the install"
        assert tree(node.bin) == node.original_bin, f"{where}: uninstall left {sorted(os.listdir(node.bin))}"
        return killed

    covered = kill_points(attempt)
    print(f"\n[crash] uninstall {primary}: {len(covered)} kill points: {' '.join(covered)}")
    assert any(point.startswith(("rename", "unlink")) for point in covered)


# --- a primary that rewrites its conflist in bursts ---

REWRITES = 240


def _primary_version(base: dict, version: int) -> bytes:
    """The primary's own document, version `version` (Calico and flannel rewrite theirs in place, or by rename)."""
    return (json.dumps({**base, "x-primary-version": f"{version:06d}"}, indent=2) + "\n").encode()


@pytest.mark.parametrize("how", ["in-place", "rename"])
def test_a_primary_rewriting_in_bursts_never_loses_its_last_version(tmp_path, how):
    node = Node(tmp_path, "10-calico.conflist")
    path = node.conf / "10-calico.conflist"
    base = json.loads(path.read_bytes())
    path.write_bytes(_primary_version(base, 0))
    reads: list[int] = []
    bad: list[str] = []
    stop = threading.Event()
    primary_writes = [0]  # odd while the primary writes: a read overlapping it is the primary's, not checked

    def reader() -> None:
        while not stop.is_set():
            before = primary_writes[0]
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if before % 2 or primary_writes[0] != before:
                continue  # an in-place writer is seen half-done by any reader: not ours to answer for
            try:
                document = json.loads(data)
            except ValueError:
                bad.append(f"invalid JSON: {data[:80]!r}")
                continue
            if sum(1 for p in document["plugins"] if conflists.is_ours(p)) > 1:
                bad.append("our entry twice")
            reads.append(1)

    def rewrite(version: int) -> None:
        primary_writes[0] += 1
        try:
            _write_version(version)
        finally:
            primary_writes[0] += 1

    def _write_version(version: int) -> None:
        data = _primary_version(base, version)
        if how == "rename":
            tmp = node.conf / f".calico-{version}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        else:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)

    log = (tmp_path / "agent.log").open("wb")
    agent = subprocess.Popen([*node.install_argv(ENTRY_A), "--recheck-interval=2"], stdout=log, stderr=log, env=ENV)
    watcher = threading.Thread(target=reader, daemon=True)
    try:
        deadline = time.monotonic() + 30
        while not node.chained_with(ENTRY_A):
            assert time.monotonic() < deadline and agent.poll() is None, "the agent never chained"
            time.sleep(0.02)
        watcher.start()
        for version in range(1, REWRITES + 1):  # bursts of 20 rewrites 2 ms apart, 150 ms between bursts
            rewrite(version)
            time.sleep(0.15 if version % 20 == 0 else 0.002)
        start = time.monotonic()
        while True:  # the entry returns, on the primary's last version
            document = json.loads(path.read_bytes())
            if any(conflists.is_ours(p) for p in document["plugins"]):
                break
            assert time.monotonic() - start < 2 + 1, "our entry did not return within the re-check interval"
            time.sleep(0.01)
        assert document.get("x-primary-version") == f"{REWRITES:06d}", "an older version was re-published"
        assert conflists.without_entry(document) == json.loads(_primary_version(base, REWRITES))
    finally:
        stop.set()
        terminate_agent(agent)
        agent.wait(timeout=30)
        log.close()
    if watcher.is_alive():
        watcher.join()
    print(f"\n[bursts {how}] {REWRITES} rewrites, {len(reads)} reads checked, {len(bad)} bad")
    assert not bad, bad[:5]
    assert not run_uninstall(node)
    assert path.read_bytes() == _primary_version(base, REWRITES), "uninstall restores the primary's last bytes"


# --- ownership: a successor whose claim fails ---


def test_a_successor_whose_claim_fails_on_a_full_disk_leaves_the_running_agent_in_charge(tmp_path):
    """The bin dir is a 1 MiB tmpfs, filled once the running agent owns the node: the successor (same socket path,
    as in a surge) cannot write the owner file (ENOSPC) and exits 1 without taking anything; the running agent
    keeps the owner file, its socket (the same inode) and answers."""
    from cni_redirect import wire
    from cni_redirect.node.agent.ownership import OWNER_FILE

    node = Node(tmp_path / "node", "10-calico.conflist")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cnir-full", str(node.bin)], check=True)
    socket_path = Path(f"/run/cni-redirect/crash-{os.getpid()}.sock")
    logs = {name: (tmp_path / f"{name}.log").open("wb") for name in ("old", "new")}
    old = new = None
    try:
        argv = [*node.install_argv(ENTRY_A), f"--agent-socket={socket_path}"]
        old = subprocess.Popen(argv, stdout=logs["old"], stderr=logs["old"], env=ENV)
        deadline = time.monotonic() + 30
        while not (node.chained_with(ENTRY_A) and socket_path.exists() and (node.bin / OWNER_FILE).exists()):
            assert time.monotonic() < deadline and old.poll() is None, (tmp_path / "old.log").read_text()[-2000:]
            time.sleep(0.05)
        owner, inode = (node.bin / OWNER_FILE).read_bytes(), socket_path.stat().st_ino
        with (node.bin / "filler").open("wb") as filler:
            try:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            except OSError:
                pass
        new = subprocess.Popen(argv, stdout=logs["new"], stderr=logs["new"], env=ENV)
        assert new.wait(timeout=60) == 1
        lines = [json.loads(line) for line in (tmp_path / "new.log").read_text().splitlines() if line.startswith("{")]
        (error,) = [line for line in lines if line["level"] == "error"]
        assert error["msg"] == "cannot start: nothing taken over on this node" and "No space left" in error["error"]
        assert (node.bin / OWNER_FILE).read_bytes() == owner, "the running agent still owns the node"
        assert socket_path.stat().st_ino == inode, "its socket was neither replaced nor unlinked"
        stdin = json.dumps({"cniVersion": "1.1.0", "name": "n", "type": "cni-redirect"}).encode()
        assert wire.exchange(str(socket_path), {"CNI_COMMAND": "STATUS"}, stdin, None)[0] == 0, "and it answers"
        assert old.poll() is None
    finally:
        for proc in (new, old):
            if proc is not None and proc.poll() is None:
                terminate_agent(proc)
                proc.wait(timeout=30)
        for log in logs.values():
            log.close()
        (node.bin / "filler").unlink(missing_ok=True)
        run_uninstall(node)
        subprocess.run(["umount", str(node.bin)], check=True)
        socket_path.unlink(missing_ok=True)
    assert tree(node.conf) == node.original
