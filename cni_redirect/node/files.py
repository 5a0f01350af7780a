"""File helpers for the node agent: atomic writes (and swaps), leftovers of dead writers, content digests."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def temp_name(path: Path, kind: str) -> Path:
    """A name beside `path` that no other writer uses: in a container every agent is PID 1, so a name from
    the PID is shared by an old and a new agent during a surge. Random, and created exclusively by the caller."""
    return path.with_name(f".{path.name}.cni-redirect-{kind}-{secrets.token_hex(8)}")


def copy_tree_atomic(source: Path, target: Path) -> bool:
    """Copy a folder to `target` through a staging dir of its own beside it, then rename: `target` appears
    whole or not at all. False if another writer put `target` there first; the staging dir never stays."""
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


def write_atomic(path: Path, data: bytes, mode: int | None = None, expect: bytes | None = None) -> bool:
    """Write beside the target, fsync, rename: readers see the old file or the new one, never half.

    The file keeps its mode (`mode` None: the target's own, 0644 for a new file). With `expect`, the new
    file replaces the target only if the target held those bytes at the instant of the swap (`exchange`):
    an edit the primary CNI made since we read the file, even one landing between our check and our
    rename, is never overwritten; returns whether it wrote. The temp file is locked while it lives, so a
    later agent can tell a dead writer's leftover from a live writer's file (`remove_stale_temps`).
    """
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
    tmp = temp_name(path, "tmp")
    fd, named = _locked_temp(path.parent, tmp, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.fchmod(fd, mode)  # not subject to umask
        if not named:  # an unnamed file until now, written whole and locked: it appears as such
            _name_tmpfile(fd, tmp)
        if expect is None:
            os.replace(tmp, path)
            return True
        return _swap_in(tmp, path, expect)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _locked_temp(folder: Path, tmp: Path, mode: int) -> tuple[int, bool]:
    """An fd to write the temp file through, already locked, and whether it has its name yet. An unnamed
    file (O_TMPFILE) gets its name only once written: `remove_stale_temps` never sees a live writer's file
    unlocked, and a writer killed before the name leaves nothing. Where O_TMPFILE is not supported, the
    named file is created and locked at once (a window of a few instructions)."""
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, mode)
        named = False
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        named = True
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, named


def _name_tmpfile(fd: int, tmp: Path) -> None:
    """linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N: os.link takes that path only when given a dir fd (without
    one it calls link(), which would link the /proc symlink itself and fail with EXDEV)."""
    folder = os.open(tmp.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.link(f"/proc/self/fd/{fd}", tmp.name, dst_dir_fd=folder, follow_symlinks=True)
    finally:
        os.close(folder)


def _swap_in(tmp: Path, path: Path, expect: bytes) -> bool:
    """`tmp` in place of `path` only if `path` held `expect` at the instant of the swap; tmp is gone after."""
    if not exchange(tmp, path):  # no RENAME_EXCHANGE here: check, then rename (a narrow window remains)
        if path.read_bytes() != expect:
            tmp.unlink()
            return False
        os.replace(tmp, path)
        return True
    if tmp.read_bytes() == expect:  # tmp now holds what the target held at the swap
        tmp.unlink()
        return True
    exchange(tmp, path)  # changed meanwhile: theirs goes back in place, ours is dropped
    tmp.unlink()
    return False


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Callable[..., int] | None = None


def exchange(a: Path, b: Path) -> bool:
    """Swap two names in one step (renameat2 RENAME_EXCHANGE); False where the kernel or filesystem cannot."""
    global _renameat2
    if _renameat2 is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _renameat2 = getattr(libc, "renameat2", None) or (lambda *_: -2)
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == -2:
        return False
    if rc != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise OSError(code, os.strerror(code), str(b))
    return True


def remove_stale_temps(folder: Path) -> list[str]:
    """Our temp files in `folder` that no live writer holds (an agent killed mid-write left them): removed."""
    removed = []
    for name in os.listdir(folder):
        if not (name.startswith(".") and ".cni-redirect-tmp-" in name):
            continue
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)
        removed.append(name)
    return removed


def tree_digest(path: Path) -> str:
    """A content hash of a file or folder, naming a bundle version."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
