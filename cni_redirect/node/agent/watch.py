"""Waking the node agent's loop when its dirs change (inotify), instead of polling them.

The agent keeps our entry in the conf dir and its bundle and owner token in
the bin dir. `DirWatch.wait()` returns when either dir changes, when
`wake()` is called (SIGTERM, a stop in tests), or after `fallback` seconds:
the slow periodic re-check that catches what inotify cannot see (a dir
replaced by a mount, an overflowed queue). Where a dir cannot be watched (no
inotify, the dir does not exist yet) the wait is `poll` seconds instead, as
before. inotify through the C library (ctypes): no package, no program run.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from collections.abc import Iterable
from pathlib import Path

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then len bytes of name)
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF
)  # fmt: skip


class DirWatch:
    """inotify on a few dirs, plus a pipe to be woken through."""

    def __init__(self, dirs: Iterable[Path], fallback: float, poll: float) -> None:
        self.dirs = list(dirs)
        self.fallback = fallback
        self.poll = poll
        self.watched: set[Path] = set()
        self.wakes = 0  # how often the dirs changed (for tests and the log)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        self._watch_all()

    def _watch_all(self) -> None:
        if self.fd < 0:
            return
        for path in self.dirs:
            if path in self.watched:
                continue
            if self._libc.inotify_add_watch(self.fd, os.fsencode(path), MASK) >= 0:
                self.watched.add(path)

    @property
    def degraded(self) -> bool:
        """Some dir is not watched: its changes are seen by polling only."""
        return len(self.watched) < len(self.dirs)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a watched dir changes, a wake, or the timeout; True if a dir changed."""
        self._watch_all()  # a dir that appeared since, or was replaced (IN_*_SELF dropped its watch)
        limit = self.poll if self.degraded else self.fallback
        if timeout is not None:
            limit = min(limit, timeout)
        fds = [self._wake_r] + ([self.fd] if self.fd >= 0 else [])
        ready, _, _ = select.select(fds, [], [], limit)
        if self._wake_r in ready:
            _drain(self._wake_r)
        changed = self.fd >= 0 and self.fd in ready and self._read_events()
        if changed:
            self.wakes += 1
        return changed

    def _read_events(self) -> bool:
        """Drain the queue; a dir that went away (IN_DELETE_SELF, IN_MOVE_SELF) is watched again later."""
        data = _drain(self.fd)
        offset = 0
        while offset + EVENT.size <= len(data):
            _wd, mask, _cookie, length = EVENT.unpack_from(data, offset)
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF):
                self.watched.clear()  # re-added, all of them, by the next wait (a double watch is harmless)
            offset += EVENT.size + length
        return bool(data)

    def wake(self) -> None:
        if self._wake_w < 0:  # closed: nobody waits any more (and the fd number may be another file's now)
            return
        try:
            os.write(self._wake_w, b"x")
        except OSError as exc:  # the pipe is full: a wake is pending anyway
            if exc.errno != errno.EAGAIN:
                raise

    def close(self) -> None:
        for fd in (self.fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self.fd = self._wake_r = self._wake_w = -1


def _drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)
