"""Logging, for the plugin (`EventLog`) and for the node agent (`JsonLog`).

The plugin's logging never touches stdout: stdout belongs to the CNI result.
Human lines go to stderr at or above `log_level` (default `warning`: libcni
passes a plugin's stderr to its caller, so podman would print every info line
on the user's terminal). If `log_file` is set, every command appends one JSON
line there whatever the level: command, pod, duration, outcome. A log file
that cannot be written never fails the pod: we say so on stderr instead.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class EventLog:
    def __init__(self, stderr: TextIO | None = None, level: str = "warning", path: str | None = None) -> None:
        self.stderr = stderr if stderr is not None else sys.stderr
        self.threshold = LEVELS.get(level, 30)
        self.path = path

    def configure(self, level: str, path: str | None) -> None:
        self.threshold = LEVELS.get(level, 30)
        self.path = path

    def log(self, level: str, message: str) -> None:
        if LEVELS[level] >= self.threshold:
            self.stderr.write(f"cni-redirect {level}: {message}\n")

    def event(self, **fields: object) -> None:
        """Record one finished command: stderr at info, and a JSON line in the log file."""
        level = "error" if fields.get("outcome") == "error" else "info"
        summary = " ".join(f"{key}={value}" for key, value in fields.items() if value not in (None, ""))
        self.log(level, summary)
        if not self.path:
            return
        line = json.dumps({"ts": round(time.time(), 3), "level": level, **fields}, default=str) + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, line.encode())  # one write per line: concurrent plugins do not interleave
            finally:
                os.close(fd)
        except OSError as exc:
            self.stderr.write(f"cni-redirect warning: cannot write log_file {self.path!r}: {exc.strerror}\n")


class JsonLog:
    """The node agent's log: one JSON object per line on stdout (the container log), thread-safe.

    Called as `log(level, msg, **fields)`; anything that logs in the node agent takes such a callable.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def __call__(self, level: str, msg: str, **fields: object) -> None:
        line = json.dumps({"ts": round(time.time(), 3), "level": level, "msg": msg, **fields}, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()
