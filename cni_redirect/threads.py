"""Our threads under their own names in the OS: `top -H`, `ps -L` and /proc/<pid>/task/*/comm then say which of
the agent's threads spends the CPU (CPython 3.11 keeps a thread's name to itself; gRPC's threads name theirs)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

PR_SET_NAME = 15  # prctl(2): the calling thread's name, 15 bytes and a NUL
_prctl: Callable[..., int] | None = None


def name_this_thread(name: str) -> None:
    """Best effort: a thread that cannot be named runs all the same."""
    global _prctl
    try:
        if _prctl is None:
            import ctypes

            _prctl = ctypes.CDLL(None, use_errno=True).prctl
        _prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


class NamedThread(threading.Thread):
    """A daemon thread named in the OS as in Python."""

    def __init__(self, target: Callable[..., object], name: str, args: tuple[Any, ...] = ()) -> None:
        super().__init__(target=target, name=name, args=args, daemon=True)

    def run(self) -> None:
        name_this_thread(self.name)
        super().run()
