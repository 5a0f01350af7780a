"""Keeping our entry chained into the node's primary CNI config, and taking it out again.

Where the runtime loads libcni drop-ins and the primary allows them, the entry
is a drop-in (`dropin.py`) and the primary's file is never written. Else it is
edited in:

1. find the primary config (the configured file, else the lexically first
   `.conflist`/`.conf`/`.json`), waiting for one to appear;
2. append our entry (replacing a stale one, never duplicating), turning a
   single-plugin `.conf` into a `.conflist`, by atomic rename;
3. re-insert when the primary CNI rewrites its file, writing only when
   something changed;
4. on uninstall remove only what we added, restoring the bytes the primary
   CNI wrote (and a converted `.conf`).

Files only: this module never touches a network namespace or nftables.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfError, SettingsError
from . import conflists
from .confdir import DROPIN, EDIT, ConfDir, Primary, other_configs_warning, read_conf_dir, real_path
from .dropin import DropinChain, ModeChoice
from .files import remove_stale_temps, write_atomic

BACKUP_PREFIX = ".cni-redirect-original-"
#: A conversion or restore in progress (hidden, no CNI suffix): what a restarted agent finishes or undoes.
JOURNAL = ".cni-redirect-journal"


def load_entry_settings(path: Path | None) -> dict:
    """Our conflist entry from the admin's settings (ConfigMap), checked by `check_entry`."""
    settings: object = {}
    if path is not None:
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"{path}: cannot be read: {exc.strerror}") from None
        except ValueError as exc:
            raise SettingsError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(settings, dict):
        raise SettingsError(f"{path}: must hold a JSON object")
    return check_entry(settings, str(path or "entry settings"))


def check_entry(settings: dict, where: str, cni_version: str = "1.0.0") -> dict:
    """Our entry from its settings, checked as ADD would evaluate it; SettingsError naming the field if not.

    The entry is evaluated under its own profile for a pod that opts in the way that profile opts in
    (`evaluation.evaluate_opted_in`): an entry that would fail every such pod is refused, before anything is
    installed. The agent and the test of the shipped conflists both check through here.
    """
    from ..config import parse_conf
    from ..errors import CniError
    from ..evaluation import evaluate_opted_in

    ours = conflists.entry(settings)
    try:
        conf = parse_conf({"cniVersion": cni_version, **ours})
        evaluate_opted_in(conf).raise_if_invalid()
    except CniError as error:
        detail = f" ({error.details})" if error.details else ""
        raise SettingsError(f"{where}: {error.msg}{detail}") from None
    return ours


def installed_entry(conf_dir: Path, conf_file: str | None = None) -> dict | None:
    """Our entry as the runtime hands it to ADD (inlined or a drop-in); None if not chained."""
    return read_conf_dir(conf_dir, conf_file).entry()


@dataclass
class Managed:
    """What we wrote into one conf file, to undo exactly that."""

    name: str  # the file holding our entry now
    original_name: str  # the primary's file (differs when we converted a .conf)
    original: bytes  # the primary's bytes just before our latest write
    written: bytes  # our latest write
    rendered: bool = False  # `original` was re-rendered (no backup matched): never written as a backup


class ChainInstaller:
    """Our entry in one conf dir, and whether it is in place (`ready_reason` is "" when it is)."""

    def __init__(
        self,
        conf_dir: Path,
        entry: dict,
        log: Callable[..., None],
        conf_file: str | None = None,
        wait_log_interval: float = 5.0,
        choice: ModeChoice | None = None,
    ) -> None:
        self.conf_dir = conf_dir
        self.entry = entry
        self.log = log
        self.conf_file = conf_file
        self.wait_log_interval = wait_log_interval
        self.choice = choice or ModeChoice(EDIT, "chain_mode edit")
        self.dropin = DropinChain(conf_dir, entry, log)
        self.managed: Managed | None = None
        self.ready_reason = "starting"
        self.warning = ""  # ready, but the runtime may not use the file we chained into
        self.writes = 0  # how often we (re-)inserted our entry: each one may follow pods started without us
        self.mode = ""  # the mode in effect: DROPIN or EDIT once chained
        self.fallback = ""  # why this primary is edited although drop-in mode was chosen ("" when it is not)
        self.fallbacks = 0  # how often the chosen drop-in mode fell back to editing (a primary that refuses it)
        self._last_problem = ""
        self._last_wait_log = 0.0

    def _backup(self, original_name: str) -> Path:
        # No CNI suffix at the end: libcni loads hidden files too, and would take a backup for a config.
        return self.conf_dir / f"{BACKUP_PREFIX}{original_name}.bak"

    def _real(self, name: str) -> Path:
        return real_path(self.conf_dir, name)

    def reconcile(self, snapshot: ConfDir | None = None) -> bool:
        """One pass: make sure our entry is in place. Returns readiness."""
        if snapshot is None:
            try:
                self.recover(finish=True)
            except (OSError, ConfError) as exc:
                return self._not_ready(f"cannot finish a step a killed agent left in --cni-conf-dir: {exc}")
            snapshot = read_conf_dir(self.conf_dir, self.conf_file)
        primary = snapshot.primary
        if primary is None:
            return self._waiting(snapshot)
        if self.choice.mode == DROPIN:
            refusal = primary.dropin_refusal()
            if not refusal:
                return self._reconcile_dropin(snapshot)
            self._fall_back(refusal)
        return self._reconcile_edit(snapshot, primary)

    def _waiting(self, snapshot: ConfDir) -> bool:
        """No usable primary: why (unreadable, invalid), or none yet (logged every `wait_log_interval`)."""
        if snapshot.problem:
            return self._not_ready(snapshot.problem)
        now = time.monotonic()
        if now - self._last_wait_log >= self.wait_log_interval:
            self._last_wait_log = now
            wanted = self.conf_file or "any .conflist/.conf"
            self.log("info", "waiting for the primary CNI config", conf_dir=str(self.conf_dir), wanted=wanted)
        return self._not_ready("no primary CNI config yet")

    def _reconcile_edit(self, snapshot: ConfDir, primary: Primary) -> bool:
        """Edit mode: our entry last in the primary's chain (a `.conf` converted), then what an earlier mode or
        primary left taken out: our drop-ins, our entry in a former primary."""
        self.warn_about_others(snapshot.others(also=conflists.conflist_name(primary.name)))
        name, data, document, single = primary.name, primary.data, primary.document, primary.single
        desired = conflists.with_entry(document, self.entry)
        if not single and conflists.names_us(document) and (self.managed is None or self.managed.name != name):
            self._adopt(name, data, document)  # a restarted or upgraded agent: the primary's bytes are in a backup
        target: str | None = name
        try:
            if not single and document == desired:
                self._heal_backup(name, data)
            else:
                target = self._write(name, data, desired, single)
            if target and any(d.plugin is not None for d in snapshot.dropins):  # drop-in mode before: inlined now
                self.dropin.uninstall(snapshot)
            if target:
                self._release_old_primaries(name, target)
        except OSError as exc:
            return self._not_ready(f"cannot write into --cni-conf-dir {self.conf_dir}: {exc.strerror}")
        if not target:
            return False
        self.mode = EDIT
        return self._ready(target)

    def _reconcile_dropin(self, snapshot: ConfDir) -> bool:
        """Drop-in mode: our drop-in in place first, then an entry an earlier agent inlined taken out (the
        primary's bytes restored): pods never start with neither, at worst for a moment with both."""
        self.warn_about_others(snapshot.others())
        if self.fallback:
            self.log("info", "the primary allows drop-ins again: back to drop-in mode", was=self.fallback)
            self.fallback = ""
        writes = self.dropin.writes
        try:
            where = self.dropin.reconcile(snapshot)
            if self.adopt_installed(snapshot):
                self.uninstall_inline()
        except (OSError, ConfError) as exc:
            return self._not_ready(f"cannot write our drop-in into --cni-conf-dir {self.conf_dir}: {exc}")
        self.writes += self.dropin.writes - writes
        self.mode = DROPIN
        return self._ready(where)

    def _fall_back(self, refusal: str) -> None:
        if refusal != self.fallback:
            self.log("warning", "drop-in mode chosen, but the primary config refuses drop-ins: editing it", why=refusal)
            self.fallback = refusal
            self.fallbacks += 1

    def adopt_installed(self, snapshot: ConfDir | None = None) -> bool:
        """Find our entry where an earlier agent left it inlined, to undo it (`cni-redirect uninstall`, a switch
        to drop-in mode); writes nothing."""
        primary = (snapshot or read_conf_dir(self.conf_dir, self.conf_file)).primary
        if primary is None or primary.single or not conflists.names_us(primary.document):
            return False
        self._adopt(primary.name, primary.data, primary.document)
        return True

    def warn_about_others(self, others: list[str]) -> None:
        warning = other_configs_warning(others) if others and self.conf_file is None else ""
        if warning and warning != self.warning:
            self.log("warning", warning)
        self.warning = warning

    def _adopt(self, name: str, data: bytes, document: dict) -> None:
        """An entry of ours is already there (an agent restart, an upgrade): find the primary's bytes to restore
        later, from the backups themselves (a converted `.conf` is gone from the dir; its backup is not)."""
        primary = conflists.without_entry(document)
        for original_name in self._backed_up():
            if original_name != name and conflists.conflist_name(original_name) != name:
                continue
            try:
                original = self._backup(original_name).read_bytes()
                if conflists.without_entry(conflists.parse(original_name, original)[0]) == primary:
                    self.managed = Managed(name, original_name, original, data)
                    return
            except (OSError, ConfError):
                continue
        self.managed = Managed(name, name, conflists.render(primary), data, rendered=True)

    def _backed_up(self) -> list[str]:
        """The names whose primary bytes we keep a backup of, from the backup files' own names."""
        suffix = ".bak"
        return sorted(
            n[len(BACKUP_PREFIX) : -len(suffix)]
            for n in os.listdir(self.conf_dir)
            if n.startswith(BACKUP_PREFIX) and n.endswith(suffix)
        )

    def _write(self, name: str, data: bytes, desired: dict, single: bool) -> str | None:
        """Write our entry in; returns the file that now holds it, or None if the primary changed it meanwhile."""
        rendered = conflists.render(desired)
        source = self._real(name)
        mode = source.stat().st_mode & 0o777
        target = conflists.conflist_name(name) if single else name
        if single and self._foreign(target):
            self._not_ready(
                f"{name} is the primary config, but making it a conflist would overwrite {target}, "
                "which cni-redirect did not write; left both untouched (remove one, or set --conf-file)"
            )
            return None
        managed = self.managed
        ours_already = managed is not None and managed.name == name and data == managed.written
        # The primary's own bytes: what is there now, unless what is there is our earlier write. If what
        # is there still names us (another installer rewrote the file and kept our entry), restoring those
        # bytes would bring our entry back: keep everything of theirs but that.
        document = conflists.parse(name, data)[0]
        theirs = data if not conflists.names_us(document) else conflists.render(conflists.without_entry(document))
        original = managed.original if managed is not None and ours_already else theirs
        original_name = managed.original_name if managed is not None and ours_already else name
        re_rendered = managed.rendered if managed is not None and ours_already else theirs is not data
        if single:
            self._convert(name, target, rendered, mode)
            self.log("info", "converted single-plugin config and added our entry", source=name, path=target)
        elif self._keep_backup(original_name, original, ours_already or re_rendered) and write_atomic(
            source, rendered, mode=mode, expect=data
        ):
            self.log("info", "added our entry to the primary CNI config", path=name)
        else:
            return None  # the primary rewrote its file since we read it: the next pass reads the new one
        self.managed = Managed(target, original_name, original, rendered, re_rendered)
        self.writes += 1
        return target

    def _keep_backup(self, original_name: str, original: bytes, keep_existing: bool) -> bool:
        """The primary's bytes in their backup. When the file holds our own last write, the backup already has
        what we would write; bytes we re-rendered never replace a backup that is there."""
        backup = self._backup(original_name)
        if not (keep_existing and backup.exists()):
            write_atomic(backup, original, mode=0o600)
        return True

    def _convert(self, name: str, target: str, rendered: bytes, mode: int) -> None:
        """`X.conf` becomes `X.conflist` without the runtime ever seeing both: the `.conf` is renamed to its
        backup (its exact bytes, and no config for a moment), then the conflist is written. A journal written
        first lets an agent killed in between finish it (`recover`)."""
        self._journal({"op": "convert", "single": name, "conflist": target})
        os.rename(self.conf_dir / name, self._backup(name))
        write_atomic(self.conf_dir / target, rendered, mode=mode)
        (self.conf_dir / JOURNAL).unlink()

    def _journal(self, step: dict) -> None:
        write_atomic(self.conf_dir / JOURNAL, json.dumps(step).encode() + b"\n", mode=0o600)

    def recover(self, finish: bool) -> None:
        """A conversion or restore that a killed agent or uninstall left half done: `finish` it (the agent, with
        its entry), or undo it (uninstall). Then our temp files that no live writer holds go."""
        for name in remove_stale_temps(self.conf_dir):
            self.log("info", "removed a temp file a killed writer left", path=name)
        path = self.conf_dir / JOURNAL
        try:
            step = json.loads(path.read_bytes())
            single, conflist = self.conf_dir / step["single"], self.conf_dir / step["conflist"]
            backup = self._backup(step["single"])
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)  # written atomically, so never half: not ours to read
            return
        if step["op"] == "convert" and backup.exists() and not single.exists() and not conflist.exists():
            if finish:
                document, _ = conflists.parse(step["single"], backup.read_bytes())
                rendered = conflists.render(conflists.with_entry(document, self.entry))
                write_atomic(conflist, rendered, mode=backup.stat().st_mode & 0o777)
                self.log(
                    "info", "finished converting a single-plugin config that a killed agent left", path=conflist.name
                )
            else:
                os.rename(backup, single)
                self.log("info", "undid a conversion that a killed agent left", path=single.name)
        elif step["op"] == "restore" and backup.exists() and not single.exists():
            conflist.unlink(missing_ok=True)
            os.rename(backup, single)
            self.log("info", "finished restoring a single-plugin config that a killed uninstall left", path=single.name)
        path.unlink(missing_ok=True)

    def _release_old_primaries(self, *current: str) -> None:
        """The node's primary changed (flannel to Calico): our entry comes out of the file we edited before (its
        bytes restored from the backup when nothing else changed), and its backup goes; a backup whose file is
        gone is dropped. Only files we hold a backup of are touched: another installer's entry is not ours."""
        if (self.conf_dir / JOURNAL).exists():
            return  # a step in progress is recover()'s
        for original_name in self._backed_up():
            names = {original_name, conflists.conflist_name(original_name)}
            if names & set(current):
                continue
            backup = self._backup(original_name)
            for name in sorted(names):
                path = self.conf_dir / name
                try:
                    data = path.read_bytes()
                    document, _ = conflists.parse(name, data)
                    kept = backup.read_bytes()
                    theirs = conflists.parse(original_name, kept)[0]
                except (OSError, ConfError):
                    continue
                if not conflists.names_us(document):
                    continue
                if name != original_name:  # we converted it: the .conf comes back, as on uninstall
                    if conflists.without_entry(document) == conflists.without_entry(theirs):
                        try:
                            self._restore_single(Managed(name, original_name, kept, data), path, 0o644)
                        except ConfError as exc:
                            self.log("warning", "left the former primary config as it is", error=str(exc))
                        continue
                    kept = conflists.render(conflists.without_entry(document))
                elif conflists.without_entry(document) != conflists.without_entry(theirs):
                    kept = conflists.render(conflists.without_entry(document))
                if write_atomic(path, kept, expect=data):
                    self.log("info", "took our entry out of the former primary config", path=name)
            backup.unlink(missing_ok=True)

    def _heal_backup(self, name: str, data: bytes) -> None:
        """Our last write is in place but its backup is gone (`uninstall --force` beside a running agent): put
        the primary's bytes we hold back, so a later uninstall still restores them byte for byte."""
        managed = self.managed
        if managed is None or managed.name != name or managed.written != data or managed.rendered:
            return
        backup = self._backup(managed.original_name)
        if not backup.exists():
            write_atomic(backup, managed.original, mode=0o600)
            self.log("info", "put back the backup of the primary's bytes", path=backup.name)

    def remove_backups(self) -> None:
        """Uninstall's last step: backups of ours that no config needs (left by a killed restore). One whose
        config names us again (an agent put the entry back meanwhile) stays."""
        for original_name in self._backed_up():
            names_us = False
            for name in {original_name, conflists.conflist_name(original_name)}:
                try:
                    names_us |= conflists.names_us(conflists.parse(name, (self.conf_dir / name).read_bytes())[0])
                except (OSError, ConfError):
                    continue
            if not names_us:
                self._backup(original_name).unlink(missing_ok=True)

    def _foreign(self, name: str) -> bool:
        """Whether a file exists that we did not write (or that changed since we wrote it)."""
        path = self.conf_dir / name
        if not path.exists() and not path.is_symlink():
            return False
        managed = self.managed
        try:
            return not (managed is not None and managed.name == name and path.read_bytes() == managed.written)
        except OSError:
            return True

    def uninstall(self, snapshot: ConfDir | None = None) -> None:
        """Remove only what we added: our drop-ins, and our inlined entry (`uninstall_inline`)."""
        self.dropin.uninstall(snapshot or read_conf_dir(self.conf_dir, self.conf_file))
        self.uninstall_inline()
        self.ready_reason = "uninstalled"

    def uninstall_inline(self) -> None:
        """Remove only the entry we inlined.

        The primary's file goes back to the bytes it wrote if it still holds exactly what we
        wrote; otherwise our entry is removed from what it holds now and everything else stays.
        """
        managed = self.managed
        if managed is not None:
            try:
                path = self._real(managed.name)
                current = path.read_bytes()
            except (FileNotFoundError, ConfError):
                path, current = self.conf_dir / managed.name, None
            if current is not None and current == managed.written:
                mode = path.stat().st_mode & 0o777
                if managed.original_name != managed.name:
                    self._restore_single(managed, path, mode)
                elif write_atomic(path, managed.original, mode=mode, expect=current):
                    self.log("info", "removed our entry; primary config restored byte for byte", path=managed.name)
            elif current is not None:
                try:
                    document, _ = conflists.parse(managed.name, current)
                except ConfError:
                    document = {"plugins": []}
                if conflists.names_us(document):
                    write_atomic(path, conflists.render(conflists.without_entry(document)))  # keeps its mode
                    self.log("info", "removed our entry from a config the primary changed", path=managed.name)
            self._backup(managed.original_name).unlink(missing_ok=True)
        self.managed = None

    def _restore_single(self, managed: Managed, conflist: Path, mode: int) -> None:
        """The conversion undone, again never two configs side by side: our conflist goes, then the backup is
        renamed back to the `.conf` (its exact bytes). Journalled like the conversion."""
        if self._foreign(managed.original_name):
            raise ConfError(f"{managed.original_name} appeared since we converted it; not overwriting it")
        self._journal({"op": "restore", "single": managed.original_name, "conflist": managed.name})
        conflist.unlink()
        backup = self._backup(managed.original_name)
        if backup.exists():
            os.rename(backup, self.conf_dir / managed.original_name)
        else:
            write_atomic(self.conf_dir / managed.original_name, managed.original, mode=mode)
        (self.conf_dir / JOURNAL).unlink()
        self.log("info", "restored the original single-plugin config", path=managed.original_name)

    # --- readiness ---

    def _ready(self, name: str) -> bool:
        if self.ready_reason:
            self.log("info", "ready: plugin installed and chained", path=name)
        self.ready_reason = ""
        self._last_problem = ""
        return True

    def _not_ready(self, reason: str) -> bool:
        if reason != self._last_problem:
            level = "info" if reason.startswith("no primary") else "error"
            self.log(level, reason)
            self._last_problem = reason
        self.ready_reason = reason
        return False
