"""Drop-in chaining: our entry as libcni's drop-in file, so the primary's own file is never edited.

libcni >= 1.3 (containerd >= 2.1, CRI-O >= 1.33, Multus >= 4.2.1) also runs the
plugins it finds in `<conf dir>/<network name>/*.conf`, after the inlined ones,
in file name order, unless the conflist sets `loadOnlyInlinedPlugins: true`.
Writing ours there leaves the admin's and the primary CNI's file byte for byte
as they wrote it: a primary that rewrites its conflist cannot drop us, and
nothing of theirs is ever to restore.

The runtimes watch only the top directory, so every change of a drop-in is
followed by a write-and-rename of `.cni-redirect-reload` there: containerd and
CRI-O reload on the rename. `ModeChoice` decides, once per agent, whether the
node's runtime loads drop-ins (`chain_mode`: dropin, edit, or auto from CRI's
Version answer).

Never written through a link: `<conf dir>/<network name>` is opened beneath the
conf dir without following a symlink (a link there is refused before, in the
snapshot, and again at the open, so a link put there meanwhile is refused too).

Files only: this module never touches a network namespace or nftables.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import Folder, write_atomic
from . import conflists
from .confdir import DROPIN_NAME, ChainMode, ConfDir

RELOAD_MARKER = ".cni-redirect-reload"  # hidden, no CNI suffix: libcni never loads it as a config

#: The first release of each runtime whose libcni loads drop-ins (containerd 2.1: libcni 1.3.0).
DROPIN_RUNTIMES = {"containerd": (2, 1), "cri-o": (1, 33)}


def loads_dropins(runtime_name: str, runtime_version: str) -> bool:
    """Whether a runtime, by CRI Version's name and version, loads libcni drop-ins."""
    first = DROPIN_RUNTIMES.get(runtime_name.lower())
    match = re.match(r"v?(\d+)\.(\d+)", runtime_version)
    return first is not None and match is not None and (int(match[1]), int(match[2])) >= first


@dataclass(frozen=True)
class ModeChoice:
    """The chain mode this agent uses where the primary allows drop-ins, and why."""

    mode: ChainMode
    why: str


def choose_mode(setting: str, runtime: Callable[[], tuple[str, str]]) -> ModeChoice:
    """`chain_mode` as set; `auto` asks the runtime (CRI Version) and edits when it cannot tell."""
    if setting == "dropin":
        return ModeChoice(ChainMode.DROPIN, "chain_mode dropin")
    if setting == "edit":
        return ModeChoice(ChainMode.EDIT, "chain_mode edit")
    try:
        name, version = runtime()
    except Exception as exc:  # the CRI socket missing, refused, slow: editing works with every runtime
        return ModeChoice(ChainMode.EDIT, f"chain_mode auto: the runtime did not say its version ({exc}); editing")
    if loads_dropins(name, version):
        return ModeChoice(ChainMode.DROPIN, f"chain_mode auto: {name} {version} loads libcni drop-ins")
    return ModeChoice(ChainMode.EDIT, f"chain_mode auto: {name} {version} does not load libcni drop-ins")


def signal_reload(conf_dir: Path) -> None:
    """A write-and-rename in the top dir: the runtimes' watchers see only that dir, never the drop-in's."""
    write_atomic(conf_dir / RELOAD_MARKER, f"{time.time():.6f}\n".encode(), mode=0o644)


class DropinChain:
    """Our entry as the drop-in of the primary's network; `ready_reason` "" when it is in place."""

    def __init__(self, conf_dir: Path, entry: dict[str, Any], log: Callable[..., None]) -> None:
        self.conf_dir = conf_dir
        self.entry = entry
        self.log = log
        self.rendered = conflists.render(entry)
        self.writes = 0  # drop-ins written: each one may follow pods started without us

    def reconcile(self, snapshot: ConfDir, signal: bool = True) -> str:
        """Our drop-in in place for the snapshot's primary (which allows drop-ins), stale ones gone; returns its
        path. Raises OSError when it cannot write (a link under the network's name among the reasons).
        `signal` False: the caller's next write in the top dir makes the runtimes reload."""
        primary = snapshot.primary
        assert primary is not None and not primary.dropin_refusal()
        current = snapshot.dropin()
        changed = False
        with Folder.open(self.conf_dir) as top:
            if current is None or current.data != self.rendered:
                with top.sub(primary.network, create=True) as folder:
                    folder.write_atomic(DROPIN_NAME, self.rendered, mode=0o644)
                self.log("info", "wrote our drop-in: the primary's file is left as it is",
                         path=str(self.conf_dir / primary.network / DROPIN_NAME))  # fmt: skip
                self.writes += 1
                changed = True
            for stale in snapshot.stale_dropins():  # the node's primary changed network (flannel to Calico)
                changed |= self._remove(top, stale.path, "removed our drop-in of a network the runtime no longer uses")
        if changed and signal:
            signal_reload(self.conf_dir)
        return f"{primary.network}/{DROPIN_NAME}"

    def uninstall(self, snapshot: ConfDir) -> bool:
        """Every drop-in of ours out (its folder too when it was only ours); True if anything was removed."""
        removed = False
        with Folder.open(self.conf_dir) as top:
            for dropin in snapshot.dropins:
                if dropin.plugin is not None:
                    removed |= self._remove(top, dropin.path, "removed our drop-in")
        if removed:
            signal_reload(self.conf_dir)
        return removed

    def _remove(self, top: Folder, path: Path, message: str) -> bool:
        network = path.parent.name
        try:
            with top.sub(network) as folder:
                if not folder.unlink(path.name):
                    return False
        except OSError:
            return False  # a link or a file under the network's name now: not ours to follow
        self.log("info", message, path=str(path))
        top.rmdir(network)  # only when empty: another drop-in of the admin's stays, with its folder
        return True


def clear_reload_marker(conf_dir: Path) -> None:
    """Uninstall's last step: the marker goes (its removal is one more reload for the runtimes)."""
    (conf_dir / RELOAD_MARKER).unlink(missing_ok=True)
