"""The processes of a node, read from /proc: who runs as whom, in which netns, listening on what.

For `cni-redirect doctor`. Read only. With the host's /proc (the host PID
namespace) every process of every pod is visible; a process's netns is
matched to a pod's by the inode of `/proc/<pid>/ns/net`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

TCP_LISTEN = "0A"


@dataclass
class Process:
    pid: int
    ppid: int
    comm: str
    uid: int  # the fs UID: what a socket it opens is owned by (meta skuid)
    gid: int
    netns: int  # inode of its network namespace
    started: float  # seconds since the epoch
    listening: set[int] = field(default_factory=set)  # TCP ports it listens on


def _boot_time(proc: Path) -> float:
    for line in (proc / "stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _ids(status: str, key: str) -> int:
    for line in status.splitlines():
        if line.startswith(key):
            return int(line.split()[4])  # real, effective, saved, fs
    return -1


def processes(proc: Path = Path("/proc")) -> list[Process]:
    """Every process we may read, with its listening TCP sockets."""
    boot, ticks = _boot_time(proc), os.sysconf("SC_CLK_TCK")
    found: list[Process] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            status = (entry / "status").read_text()
            netns = os.stat(entry / "ns" / "net").st_ino
        except OSError:
            continue  # gone, or a kernel thread we may not look into
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        found.append(
            Process(
                pid=int(entry.name),
                ppid=int(fields[1]),
                comm=comm,
                uid=_ids(status, "Uid:"),
                gid=_ids(status, "Gid:"),
                netns=netns,
                started=boot + int(fields[19]) / ticks,
            )
        )
    _attach_listeners(found, proc)
    return found


def _listening_inodes(proc: Path, pid: int) -> dict[int, int]:
    """Socket inode -> port of every TCP LISTEN socket in the netns that process `pid` is in."""
    sockets: dict[int, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc / str(pid) / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == TCP_LISTEN:
                sockets[int(parts[9])] = int(parts[1].rsplit(":", 1)[1], 16)
    return sockets


def _attach_listeners(found: list[Process], proc: Path) -> None:
    by_netns: dict[int, dict[int, int]] = {}
    for process in found:
        if process.netns not in by_netns:
            by_netns[process.netns] = _listening_inodes(proc, process.pid)
        sockets = by_netns[process.netns]
        if not sockets:
            continue
        try:
            fds = os.listdir(proc / str(process.pid) / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(proc / str(process.pid) / "fd" / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                port = sockets.get(int(target[8:-1]))
                if port is not None:
                    process.listening.add(port)


def descendants(found: list[Process], root: int) -> set[int]:
    """The pids of `root` and everything it started, however deep."""
    children: dict[int, list[int]] = {}
    for process in found:
        children.setdefault(process.ppid, []).append(process.pid)
    tree, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in tree:
                tree.add(child)
                todo.append(child)
    return tree
