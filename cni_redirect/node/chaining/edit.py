"""Edit mode: our entry inlined last in the primary's own config file, and taken out again byte for byte.

1. append our entry to the primary's chain (replacing a stale one, never
   duplicating); a single-plugin `.conf` becomes a `.conflist`: the conflist is
   written first, then the `.conf` renamed to its backup, so a runtime always
   finds a network (for a moment the `.conf`, which sorts first, without us);
2. re-insert when the primary CNI rewrites its file, writing only when
   something changed, and never over bytes it wrote since we read them (a swap
   that checks); a write the primary makes in place into the file we swapped
   out is seen (its fd is held) and put back;
3. on uninstall remove only what we added, restoring the primary's bytes (and
   the converted `.conf`, again never leaving the dir without a network).

A conversion or restore is journalled first, so a kill at any step is finished
or undone by the next agent or uninstall. The journal names files by base name
only, of our own forms; anything else in it is refused and reported.

Files only: this module never touches a network namespace or nftables.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfError
from ..files import Folder, Held, read_regular, remove_stale_temps
from . import conflists
from .confdir import BACKUP_PREFIX, INLINE_ONLY, ConfDir, Primary, backup_name, read_conf_dir, real_path

#: A conversion or restore in progress (hidden, no CNI suffix): what a restarted agent finishes or undoes.
JOURNAL = ".cni-redirect-journal"
#: How long a swapped-out primary file is watched for a write landing in it (an in-place writer).
HOLD_SECONDS = 3.0
SINGLE_SUFFIXES = (".conf", ".json")


@dataclass
class Managed:
    """What we wrote into one conf file, to undo exactly that."""

    name: str  # the file holding our entry now
    original_name: str  # the primary's file (differs when we converted a .conf)
    original: bytes  # the primary's bytes just before our latest write
    written: bytes  # our latest write
    rendered: bool = False  # `original` was re-rendered (no backup matched): never written as a backup


@dataclass(frozen=True)
class Step:
    """A journalled step, its names checked: base names of our own forms, inside the conf dir."""

    op: str  # "convert" or "restore"
    single: str  # the single-plugin config's name
    conflist: str  # the conflist it becomes (conflist_name(single))

    @classmethod
    def parse(cls, data: bytes) -> Step:
        """The journal's step, or ConfError saying why it is not one of ours."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise ConfError(f"{JOURNAL}: not valid JSON") from None
        if not isinstance(raw, dict) or set(raw) != {"op", "single", "conflist"}:
            raise ConfError(f"{JOURNAL}: not a step of ours: {str(raw)[:200]!r}")
        op, single, conflist = raw["op"], raw["single"], raw["conflist"]
        if op not in ("convert", "restore"):
            raise ConfError(f"{JOURNAL}: unknown op {str(op)[:50]!r}")
        if not (isinstance(single, str) and _plain(single) and single.endswith(SINGLE_SUFFIXES)):
            raise ConfError(f"{JOURNAL}: {str(single)[:100]!r} is not a single-plugin config's name in the conf dir")
        if conflist != conflists.conflist_name(single):
            raise ConfError(f"{JOURNAL}: {str(conflist)[:100]!r} is not the conflist {single} becomes")
        return cls(op, single, conflist)

    def render(self) -> bytes:
        return json.dumps({"op": self.op, "single": self.single, "conflist": self.conflist}).encode() + b"\n"


def _plain(name: str) -> bool:
    """A base name in the conf dir: no separator, not hidden (ours are the only hidden names), not . or .."""
    return bool(name) and "/" not in name and "\0" not in name and not name.startswith(".") and len(name) < 256


class EditChain:
    """Our entry inlined in the primary's file, in one conf dir; what we wrote, to undo exactly that."""

    def __init__(self, conf_dir: Path, entry: dict[str, Any], log: Callable[..., None]) -> None:
        self.conf_dir = conf_dir
        self.entry = entry
        self.log = log
        self.managed: Managed | None = None
        self.writes = 0  # how often we (re-)inserted our entry: each one may follow pods started without us
        self.held: list[Held] = []  # primary files we swapped out, watched for a late in-place write
        self._held_since = 0.0

    # --- placing the entry ---

    def place(self, primary: Primary, inline_only: bool = False) -> str | None:
        """Our entry last in the primary's chain (with `loadOnlyInlinedPlugins` true for a mode switch); returns
        the file holding it, or None when the primary changed it meanwhile (the next pass reads it again).
        ConfError when it must not write (a conversion would overwrite a file that is not ours)."""
        theirs = primary.theirs()
        desired = conflists.with_entry(theirs, self.entry)
        if inline_only:
            desired = {**desired, INLINE_ONLY: True}
        if not primary.single and conflists.names_us(primary.document) and not self._manages(primary.name):
            self.adopt(primary)  # a restarted or upgraded agent: the primary's bytes are in a backup
        if not primary.single and primary.document == desired:
            self._heal_backup(primary.name, primary.data)
            return primary.name
        return self._write(primary, desired)

    def _manages(self, name: str) -> bool:
        return self.managed is not None and self.managed.name == name

    def _write(self, primary: Primary, desired: dict[str, Any]) -> str | None:
        name, data, single = primary.name, primary.data, primary.single
        rendered = conflists.render(desired)
        source = real_path(self.conf_dir, name)
        mode = source.stat().st_mode & 0o777
        target = conflists.conflist_name(name) if single else name
        if single and self._foreign(target):
            raise ConfError(
                f"{name} is the primary config, but making it a conflist would overwrite {target}, "
                "which cni-redirect did not write; left both untouched (remove one, or set --conf-file)"
            )
        managed = self.managed
        ours_already = managed is not None and managed.name == name and data == managed.written
        # The primary's own bytes: what is there now, unless what is there is our earlier write. If what is
        # there still names us (another installer rewrote the file and kept our entry, or a killed switch),
        # restoring those bytes would bring our entry back: keep everything of theirs but that.
        names_us = conflists.names_us(primary.document)
        theirs = data if not names_us else self._backup_matching(name, primary.theirs())
        re_rendered = theirs is None
        if theirs is None:
            theirs = conflists.render(primary.theirs())
        original = managed.original if managed is not None and ours_already else theirs
        original_name = managed.original_name if managed is not None and ours_already else name
        re_rendered = managed.rendered if managed is not None and ours_already else re_rendered
        with Folder.open(self.conf_dir) as top, Folder.open(source.parent) as folder:
            if single:
                self._convert(top, name, target, rendered, mode)
                self.log("info", "converted single-plugin config and added our entry", source=name, path=target)
            else:
                # When the file holds our own last write, the backup already has what we would write; bytes we
                # re-rendered never replace a backup that is there.
                if not ((ours_already or re_rendered) and top.exists(backup_name(original_name))):
                    top.write_atomic(backup_name(original_name), original, mode=0o600)
                if not folder.write_atomic(source.name, rendered, mode=mode, expect=data, held=self.held):
                    return None  # the primary rewrote its file since we read it: the next pass reads the new one
                self._held_since = time.monotonic()
                self.log("info", "added our entry to the primary CNI config", path=name)
        self.managed = Managed(target, original_name, original, rendered, re_rendered)
        self.writes += 1
        return target

    def _backup_matching(self, name: str, theirs: dict[str, Any]) -> bytes | None:
        """The backup of `name` if it holds the primary's document as it is now (our entry aside)."""
        try:
            kept = read_regular(self.conf_dir / backup_name(name), follow=False)
            if conflists.without_entry(conflists.parse(name, kept)[0]) == theirs:
                return kept
        except (OSError, ConfError):
            pass
        return None

    def _convert(self, folder: Folder, name: str, target: str, rendered: bytes, mode: int) -> None:
        """`X.conf` becomes `X.conflist`: the conflist is written, then the `.conf` renamed to its backup. For that
        moment both configure the network (the `.conf` sorts first: the runtime runs it, without us, as it did
        before); never neither. A journal written first lets an agent killed in between finish it."""
        self._journal(folder, Step("convert", name, target))
        folder.write_atomic(target, rendered, mode=mode)
        folder.rename(name, backup_name(name))
        folder.unlink(JOURNAL)

    def _journal(self, folder: Folder, step: Step) -> None:
        folder.write_atomic(JOURNAL, step.render(), mode=0o600)

    def adopt(self, primary: Primary) -> None:
        """An entry of ours is already there (an agent restart, an upgrade, uninstall): find the primary's bytes
        to restore later, from the backups themselves (a converted `.conf` is gone from the dir; its backup is
        not)."""
        name, theirs = primary.name, primary.theirs()
        for original_name in self.backed_up():
            if original_name != name and conflists.conflist_name(original_name) != name:
                continue
            try:
                original = read_regular(self.conf_dir / backup_name(original_name), follow=False)
                if conflists.without_entry(conflists.parse(original_name, original)[0]) == theirs:
                    self.managed = Managed(name, original_name, original, primary.data)
                    return
            except (OSError, ConfError):
                continue
        self.managed = Managed(name, name, conflists.render(theirs), primary.data, rendered=True)

    def backed_up(self) -> list[str]:
        """The names whose primary bytes we keep a backup of, from the backup files' own names."""
        suffix = ".bak"
        return sorted(
            n[len(BACKUP_PREFIX) : -len(suffix)]
            for n in os.listdir(self.conf_dir)
            if n.startswith(BACKUP_PREFIX) and n.endswith(suffix) and _plain(n[len(BACKUP_PREFIX) : -len(suffix)])
        )

    def _heal_backup(self, name: str, data: bytes) -> None:
        """Our last write is in place but its backup is gone (`uninstall --force` beside a running agent): put
        the primary's bytes we hold back, so a later uninstall still restores them byte for byte."""
        managed = self.managed
        if managed is None or managed.name != name or managed.written != data or managed.rendered:
            return
        with Folder.open(self.conf_dir) as folder:
            if not folder.exists(backup_name(managed.original_name)):
                folder.write_atomic(backup_name(managed.original_name), managed.original, mode=0o600)
                self.log("info", "put back the backup of the primary's bytes", path=backup_name(managed.original_name))

    def _foreign(self, name: str) -> bool:
        """Whether a file exists that we did not write (or that changed since we wrote it)."""
        path = self.conf_dir / name
        if not path.exists() and not path.is_symlink():
            return False
        managed = self.managed
        try:
            ours = managed is not None and managed.name == name and read_regular(path, follow=False) == managed.written
            return not ours
        except OSError:
            return True

    # --- an in-place writer that opened the file before our swap ---

    def wants_pass_in(self) -> float | None:
        """Seconds until the held files must be looked at again (None: nothing held)."""
        return 0.1 if self.held else None

    def replay_late_writes(self) -> bool:
        """A held file that changed after our swap: the primary wrote its newest bytes into it in place, where no
        reader sees them. They are put back in place (the next pass inserts our entry into them). True if so."""
        replayed = False
        managed = self.managed
        for held in list(self.held):
            try:
                changed = held.changed()
                latest = held.latest() if changed else b""
            except OSError:
                changed = False
            if changed and managed is not None:
                path = real_path(self.conf_dir, managed.name)
                try:
                    with Folder.open(path.parent) as folder:
                        current = folder.read(path.name)
                        if current == managed.written and folder.write_atomic(path.name, latest, expect=current):
                            self.log("warning", "the primary wrote its config in place as we swapped it: put back",
                                     path=managed.name)  # fmt: skip
                            replayed = True
                except (OSError, ConfError):
                    pass
            if changed or time.monotonic() - self._held_since > HOLD_SECONDS:
                held.close()
                self.held.remove(held)
        return replayed

    def release_held(self) -> None:
        for held in self.held:
            held.close()
        self.held.clear()

    # --- a step a killed agent or uninstall left ---

    def recover(self, finish: bool) -> None:
        """A conversion or restore that a killed agent or uninstall left half done: `finish` it (the agent, with
        its entry), or undo it (uninstall). Then our temp files that no live writer holds go. A journal that is
        not one of ours is refused (ConfError, after it is removed: nothing of it is acted on)."""
        for name in remove_stale_temps(self.conf_dir):
            self.log("info", "removed a temp file a killed writer left", path=name)
        with Folder.open(self.conf_dir) as folder:
            try:
                data = folder.read(JOURNAL)
            except FileNotFoundError:
                return
            except OSError as exc:  # a FIFO, a link, a directory under our name: not ours to act on
                raise ConfError(
                    f"{JOURNAL} in --cni-conf-dir is not a file of ours ({exc.strerror}); left it"
                ) from None
            try:
                step = Step.parse(data)
            except ConfError as exc:
                folder.unlink(JOURNAL)
                self.log("error", "refused a journal that is not ours: removed, nothing of it done", error=str(exc))
                raise
            if step.op == "convert":
                self._recover_convert(folder, step, finish)
            else:
                self._finish_restore(folder, step)
            folder.unlink(JOURNAL)

    def _recover_convert(self, folder: Folder, step: Step, finish: bool) -> None:
        single, conflist, backup = folder.exists(step.single), folder.exists(step.conflist), backup_name(step.single)
        if finish:
            if single and not conflist:  # killed before the conflist was written: start again
                data = folder.read(step.single)
                document, _ = conflists.parse(step.single, data)
                rendered = conflists.render(conflists.with_entry(document, self.entry))
                folder.write_atomic(step.conflist, rendered, mode=folder.lstat(step.single).st_mode & 0o777)
                conflist = True
            if single and conflist:
                folder.rename(step.single, backup)
            elif not single and not conflist and folder.exists(backup):  # an earlier version's order
                document, _ = conflists.parse(step.single, folder.read(backup))
                rendered = conflists.render(conflists.with_entry(document, self.entry))
                folder.write_atomic(step.conflist, rendered, mode=folder.lstat(backup).st_mode & 0o777)
            self.log("info", "finished converting a single-plugin config that a killed agent left", path=step.conflist)
            return
        if not single and folder.exists(backup):
            folder.rename(backup, step.single, replace=False)  # the .conf back first: never no network
        if conflist and _names_us(folder, step.conflist):
            folder.unlink(step.conflist)
        self.log("info", "undid a conversion that a killed agent left", path=step.single)

    def _finish_restore(self, folder: Folder, step: Step) -> None:
        backup = backup_name(step.single)
        if not folder.exists(step.single) and folder.exists(backup):
            folder.rename(backup, step.single, replace=False)
        if folder.exists(step.conflist) and _names_us(folder, step.conflist):
            folder.unlink(step.conflist)
        self.log("info", "finished restoring a single-plugin config that a killed uninstall left", path=step.single)

    # --- a former primary, and taking the entry out ---

    def release_old_primaries(self, *current: str) -> None:
        """The node's primary changed (flannel to Calico): our entry comes out of the file we edited before (its
        bytes restored from the backup when nothing else changed), and its backup goes; a backup whose file is
        gone is dropped. Only files we hold a backup of are touched: another installer's entry is not ours."""
        if (self.conf_dir / JOURNAL).exists():
            return  # a step in progress is recover()'s
        for original_name in self.backed_up():
            names = {original_name, conflists.conflist_name(original_name)}
            if names & set(current):
                continue
            backup = self.conf_dir / backup_name(original_name)
            for name in sorted(names):
                path = self.conf_dir / name
                try:
                    data = read_regular(path, follow=False)
                    document, _ = conflists.parse(name, data)
                    kept = read_regular(backup, follow=False)
                    theirs = conflists.parse(original_name, kept)[0]
                except (OSError, ConfError):
                    continue
                if not conflists.names_us(document):
                    continue
                if name != original_name:  # we converted it: the .conf comes back, as on uninstall
                    if conflists.without_entry(document) == conflists.without_entry(theirs):
                        try:
                            self._restore_single(Managed(name, original_name, kept, data))
                        except (ConfError, OSError) as exc:
                            self.log("warning", "left the former primary config as it is", error=str(exc))
                        continue
                    kept = conflists.render(conflists.without_entry(document))
                elif conflists.without_entry(document) != conflists.without_entry(theirs):
                    kept = conflists.render(conflists.without_entry(document))
                with Folder.open(self.conf_dir) as folder:
                    if folder.write_atomic(name, kept, expect=data):
                        self.log("info", "took our entry out of the former primary config", path=name)
            backup.unlink(missing_ok=True)

    def uninstall_inline(self, snapshot: ConfDir | None = None) -> None:
        """Remove only the entry we inlined.

        The primary's file goes back to the bytes it wrote if it still holds exactly what we wrote; otherwise
        our entry (and a switch's flag) is removed from what it holds now and everything else stays."""
        managed = self.managed
        if managed is not None:
            try:
                path = real_path(self.conf_dir, managed.name)
                current: bytes | None = read_regular(path)
            except (FileNotFoundError, ConfError):
                path, current = self.conf_dir / managed.name, None
            with Folder.open(path.parent) as folder:
                if current is not None and current == managed.written:
                    mode = path.stat().st_mode & 0o777
                    if managed.original_name != managed.name:
                        self._restore_single(managed)
                    elif folder.write_atomic(path.name, managed.original, mode=mode, expect=current):
                        self.log("info", "removed our entry; primary config restored byte for byte", path=managed.name)
                elif current is not None:
                    snapshot = snapshot if snapshot is not None else read_conf_dir(self.conf_dir)
                    primary = snapshot.primary if snapshot.primary and snapshot.primary.name == managed.name else None
                    try:
                        document, _ = conflists.parse(managed.name, current)
                    except ConfError:
                        document = {"plugins": []}
                    if conflists.names_us(document):
                        theirs = primary.theirs() if primary is not None else conflists.without_entry(document)
                        folder.write_atomic(path.name, conflists.render(theirs), expect=current)  # keeps its mode
                        self.log("info", "removed our entry from a config the primary changed", path=managed.name)
                folder.unlink(backup_name(managed.original_name))
        self.managed = None
        self.release_held()

    def _restore_single(self, managed: Managed) -> None:
        """The conversion undone, again never without a network: the backup is renamed back to the `.conf` (its
        exact bytes; the `.conf` sorts first, so the runtime runs it at once), then our conflist goes."""
        if self._foreign(managed.original_name) and (self.conf_dir / managed.original_name).exists():
            raise ConfError(f"{managed.original_name} appeared since we converted it; not overwriting it")
        with Folder.open(self.conf_dir) as folder:
            self._journal(folder, Step("restore", managed.original_name, managed.name))
            backup = backup_name(managed.original_name)
            if folder.exists(backup):
                folder.rename(backup, managed.original_name, replace=False)
            else:
                folder.write_atomic(managed.original_name, managed.original, mode=0o644)
            folder.unlink(managed.name)
            folder.unlink(JOURNAL)
        self.log("info", "restored the original single-plugin config", path=managed.original_name)

    def remove_backups(self) -> None:
        """Uninstall's last step: backups of ours that no config needs (left by a killed restore). One whose
        config names us again (an agent put the entry back meanwhile) stays."""
        for original_name in self.backed_up():
            names_us = False
            for name in {original_name, conflists.conflist_name(original_name)}:
                try:
                    data = read_regular(self.conf_dir / name, follow=False)
                    names_us |= conflists.names_us(conflists.parse(name, data)[0])
                except (OSError, ConfError):
                    continue
            if not names_us:
                (self.conf_dir / backup_name(original_name)).unlink(missing_ok=True)


def _names_us(folder: Folder, name: str) -> bool:
    try:
        return conflists.names_us(conflists.parse(name, folder.read(name))[0])
    except (OSError, ConfError):
        return False
