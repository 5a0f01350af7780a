"""File helpers for the node agent: atomic writes and content digests."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
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

    The file keeps its mode (`mode` None: the target's own, 0644 for a new file). With
    `expect`, the rename happens only if the target still holds those bytes, so an edit
    the primary CNI made since we read the file is not overwritten; returns whether it wrote.
    """
    if mode is None:
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
    tmp = temp_name(path, "tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)  # not subject to umask
        if expect is not None and path.read_bytes() != expect:
            tmp.unlink()
            return False
        os.replace(tmp, path)
        return True
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def tree_digest(path: Path) -> str:
    """A content hash of a file or folder, naming a bundle version."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
