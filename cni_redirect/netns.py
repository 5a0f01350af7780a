"""Entering a pod's network namespace safely, and leaving it again.

Rules for this module, learned the hard way:
- open the netns ourselves and check it *is* a network namespace and *is not*
  the one we started in, before any setns: a plugin must never program the host;
- setns through pyroute2 with an fd, so nothing can create a missing netns file;
- return to the original netns on exit, so a long-lived caller (tests, the
  node agent) is never left inside a pod.
`setns` moves only the calling thread: the CNI server's workers and the repair
thread each enter and leave on their own, and a thread that cannot come back
stops the process (`stuck`) rather than run on inside a pod.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .errors import HostNetns, InternalError, InvalidEnvironment, NetnsGone, NotANetns

NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs fd: which kind of namespace is this?
CLONE_NEWNET = 0x40000000
_OWN_NETNS = "/proc/thread-self/ns/net"

#: How a backend reaches a pod netns: from CNI_NETNS to a vetted fd the caller closes.
NetnsOpener = Callable[[str], int]


def own_netns() -> tuple[int, int]:
    """(device, inode) of the calling thread's netns: the host's, for the plugin and the agent."""
    st = os.stat(_OWN_NETNS)
    return st.st_dev, st.st_ino


def open_netns(path: str) -> int:
    """Open and vet a netns path; the caller owns the returned fd."""
    try:
        # O_NONBLOCK: a FIFO (or another special file) at the path must not block us; the vetting refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise NetnsGone(f'CNI_NETNS "{path}" does not exist') from None
    except OSError as exc:
        raise InvalidEnvironment(f'CNI_NETNS "{path}" cannot be opened: {exc.strerror}') from None
    try:
        vet_netns_fd(fd, path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def vet_netns_fd(fd: int, label: str) -> None:
    """Raise unless fd is a network namespace other than the caller's own."""
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as exc:
        if exc.errno in (errno.ENOTTY, errno.EINVAL):
            raise NotANetns(f'CNI_NETNS "{label}" is not a network namespace') from None
        raise InvalidEnvironment(f'CNI_NETNS "{label}" cannot be inspected: {exc.strerror}') from None
    if kind != CLONE_NEWNET:
        raise NotANetns(f'CNI_NETNS "{label}" is a namespace, but not a network namespace')
    target = os.fstat(fd)
    if (target.st_dev, target.st_ino) == own_netns():
        raise HostNetns(f'CNI_NETNS "{label}" is the host network namespace; refusing to touch it')


def received_fd(netns_fd: int | None) -> NetnsOpener:
    """An opener for a netns handed over as an fd (the CNI server's case): dup it, vet it."""

    def open_received(label: str) -> int:
        if netns_fd is None:
            raise NetnsGone(f'CNI_NETNS "{label}" could not be opened by the plugin')
        fd = os.dup(netns_fd)
        try:
            vet_netns_fd(fd, label)
        except BaseException:
            os.close(fd)
            raise
        return fd

    return open_received


def vetted_fd(netns_fd: int) -> NetnsOpener:
    """An opener for a netns this thread opened and vetted itself (`open_netns`): a dup, not vetted again (the
    repair pass's case: a second ioctl, fstat and stat per pod per pass bought nothing)."""

    def open_vetted(label: str) -> int:
        return os.dup(netns_fd)

    return open_vetted


_libc = None


def libc():
    """The C library, for pyroute2's setns. Given explicitly: left to itself pyroute2 finds libc
    with ctypes.util.find_library, which runs `/sbin/ldconfig -p`, and the plugin never runs a program."""
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc is always among them
    return _libc


STUCK_EXIT = 70  # EX_SOFTWARE: a thread left inside a pod's netns


def stuck(why: str) -> None:
    """A thread that cannot return to its own netns stops the process: every later netns check, socket
    and table of that thread would be the pod's (for the node agent: a repair pass could program the node)."""
    os.write(2, f"cni-redirect: {why}; a thread is stuck in a pod network namespace, exiting\n".encode())
    os._exit(STUCK_EXIT)


@contextmanager
def entered(netns_fd: int) -> Iterator[None]:
    """Run the body inside the netns behind a vetted fd, then come back."""
    from pyroute2.netns import setns  # heavy import: only on paths that enter a netns

    home = os.open(_OWN_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            setns(netns_fd, flags=0, libc=libc())
        except OSError as exc:
            raise InternalError(f"setns into the pod network namespace failed: {exc}") from None
        try:
            yield
        finally:
            try:
                setns(home, flags=0, libc=libc())
            except OSError as exc:
                stuck(f"could not return to the original network namespace: {exc}")
    finally:
        os.close(home)
