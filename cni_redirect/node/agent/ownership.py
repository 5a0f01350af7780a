"""Who runs this node's install: the newest agent that claimed it and is still alive.

Every agent holds an exclusive flock on `<bin dir>/.cni-redirect-agents/<token>.lock`
for its whole life; the kernel drops it when the process ends, however it ends
(SIGKILL, OOM, a deleted surge pod). The owner file `<bin dir>/.cni-redirect-owner`
names the last agent that claimed the node. So every agent can tell, without a
port, a timeout or a heartbeat, which of three states it is in:

- OWNER: the file names us: we keep entry and bundle, repair, serve;
- STANDBY: it names another agent whose lock is held: a live successor runs the
  node, we touch nothing;
- UNOWNED: no file, or it names an agent whose lock is free (it died, or a rollout
  was undone): we claim the node (again).

`installing()` serialises bundle copies, relinks and pruning between agents (the
old and the new one during a surge). `live_agents()` is what `uninstall` asks
before it removes anything.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ...threads import NamedThread
from ..files import write_atomic

OWNER_FILE = ".cni-redirect-owner"
AGENTS_DIR = ".cni-redirect-agents"
INSTALL_LOCK = "install.lock"
RUNTIME_FILE = "runtime"  # in AGENTS_DIR: the node's runtime as CRI named it, for `uninstall`


class State(enum.Enum):
    OWNER = "owner"
    STANDBY = "standby"
    UNOWNED = "unowned"


class Ownership:
    """One agent's place among the agents of one node, bound to that node's CNI bin dir."""

    def __init__(self, bin_dir: Path, token: str | None = None) -> None:
        self.dir = bin_dir / AGENTS_DIR
        self.owner_file = bin_dir / OWNER_FILE
        self.token = token or secrets.token_hex(8)
        self._life: int | None = None

    # --- this agent's life ---

    def enter(self) -> None:
        """Hold our lifetime lock: from now on every other agent sees us alive."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.dir / f"{self.token}.lock", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self._life = fd

    def leave(self) -> None:
        if self._life is None:
            return
        with suppress(FileNotFoundError):
            (self.dir / f"{self.token}.lock").unlink()
        os.close(self._life)
        self._life = None

    def claim(self) -> None:
        """Name us in the owner file; first our lifetime lock is put back if someone removed it (`uninstall
        --force` removes the agents' dir), or every other agent would take us for dead."""
        if self._life is not None and not (self.dir / f"{self.token}.lock").exists():
            os.close(self._life)
            self._life = None
            self.enter()
        write_atomic(self.owner_file, self.token.encode() + b"\n", mode=0o644)

    # --- the node ---

    def owner(self) -> str | None:
        try:
            return self.owner_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def state(self) -> State:
        owner = self.owner()
        if owner == self.token:
            # Named, but our lock file gone (`uninstall --force` removed the agents' dir after our last claim):
            # every other agent would take us for dead. Claim again: `claim` puts the lock back first.
            lock = self.dir / f"{self.token}.lock"
            return State.OWNER if self._life is None or lock.exists() else State.UNOWNED
        if owner is not None and alive(self.dir, owner):
            return State.STANDBY
        return State.UNOWNED

    def live_agents(self) -> list[str]:
        return live_agents(self.dir)

    def record_runtime(self, name: str) -> None:
        """The node's runtime by CRI's name (containerd, cri-o): `uninstall` reads it to know whether pods set
        up with us may still get DEL from a cached config (CRI-O does that; containerd does not)."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        write_atomic(self.dir / RUNTIME_FILE, name.encode() + b"\n", mode=0o644)

    @contextmanager
    def installing(self) -> Iterator[None]:
        """One agent at a time copies, relinks or prunes the bundle."""
        self.dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(self.dir / INSTALL_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def when_gone(self, token: str, then: Callable[[], None]) -> threading.Thread:
        """Call `then` as soon as agent `token` ends (a thread blocked on its lock): standby needs no polling."""

        def wait() -> None:
            try:
                fd = os.open(self.dir / f"{token}.lock", os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                then()
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # returns when its holder's process has ended
            finally:
                os.close(fd)
            then()

        thread = NamedThread(wait, "owner-watch")
        thread.start()
        return thread


def alive(agents_dir: Path, token: str) -> bool:
    """Whether agent `token` is running: its lock is held. A free one is a dead agent's: removed."""
    if not token.isalnum():
        return False
    path = agents_dir / f"{token}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    else:
        with suppress(FileNotFoundError):
            path.unlink()
        return False
    finally:
        os.close(fd)


def recorded_runtime(bin_dir: Path) -> str:
    """The runtime an agent recorded for this node ("" when none did: the safe side is to assume CRI-O)."""
    try:
        return (bin_dir / AGENTS_DIR / RUNTIME_FILE).read_text().strip()[:64]
    except (OSError, UnicodeDecodeError):
        return ""


def live_agents(agents_dir: Path) -> list[str]:
    try:
        names = sorted(os.listdir(agents_dir))
    except FileNotFoundError:
        return []
    tokens = [name.removesuffix(".lock") for name in names if name.endswith(".lock") and name != INSTALL_LOCK]
    return [token for token in tokens if alive(agents_dir, token)]
