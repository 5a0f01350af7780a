"""A temp node and the real agent and uninstall as processes, for the crash and loader tiers.

The agent is `python -m cni_redirect install` (what the bundle runs); strace can kill it at the N-th call of a
syscall. The plugin it installs is the real front (`.venv/bin/cni-redirect`), so the runtimes' loaders can run
VERSION on it as CRI-O does on every reload.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from cni_redirect.node.chaining.confdir import read_conf_dir
from cni_redirect.testing.loaders import Loaders, plugin_types, stub_plugins
from cni_redirect.testing.netlab import PLUGIN
from tests.support import PRIMARY_DIR

ENV = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
KILLED = (-signal.SIGKILL, 128 + signal.SIGKILL)


def cni_redirect() -> list[str]:
    return [sys.executable, "-m", "cni_redirect"]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under a folder (links as their target's name), by relative path."""
    found: dict[str, bytes] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = b"-> " + os.fsencode(os.readlink(path))
        elif path.is_file():
            found[key] = path.read_bytes()
    return found


class Node:
    """A temp node: a conf dir with one primary, a bin dir with the primary's plugins as VERSION stubs, the
    plugin to install (the real front, or a bundle folder), and the node's primary network name."""

    def __init__(self, root: Path, primary: str, data: bytes | None = None, bundle: bool = False) -> None:
        self.root, self.conf, self.bin = root, root / "conf", root / "bin"
        self.conf.mkdir(parents=True)
        self.bin.mkdir()
        data = data if data is not None else (PRIMARY_DIR / primary).read_bytes()
        (self.conf / primary).write_bytes(data)
        document = json.loads(data)
        self.network = document.get("name", "")
        stub_plugins(self.bin, plugin_types([document]) - {"cni-redirect"})
        self.plugin = self._bundle() if bundle else PLUGIN
        self.original = tree(self.conf)
        self.original_bin = tree(self.bin)
        self.loaders = Loaders(self.conf, [self.bin], root / "cni-cache")

    def _bundle(self) -> Path:
        """A bundle folder as install/build-bundle.sh makes one: the executable and its files beside it."""
        folder = self.root / "bundle" / "cni-redirect"
        (folder / "_internal").mkdir(parents=True)
        shutil.copy(PLUGIN, folder / "cni-redirect")
        (folder / "_internal" / "lib.txt").write_text("v1")
        return folder

    def entry_file(self, settings: dict) -> Path:
        path = self.root / f"entry-{len(list(self.root.glob('entry-*')))}.json"
        path.write_text(json.dumps(settings))
        return path

    def install_argv(self, settings: dict, mode: str = "edit", *extra: str) -> list[str]:
        return [
            *cni_redirect(),
            "install",
            f"--cni-bin-dir={self.bin}",
            f"--cni-conf-dir={self.conf}",
            f"--plugin-source={self.plugin}",
            f"--entry-file={self.entry_file(settings)}",
            "--agent-socket=",
            "--readiness-port=0",
            "--repair=off",
            f"--chain-mode={mode}",
            "--cri-socket=/nonexistent/cri.sock",
            *extra,
        ]

    def uninstall_argv(self) -> list[str]:
        return [*cni_redirect(), "uninstall", f"--cni-bin-dir={self.bin}", f"--cni-conf-dir={self.conf}",
                f"--cni-cache-dir={self.root / 'cni-cache'}"]  # fmt: skip

    def chained_with(self, settings: dict) -> bool:
        entry = read_conf_dir(self.conf).entry()
        return entry is not None and entry.get("defaults") == settings["defaults"] and not self.leftovers()

    def leftovers(self) -> list[str]:
        return [n for n in os.listdir(self.conf) if ".cni-redirect-tmp-" in n or n == ".cni-redirect-journal"]


def traced(argv: list[str], syscall: str | None, when: int) -> list[str]:
    if syscall is None:
        return argv
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
            "-e", f"inject={syscall}:signal=SIGKILL:when={when}", "--", *argv]  # fmt: skip


def run_agent(
    node: Node, settings: dict, syscall: str | None = None, when: int = 0, mode: str = "edit", hold: float = 0.0
) -> bool:
    """The agent until it says it has chained `settings` (then `hold` seconds more), then SIGTERM; True if the
    injected SIGKILL ended it."""
    log = node.root / f"agent-{time.monotonic_ns()}.log"
    out = log.open("wb")
    proc = subprocess.Popen(traced(node.install_argv(settings, mode), syscall, when), stdout=out, stderr=out, env=ENV)

    def done() -> bool:
        return b'"ready: plugin installed and chained"' in log.read_bytes() and node.chained_with(settings)

    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and not done():
            assert time.monotonic() < deadline, f"the agent never chained (kill point {syscall}#{when})"
            time.sleep(0.02)
        if proc.poll() is None and hold:
            time.sleep(hold)
        if proc.poll() is None:
            terminate_agent(proc)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill_with_tracee(proc)
        out.close()
    assert rc in (0, *KILLED), f"the agent exited {rc} (kill point {syscall}#{when}): {log.read_text()[-2000:]}"
    return rc in KILLED


def kill_with_tracee(proc: subprocess.Popen) -> None:
    """SIGKILL to the process we started and, under strace, to its tracee first: strace killed alone detaches
    its tracee, which would run on (an agent left behind by a failed test)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    tracees = [int(pid) for pid in children.read_text().split()] if children.exists() else []
    for pid in tracees:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


def terminate_agent(proc: subprocess.Popen) -> None:
    """SIGTERM to the agent itself (under strace: strace's child), as kubelet stops it."""
    pid = proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists() and children.read_text().split():
        pid = int(children.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)


def run_uninstall(node: Node, syscall: str | None = None, when: int = 0) -> bool:
    argv = [*node.uninstall_argv(), "--uninstall-grace=0.3"]
    proc = subprocess.run(traced(argv, syscall, when), capture_output=True, env=ENV, timeout=60)
    assert proc.returncode in (0, *KILLED), proc.stderr.decode()[-2000:]
    return proc.returncode in KILLED
