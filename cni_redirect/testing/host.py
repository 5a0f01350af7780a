"""A snapshot of what the e2e tiers may disturb on the host, to restore it and prove it restored.

Container runtimes and the stock CNI plugins write outside any directory we
can hand them: libcni's cache, runc's and the shims' state, iptables-nft
tables (portmap, firewall, ipMasq), bridges, ip_forward, cgroups. We record
what exists before, remove only what is new afterwards, and compare.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .netlab import host_ruleset

#: Paths runtimes create whatever their config says. New entries are removed on restore.
WATCHED_PATHS = (
    Path("/var/lib/cni"),
    Path("/run/containerd"),
    Path("/run/runc"),
    Path("/var/lib/containers"),
    Path("/run/netns"),
    Path("/run/cni-redirect"),
    Path("/var/log/cni-redirect"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


def _links() -> set[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {link["ifname"] for link in json.loads(out)}


def _tables() -> set[tuple[str, str]]:
    out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {(o["table"]["family"], o["table"]["name"]) for o in json.loads(out)["nftables"] if "table" in o}


def _tree(path: Path) -> set[Path] | None:
    return ({path} | set(path.rglob("*"))) if path.exists() else None


# Commands only a runtime tier starts here. A container's own process (busybox `sleep`) is not
# listed: any shell on the host may run a `sleep`; its conmon and its cgroup are checked instead.
RUNTIME_COMMANDS = {"containerd", "containerd-shim", "containerd-shim-runc-v2", "conmon", "runc", "pause", "podman",
                    "catatonit"}  # fmt: skip


def _mounts() -> set[str]:
    with open("/proc/self/mountinfo") as handle:
        return {line.split()[4] for line in handle}


def _runtime_processes() -> set[tuple[int, str]]:
    """Processes a runtime tier could have left: (pid, command) of runtime-ish commands."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                comm = (entry / "comm").read_text().strip()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if comm in RUNTIME_COMMANDS and state != "Z":  # a zombie is dead, waiting for its reaper
                found.add((int(entry.name), comm))
    return found


def _cgroups() -> set[Path]:
    return {p for p in CGROUP_ROOT.glob("*/*") if p.is_dir()}


def _remove_cgroup(path: Path) -> None:
    for child in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        child.rmdir()
    path.rmdir()


@dataclass
class HostSnapshot:
    ruleset: str
    tables: set[tuple[str, str]]
    links: set[str]
    ip_forward: str
    trees: dict[Path, set[Path] | None]
    cgroups: set[Path]
    mounts: set[str]
    processes: set[tuple[int, str]]

    @classmethod
    def take(cls) -> HostSnapshot:
        return cls(
            ruleset=host_ruleset(),
            tables=_tables(),
            links=_links(),
            ip_forward=IP_FORWARD.read_text().strip(),
            trees={path: _tree(path) for path in WATCHED_PATHS},
            cgroups=_cgroups(),
            mounts=_mounts(),
            processes=_runtime_processes(),
        )

    def restore(self) -> None:
        """Remove what is new since the snapshot; never touch what was there before."""
        for family, name in _tables() - self.tables:
            subprocess.run(["nft", "delete", "table", family, name], capture_output=True)
        for link in _links() - self.links:
            subprocess.run(["ip", "link", "delete", link], capture_output=True)
        IP_FORWARD.write_text(self.ip_forward)
        # podman bind-mounts /run/netns onto itself (shared propagation) the first time it makes a netns.
        watched = tuple(str(path) for path in WATCHED_PATHS)
        for point in sorted(_mounts() - self.mounts, key=len, reverse=True):
            if point.startswith(watched):
                subprocess.run(["umount", "-l", point], capture_output=True)
        for path, before in self.trees.items():
            now = _tree(path)
            if now is None:
                continue
            if before is None:
                shutil.rmtree(path, ignore_errors=True)
                continue
            for extra in sorted(now - before, key=lambda p: len(p.parts), reverse=True):
                if extra.is_dir() and not extra.is_symlink():
                    shutil.rmtree(extra, ignore_errors=True)
                else:
                    extra.unlink(missing_ok=True)
        for path in sorted(_cgroups() - self.cgroups):
            _remove_cgroup(path)

    def differences(self, settle: float = 10.0) -> list[str]:
        # Shims and conmon exit on their own shortly after their sandbox is removed: give them a moment.
        deadline = time.monotonic() + settle
        while _runtime_processes() - self.processes and time.monotonic() < deadline:
            time.sleep(0.1)
        now = HostSnapshot.take()
        problems = []
        if now.ruleset != self.ruleset:
            problems.append("nft ruleset changed")
        if now.links != self.links:
            problems.append(f"links changed: {sorted(now.links ^ self.links)}")
        if now.ip_forward != self.ip_forward:
            problems.append("net.ipv4.ip_forward changed")
        for path, before in self.trees.items():
            if now.trees[path] != before:
                changed = (now.trees[path] or set()) ^ (before or set())
                problems.append(f"{path} changed: {sorted(map(str, changed))[:5]}")
        if now.cgroups != self.cgroups:
            problems.append(f"cgroups changed: {sorted(map(str, now.cgroups ^ self.cgroups))[:5]}")
        if now.mounts != self.mounts:
            problems.append(f"mounts changed: {sorted(now.mounts ^ self.mounts)[:5]}")
        if now.processes - self.processes:
            problems.append(f"runtime processes left running: {sorted(now.processes - self.processes)[:5]}")
        return problems


def tear_down(runtime, snapshot: HostSnapshot, workdir: Path) -> None:
    """Stop a runtime we started, undo what it left on the host, and prove the host is as it was."""
    runtime.stop()
    snapshot.restore()
    shutil.rmtree(workdir, ignore_errors=True)
    problems = snapshot.differences()
    assert not problems, f"{type(runtime).__name__} left the host changed: {problems}"
