"""The node agent (`cni-redirect install`) as its own process, pointed at a private containerd's dirs.

What the DaemonSet runs on a node, minus Kubernetes: the bundle's (or the
venv's) executable, every path given by flag, its JSON log read line by line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

_ports = iter(range(18500, 18600))


class NodeAgentProcess:
    """One `cni-redirect install` process; stopped by its PID only."""

    def __init__(
        self,
        executable: Path,
        bin_dir: Path,
        conf_dir: Path,
        plugin_source: Path,
        entry: dict,
        workdir: Path,
        cri_socket: str,
        *,
        socket: str | None = None,
        port: int | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = port or next(_ports)
        self.socket = socket if socket is not None else f"/run/cni-redirect/agent-{os.getpid()}.sock"
        entry_file = workdir / f"entry-{self.port}-{time.monotonic_ns()}.json"
        entry_file.write_text(json.dumps(entry))
        argv = [
            str(executable),
            "install",
            f"--cni-bin-dir={bin_dir}",
            f"--cni-conf-dir={conf_dir}",
            f"--plugin-source={plugin_source}",
            f"--entry-file={entry_file}",
            f"--readiness-port={self.port}",
            f"--agent-socket={self.socket}",
            f"--cri-socket={cri_socket}",
            *extra,
        ]
        self.lines: list[dict] = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"level": "raw", "msg": line.rstrip()})

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def messages(self) -> list[str]:
        return [line.get("msg", "") for line in self.lines]

    def wait_for_message(self, prefix: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.get("msg", "").startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the node agent never logged {prefix!r}; its last lines: {self.lines[-8:]}")

    def wait_ready(self, timeout: float = 60.0) -> None:
        self.wait_for_message("ready: plugin installed and chained", timeout)

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
