"""Installing the plugin into the node's CNI bin dir, and removing it.

A bundle folder is copied as `cni-redirect-bundle-<content hash>/` under a
temp name and renamed into place; the `cni-redirect` symlink is then pointed
at it by atomic rename, so no runtime ever execs a half-written file. The
previous bundle is kept for a pod setup still running from it; older ones
are removed. A single executable is written in place, atomically.

The link must point at the bundle of the agent that runs the node: an agent
taking the node back from a successor that went away points it at its own
again (`installed` is checked on every pass, not only presence).

After uninstall, a runtime that tears pods down from the config it cached at
ADD (CRI-O) still runs `cni-redirect` for DEL of pods set up before: where
that may happen, `del_stub` leaves a few lines of shell under our name that
answer VERSION and let DEL succeed, and nothing else.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..files import Folder, copy_tree_atomic, is_temp, read_regular, temp_name, tree_digest, write_atomic

BINARY = "cni-redirect"
BUNDLE_PREFIX = "cni-redirect-bundle-"
DEL_STUB_MARK = b"# cni-redirect DEL stub"
#: What `uninstall` leaves where pods set up with us may still get DEL from a cached config (CRI-O). The pod's
#: netns, and our table in it, go with the pod: DEL has nothing left to do but succeed.
DEL_STUB = b"""#!/bin/sh
# cni-redirect DEL stub
# cni-redirect was uninstalled from this node. This stub is kept only so a runtime that tears pods down from
# the config it cached at ADD (CRI-O) can finish DEL of pods set up before: DEL succeeds and does nothing.
# `cni-redirect uninstall` removes it once no cached sandbox names cni-redirect.
case "$CNI_COMMAND" in
  VERSION) echo '{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}' ;;
  DEL) cat >/dev/null ;;
  *) cat >/dev/null
     echo '{"cniVersion":"1.0.0","code":4,"msg":"cni-redirect was uninstalled from this node: only DEL is answered"}'
     exit 1 ;;
esac
"""


class Bundle:
    """The plugin in one CNI bin dir, from one source (a bundle folder or an executable)."""

    def __init__(self, source: Path, bin_dir: Path, log: Callable[..., None]) -> None:
        self.source = source
        self.bin_dir = bin_dir
        self.log = log
        self.link = bin_dir / BINARY
        self.version = ""  # the bundle folder this agent installed last (its content hash), "" before

    def install(self) -> None:
        if not self.source.exists():
            raise FileNotFoundError(f"--plugin-source {self.source} does not exist")
        if not self.bin_dir.is_dir():
            raise FileNotFoundError(f"--cni-bin-dir {self.bin_dir} is not a directory")
        if self.source.is_dir():
            self._install_folder()
        else:
            data = self.source.read_bytes()
            if not self._single_installed(data):
                write_atomic(self.link, data, mode=0o755)
                self.log("info", "installed plugin binary", path=str(self.link))

    def _single_installed(self, data: bytes) -> bool:
        try:
            return not self.link.is_symlink() and read_regular(self.link, limit=len(data) + 1) == data
        except OSError:
            return False

    def _install_folder(self) -> None:
        executable = self.source / BINARY
        if not executable.is_file():
            raise FileNotFoundError(f"--plugin-source {self.source} has no {BINARY} executable")
        version = self.version = f"{BUNDLE_PREFIX}{tree_digest(self.source)}"
        target = self.bin_dir / version
        if not target.exists() and copy_tree_atomic(self.source, target):
            self.log("info", "copied plugin bundle", path=str(target))
        wanted = f"{version}/{BINARY}"
        before = self._linked_version()
        if not (self.link.is_symlink() and os.readlink(self.link) == wanted):
            with Folder.open(self.bin_dir) as folder, folder.writing():  # a cleanup of ours leaves the temp be
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

    def installed(self) -> bool:
        """The plugin in place and executable, and this agent's own: the link at our bundle (or our bytes)."""
        if not (os.access(self.link, os.X_OK) and self.link.resolve().is_file()):
            return False
        if self.source.is_dir():  # the version installed last: hashing the bundle on every pass would cost CPU
            return bool(self.version) and self._linked_version() == self.version
        return self._single_installed(self.source.read_bytes())

    def ensure(self) -> None:
        """Reinstall if the plugin is gone from the bin dir, or is not ours (a successor's that went away)."""
        if not self.installed():
            self.log("info", "plugin missing or not this agent's: installing")
            self.install()

    def remove(self) -> None:
        """The plugin, every bundle, and what a killed install left under our temp names."""
        if self.link.is_symlink() or self.link.exists():
            self.link.unlink()
            self.log("info", "removed plugin", path=str(self.link))
        for path in self.bin_dir.glob(f"{BUNDLE_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
            self.log("info", "removed plugin bundle", path=str(path))
        for name in temps(self.bin_dir):
            path = self.bin_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            self.log("info", "removed what a killed install left", path=str(path))

    def del_stub(self) -> None:
        """Uninstall where a runtime may still run DEL of a pod from its cached config: the stub in place of the
        plugin (atomically), every bundle and temp gone."""
        write_atomic(self.link, DEL_STUB, mode=0o755)
        for path in self.bin_dir.glob(f"{BUNDLE_PREFIX}*"):
            shutil.rmtree(path, ignore_errors=True)
        self.log(
            "warning",
            "left a DEL stub as cni-redirect: pods set up before may still get DEL from a cached config (CRI-O); "
            "`cni-redirect uninstall` again removes it once none is cached",
            path=str(self.link),
        )


def is_del_stub(path: Path) -> bool:
    try:
        return not path.is_symlink() and DEL_STUB_MARK in read_regular(path, limit=len(DEL_STUB) + 1)
    except OSError:
        return False


def temps(bin_dir: Path) -> list[str]:
    """Names in the bin dir that a killed install or relink of ours left (temp files, links, staging dirs)."""
    try:
        names = os.listdir(bin_dir)
    except OSError:
        return []
    return sorted(n for n in names if is_temp(n) and n.lstrip(".").startswith(BINARY))  # ours: cni-redirect*
