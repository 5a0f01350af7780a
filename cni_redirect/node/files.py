"""File helpers for the node agent: a directory bound at open, atomic writes and swaps in it, reads that never
block or follow a link, leftovers of dead writers, content digests.

Nothing in the node's conf dir is trusted: any name there may be a symlink out of it, a FIFO, a huge file or a
directory. So every write goes through a `Folder` (a directory fd, names resolved beneath it, a link never
followed), and every read takes regular files only, opened without blocking, up to a bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The most we read of one file of the conf dir: a CNI config is a few KiB, a hostile one may be anything.
MAX_FILE_BYTES = 1 << 20
TEMP_MARK = ".cni-redirect-tmp-"


def not_regular(name: str | Path, what: str) -> OSError:
    return OSError(errno.EINVAL, f"not a regular file ({what})", str(name))


def read_regular(
    path: Path | str, limit: int = MAX_FILE_BYTES, follow: bool = True, dir_fd: int | None = None
) -> bytes:
    """A regular file's bytes: O_NONBLOCK so a FIFO or device never blocks the open, fstat so only a regular
    file is read, at most `limit` bytes (OSError EFBIG past it). `follow` False: a symlink is refused (ELOOP)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise not_regular(path, _kind(info.st_mode))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 65536))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return data
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    kinds = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
             stat.S_IFCHR: "a device", stat.S_IFBLK: "a device", stat.S_IFLNK: "a symlink"}  # fmt: skip
    return kinds.get(stat.S_IFMT(mode), "not a file")


def temp_name(path: Path, kind: str) -> Path:
    """A name beside `path` that no other writer uses: in a container every agent is PID 1, so a name from
    the PID is shared by an old and a new agent during a surge. Random, and created exclusively by the caller."""
    return path.with_name(f".{path.name}.cni-redirect-{kind}-{secrets.token_hex(8)}")


def _check_name(name: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise OSError(errno.EINVAL, "not a plain file name", name)
    return name


class Folder:
    """A directory opened once: every name is resolved beneath its fd, and a name that is a symlink is never
    followed (O_NOFOLLOW; a subdirectory through `sub`). Use it as a context manager, or `close` it."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self.fd = fd

    @classmethod
    def open(cls, path: Path) -> Folder:
        """The directory the admin named (a link to it is followed: that is where they pointed us)."""
        return cls(path, os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))

    def sub(self, name: str, create: bool = False, mode: int = 0o755) -> Folder:
        """A plain directory beneath this one; a symlink (or a file) under that name is refused, never followed."""
        _check_name(name)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, mode, dir_fd=self.fd)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise OSError(
                    exc.errno, "a symlink or not a directory: never written through", str(self.path / name)
                ) from None
            raise
        return Folder(self.path / name, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return os.listdir(self.fd)

    def read(self, name: str, limit: int = MAX_FILE_BYTES) -> bytes:
        """A regular file beneath, not through a link, never blocking."""
        return read_regular(_check_name(name), limit, follow=False, dir_fd=self.fd)

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(_check_name(name), dir_fd=self.fd, follow_symlinks=False)

    def exists(self, name: str) -> bool:
        try:
            self.lstat(name)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, name: str) -> bool:
        """Remove a name (not a directory); False if it was not there."""
        try:
            os.unlink(_check_name(name), dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def rmdir(self, name: str) -> bool:
        """Remove an empty subdirectory; False if it is not there or not empty."""
        try:
            os.rmdir(_check_name(name), dir_fd=self.fd)
        except OSError:
            return False
        return True

    def rename(self, source: str, target: str, replace: bool = True) -> None:
        """`replace` False: fails (FileExistsError) rather than replace a file under `target`."""
        if replace:
            os.rename(_check_name(source), _check_name(target), src_dir_fd=self.fd, dst_dir_fd=self.fd)
        else:
            _renameat2(self.fd, _check_name(source), self.fd, _check_name(target), _RENAME_NOREPLACE)

    def exchange(self, a: str, b: str) -> bool:
        """Swap two names in one step (RENAME_EXCHANGE); False where the kernel or filesystem cannot."""
        try:
            _renameat2(self.fd, _check_name(a), self.fd, _check_name(b), _RENAME_EXCHANGE)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return False
            raise
        return True

    @contextmanager
    def writing(self) -> Iterator[None]:
        """A shared lock on the directory while a temp file of ours lives in it: `remove_stale_temps` takes the
        lock exclusively, so it never removes a temp file (or a swapped-out file) a live writer still holds."""
        fcntl.flock(self.fd, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def write_atomic(
        self,
        name: str,
        data: bytes,
        mode: int | None = None,
        expect: bytes | None = None,
        held: list[Any] | None = None,
    ) -> bool:
        """Write beside the target, fsync, rename: readers see the old file or the new one, never half.

        The file keeps its mode (`mode` None: the target's own, 0644 for a new file). With `expect`, the new
        file replaces the target only if the target held those bytes at the instant of the swap (`exchange`):
        an edit the primary CNI made since we read the file, even one landing between our check and our
        rename, is never overwritten; returns whether it wrote. `held`: the file swapped out is appended as a
        `Held` (its fd kept open) so the caller can see a write that lands in it after the swap (an in-place
        writer that opened it before).
        """
        _check_name(name)
        if mode is None:
            try:
                mode = self.lstat(name).st_mode & 0o777
            except FileNotFoundError:
                mode = 0o644
        tmp = temp_name(Path(name), "tmp").name
        with self.writing():
            fd, named = self._locked_temp(tmp, mode)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                os.fchmod(fd, mode)  # not subject to umask
                if not named:  # an unnamed file until now, written whole and locked: it appears as such
                    os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=self.fd, follow_symlinks=True)
                if expect is None:
                    os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
                    return True
                return self._swap_in(tmp, name, expect, held)
            except BaseException:
                self.unlink(tmp)
                raise
            finally:
                os.close(fd)

    def _locked_temp(self, tmp: str, mode: int) -> tuple[int, bool]:
        """An fd to write the temp file through, already locked, and whether it has its name yet. An unnamed
        file (O_TMPFILE) gets its name only once written: a writer killed before that leaves nothing. Where
        O_TMPFILE is not supported, the named file is created and locked at once."""
        try:
            fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode, dir_fd=self.fd)
            named = False
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            fd = os.open(tmp, flags, mode, dir_fd=self.fd)
            named = True
        fcntl.flock(fd, fcntl.LOCK_EX)  # for an agent of an earlier version, which looks at this lock only
        return fd, named

    def _swap_in(self, tmp: str, name: str, expect: bytes, held: list[Any] | None) -> bool:
        """`tmp` in place of `name` only if `name` held `expect` at the instant of the swap; tmp is gone after.
        Runs under `writing()`: what is swapped out sits under our temp name, and no cleanup of ours takes it."""
        if not self.exchange(tmp, name):  # no RENAME_EXCHANGE here: check, then rename (a narrow window remains)
            if self.read(name) != expect:
                self.unlink(tmp)
                return False
            os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            return True
        fd = os.open(tmp, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            info = os.fstat(fd)
            theirs = read_regular(f"/proc/self/fd/{fd}") if stat.S_ISREG(info.st_mode) else None
            if theirs == expect:  # the swapped-out file holds what the target held at the swap
                self.unlink(tmp)
                if held is not None:
                    held.append(Held(fd, expect, info))
                    fd = -1
                return True
            self.exchange(tmp, name)  # changed meanwhile: theirs goes back in place, ours is dropped
            self.unlink(tmp)
            return False
        finally:
            if fd >= 0:
                os.close(fd)


class Held:
    """A file we swapped out, its fd kept: an in-place writer that opened it before our swap writes into it
    afterwards, where no reader would ever see it. `changed()` tells, `latest()` gives its bytes then."""

    def __init__(self, fd: int, data: bytes, info: os.stat_result) -> None:
        self.fd, self.data = fd, data
        self.stamp = (info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def changed(self) -> bool:
        info = os.fstat(self.fd)
        return (info.st_size, info.st_mtime_ns, info.st_ctime_ns) != self.stamp and self.latest() != self.data

    def latest(self) -> bytes:
        return read_regular(f"/proc/self/fd/{self.fd}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_renameat2_fn: Callable[..., int] | None = None


def _renameat2(old_fd: int, old: str, new_fd: int, new: str, flags: int) -> None:
    global _renameat2_fn
    if _renameat2_fn is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _renameat2_fn = getattr(libc, "renameat2", None) or (lambda *_: -2)
    rc = _renameat2_fn(old_fd, os.fsencode(old), new_fd, os.fsencode(new), flags)
    if rc == -2:
        raise OSError(errno.ENOSYS, "renameat2 is not available", new)
    if rc != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), new)


def write_atomic(path: Path, data: bytes, mode: int | None = None, expect: bytes | None = None) -> bool:
    """`Folder.write_atomic` in `path`'s own directory (the caller's path is trusted: the bin dir, the owner file)."""
    with Folder.open(path.parent) as folder:
        return folder.write_atomic(path.name, data, mode, expect)


def copy_tree_atomic(source: Path, target: Path) -> bool:
    """Copy a folder to `target` through a staging dir of its own beside it, then rename: `target` appears
    whole or not at all. False if another writer put `target` there first; the staging dir never stays."""
    with Folder.open(target.parent) as folder, folder.writing():  # a cleanup of ours leaves the staging dir be
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.cni-redirect-staging-", dir=target.parent))
        try:
            shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700
            try:
                os.rename(staging, target)
            except OSError:
                if target.is_dir():
                    return False  # another agent copied the same version meanwhile: theirs is as good
                raise
            return True
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def is_temp(name: str) -> bool:
    """One of our temp names: a file being written, a link or a bundle being staged."""
    return name.startswith(".") and any(f".cni-redirect-{kind}-" in name for kind in ("tmp", "link", "staging"))


def remove_stale_temps(folder: Path) -> list[str]:
    """Our temp files in `folder` that no live writer holds (an agent killed mid-write left them): removed.

    Only while no writer of ours is in the folder (its lock, taken exclusively without waiting: else nothing
    now, the next pass tries again); and of each, only a file (or a staging dir) no live writer has locked.
    A FIFO or anything else under such a name is never opened for reading, so nothing here blocks."""
    removed: list[str] = []
    try:
        directory = Folder.open(folder)
    except OSError:
        return removed
    with directory:
        try:
            fcntl.flock(directory.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return removed  # a writer of ours is at work here
        try:
            for name in directory.names():
                if is_temp(name) and _remove_if_unlocked(directory, name):
                    removed.append(name)
        finally:
            fcntl.flock(directory.fd, fcntl.LOCK_UN)
    return removed


def _remove_if_unlocked(directory: Folder, name: str) -> bool:
    try:
        info = directory.lstat(name)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(info.st_mode):  # a staging dir a killed copy left (a live copy holds the folder lock)
        shutil.rmtree(directory.path / name, ignore_errors=True)
        return True
    if stat.S_ISLNK(info.st_mode):  # a link made under a temp name, never renamed into place
        return directory.unlink(name)
    if not stat.S_ISREG(info.st_mode):
        return False  # a FIFO, a socket, a device under our name: not ours, left alone
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory.fd)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live writer of an earlier version holds it
    finally:
        os.close(fd)
    return directory.unlink(name)


def tree_digest(path: Path) -> str:
    """A content hash of a file or folder, naming a bundle version."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
