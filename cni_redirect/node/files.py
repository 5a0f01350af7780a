"""File helpers for the node agent: atomic writes and content digests."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
    tmp = path.with_name(f".{path.name}.cni-redirect-tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
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
