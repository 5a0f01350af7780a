"""Installing the plugin into the node's CNI bin dir, and removing it.

A bundle folder is copied as `cni-redirect-bundle-<content hash>/` under a
temp name and renamed into place; the `cni-redirect` symlink is then pointed
at it by atomic rename, so no runtime ever execs a half-written file. The
previous bundle is kept for a pod setup still running from it; older ones
are removed. A single executable is written in place, atomically.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .files import copy_tree_atomic, temp_name, tree_digest, write_atomic

BINARY = "cni-redirect"
BUNDLE_PREFIX = "cni-redirect-bundle-"


class Bundle:
    """The plugin in one CNI bin dir, from one source (a bundle folder or an executable)."""

    def __init__(self, source: Path, bin_dir: Path, log: Callable[..., None]) -> None:
        self.source = source
        self.bin_dir = bin_dir
        self.log = log
        self.link = bin_dir / BINARY

    def install(self) -> None:
        if not self.source.exists():
            raise FileNotFoundError(f"--plugin-source {self.source} does not exist")
        if not self.bin_dir.is_dir():
            raise FileNotFoundError(f"--cni-bin-dir {self.bin_dir} is not a directory")
        if self.source.is_dir():
            self._install_folder()
        else:
            data = self.source.read_bytes()
            if not (self.link.is_file() and not self.link.is_symlink() and self.link.read_bytes() == data):
                write_atomic(self.link, data, mode=0o755)
                self.log("info", "installed plugin binary", path=str(self.link))

    def _install_folder(self) -> None:
        executable = self.source / BINARY
        if not executable.is_file():
            raise FileNotFoundError(f"--plugin-source {self.source} has no {BINARY} executable")
        version = f"{BUNDLE_PREFIX}{tree_digest(self.source)}"
        target = self.bin_dir / version
        if not target.exists() and copy_tree_atomic(self.source, target):
            self.log("info", "copied plugin bundle", path=str(target))
        wanted = f"{version}/{BINARY}"
        before = self._linked_version()
        if not (self.link.is_symlink() and os.readlink(self.link) == wanted):
            tmp_link = temp_name(self.link, "link")
            tmp_link.symlink_to(wanted)  # fails rather than reuse a name: symlink() creates exclusively
            os.replace(tmp_link, self.link)
            self.log("info", "linked plugin", path=str(self.link), target=wanted)
        # Keep the bundle the link pointed to a moment ago: a pod setup already running from it must finish.
        # (Not the newest by mtime: copytree copies the image's mtimes, and after a rollback the newest is
        # not the one in use.)
        self._prune(keep={version, *([before] if before else [])})

    def _linked_version(self) -> str | None:
        """The bundle folder the link points to now, if it is one of ours."""
        try:
            target = os.readlink(self.link)
        except OSError:
            return None
        folder = target.split("/", 1)[0]
        return folder if folder.startswith(BUNDLE_PREFIX) else None

    def _prune(self, keep: set[str]) -> None:
        for path in self.bin_dir.glob(f"{BUNDLE_PREFIX}*"):
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
                self.log("info", "removed old plugin bundle", path=str(path))

    def present(self) -> bool:
        return os.access(self.link, os.X_OK) and self.link.resolve().is_file()

    def ensure(self) -> None:
        """Reinstall if someone removed the plugin from the bin dir."""
        if not self.present():
            self.log("warning", "plugin binary missing, reinstalling")
            self.install()

    def remove(self) -> None:
        if self.link.is_symlink() or self.link.exists():
            self.link.unlink()
            self.log("info", "removed plugin", path=str(self.link))
        for path in self.bin_dir.glob(f"{BUNDLE_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
            self.log("info", "removed plugin bundle", path=str(path))
