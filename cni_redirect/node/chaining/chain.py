"""Keeping our entry chained into the node's primary CNI config, and taking it out again.

Where the runtime loads libcni drop-ins and the primary allows them, the entry
is a drop-in (`dropin.py`) and the primary's file is never written. Else it is
inlined in the primary's file (`edit.py`). Waiting for a primary, choosing
between the two per pass, and switching between them are here.

A switch between modes never shows the runtime our entry twice or not at all:
the primary's file carries our entry with `loadOnlyInlinedPlugins: true` for
the moment a drop-in is written or removed (libcni then loads no drop-in), and
only then gets its own bytes back (drop-in mode) or loses the flag (edit mode).

Files only: this module never touches a network namespace or nftables.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ConfError, SettingsError
from . import conflists
from .confdir import BACKUP_PREFIX, ChainMode, ConfDir, Primary, other_configs_warning, read_conf_dir
from .dropin import DropinChain, ModeChoice
from .edit import JOURNAL, EditChain, Managed

__all__ = ["BACKUP_PREFIX", "JOURNAL", "ChainInstaller", "ChainPass", "Managed", "check_entry", "load_entry_settings"]


def load_entry_settings(path: Path | None) -> dict[str, Any]:
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


def check_entry(settings: dict[str, Any], where: str, cni_version: str = "1.0.0") -> dict[str, Any]:
    """Our entry from its settings, checked as ADD would evaluate it; SettingsError naming the field if not.

    The entry is evaluated (`evaluation.entry_check_pods`) for every kind of pod a node starts: one without
    any annotation, one opted in with our annotation, and one opted in by each mesh profile's injector. An
    entry that fails any of them would fail every such pod on the node (an invalid default fails even the
    pods that never opted in), so it is refused before anything is installed. The agent and the test of the
    shipped conflists both check through here.
    """
    from ...config import parse_conf
    from ...errors import CniError
    from ...evaluation import entry_check_pods

    ours = conflists.entry(settings)
    try:
        conf = parse_conf({"cniVersion": cni_version, **ours})
        for pod, evaluation in entry_check_pods(conf):
            try:
                evaluation.raise_if_invalid()
            except CniError as error:
                detail = f" ({error.details})" if error.details else ""
                raise SettingsError(f"{where}: {error.msg}{detail} [for {pod}]") from None
    except CniError as error:
        detail = f" ({error.details})" if error.details else ""
        raise SettingsError(f"{where}: {error.msg}{detail}") from None
    return ours


def installed_entry(conf_dir: Path, conf_file: str | None = None) -> dict[str, Any] | None:
    """Our entry as the runtime hands it to ADD (inlined or a drop-in); None if not chained."""
    return read_conf_dir(conf_dir, conf_file).entry()


@dataclass(frozen=True)
class ChainPass:
    """What one pass did: ready or why not, how often it (re-)inserted our entry (each may follow pods started
    without us), whether the chosen drop-in mode fell back to editing, the mode in effect. True when ready."""

    ready: bool
    reason: str = ""
    wrote: int = 0
    fell_back: bool = False
    mode: ChainMode | None = None

    def __bool__(self) -> bool:
        return self.ready


class ChainInstaller:
    """Our entry in one conf dir, and whether it is in place (`ready_reason` is "" when it is)."""

    def __init__(
        self,
        conf_dir: Path,
        entry: dict[str, Any],
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
        self.choice = choice or ModeChoice(ChainMode.EDIT, "chain_mode edit")
        self.dropin = DropinChain(conf_dir, entry, log)
        self.edit = EditChain(conf_dir, entry, log)
        self.ready_reason = "starting"
        self.warning = ""  # ready, but the runtime may not use our entry as we wrote it
        self.mode: ChainMode | None = None  # the mode in effect, once chained
        self.fallback = ""  # why this primary is edited although drop-in mode was chosen ("" when it is not)
        self.fallbacks = 0  # how often the chosen drop-in mode fell back to editing (a primary that refuses it)
        self._last_problem = ""
        self._last_wait_log = 0.0

    @property
    def writes(self) -> int:
        """How often we (re-)inserted our entry: each one may follow pods started without us."""
        return self.edit.writes + self.dropin.writes

    @property
    def managed(self) -> Managed | None:
        return self.edit.managed

    def wants_pass_in(self) -> float | None:
        """Seconds until the next pass is due sooner than the usual re-check (a swapped-out file is watched)."""
        return self.edit.wants_pass_in()

    def recover(self, finish: bool) -> None:
        self.edit.recover(finish)

    def reconcile(self, snapshot: ConfDir | None = None) -> ChainPass:
        """One pass: make sure our entry is in place."""
        writes, fallbacks = self.writes, self.fallbacks
        ready = self._reconcile(snapshot)
        return ChainPass(ready, self.ready_reason, self.writes - writes, self.fallbacks > fallbacks, self.mode)

    def _reconcile(self, snapshot: ConfDir | None) -> bool:
        if snapshot is None:
            try:
                self.edit.recover(finish=True)
            except (OSError, ConfError) as exc:
                return self._not_ready(f"cannot finish a step a killed agent left in --cni-conf-dir: {exc}")
            if self.edit.replay_late_writes():
                pass  # the primary's late bytes are back in place: the read below sees them
            snapshot = read_conf_dir(self.conf_dir, self.conf_file)
        primary = snapshot.primary
        if primary is None:
            return self._waiting(snapshot)
        try:
            if self.choice.mode == ChainMode.DROPIN:
                refusal = primary.dropin_refusal()
                if not refusal:
                    return self._reconcile_dropin(snapshot, primary)
                self._fall_back(refusal)
            return self._reconcile_edit(snapshot, primary)
        except ConfError as exc:
            return self._not_ready(str(exc))
        except OSError as exc:
            return self._not_ready(f"cannot write into --cni-conf-dir {self.conf_dir}: {exc.strerror or exc}")

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

    def _reread(self) -> Primary | None:
        return read_conf_dir(self.conf_dir, self.conf_file).primary

    def _reconcile_edit(self, snapshot: ConfDir, primary: Primary) -> bool:
        """Edit mode: our entry last in the primary's chain (a `.conf` converted), then what an earlier mode or
        primary left taken out: our drop-ins, our entry in a former primary. A drop-in of ours that the runtime
        loads now goes only while the primary's file loads no drop-in (our entry inlined, the flag set)."""
        self._warn(snapshot, primary, ChainMode.EDIT if self.fallback or self.choice.mode == ChainMode.DROPIN else None)
        loaded = snapshot.dropin()
        if loaded is not None:  # a switch from drop-in mode: inline (flagged) first, then the drop-in out
            if self.edit.place(primary, inline_only=True) is None:
                return self._not_ready("the primary rewrote its config as we switched modes; trying again")
            self.dropin.uninstall(snapshot)
            switched = self._reread()
            if switched is None:
                return self._not_ready("the primary config went away as we switched modes; trying again")
            primary = switched
        target = self.edit.place(primary)
        if target is None:
            return False  # lost a race with the primary's own write: the next pass reads it
        if any(d.plugin is not None for d in snapshot.dropins) and loaded is None:
            self.dropin.uninstall(snapshot)  # ours, but not loaded (another network's, a refused primary's)
        self.edit.release_old_primaries(primary.name, target)
        self.mode = ChainMode.EDIT
        return self._ready(target)

    def _reconcile_dropin(self, snapshot: ConfDir, primary: Primary) -> bool:
        """Drop-in mode: our drop-in in place. An entry an earlier agent inlined is switched out without the
        runtime ever seeing both or neither: flagged inline-only first, then the drop-in, then the primary's own
        bytes back."""
        self._warn(snapshot, primary, ChainMode.DROPIN)
        if self.fallback:
            self.log("info", "the primary allows drop-ins again: back to drop-in mode", was=self.fallback)
            self.fallback = ""
        if primary.inline_entry() is not None:
            if not primary.switching:
                if self.edit.place(primary, inline_only=True) is None:
                    return self._not_ready("the primary rewrote its config as we switched modes; trying again")
                snapshot = read_conf_dir(self.conf_dir, self.conf_file)
                if snapshot.primary is None:
                    return self._not_ready("the primary config went away as we switched modes; trying again")
                primary = snapshot.primary
            where = self.dropin.reconcile(snapshot, signal=False)  # not loaded yet: the primary loads inline only
            self.edit.adopt(primary)
            self.edit.uninstall_inline(snapshot)  # the primary's own bytes: the drop-in is loaded from now on
        else:
            where = self.dropin.reconcile(snapshot)
        self.mode = ChainMode.DROPIN
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
        self.edit.adopt(primary)
        return True

    def _warn(self, snapshot: ConfDir, primary: Primary, mode: ChainMode | None) -> None:
        """Ready, but: other network configs a runtime may pick by name; drop-ins of others that libcni runs
        after our entry (in edit mode only where the runtime loads drop-ins)."""
        others = snapshot.others(also=conflists.conflist_name(primary.name)) if self.conf_file is None else []
        warnings = [other_configs_warning(others)] if others else []
        after = primary.foreign_dropins_after(mode) if mode else []
        if after:
            warnings.append(
                f"libcni runs {', '.join(after)} from {primary.network}/ after cni-redirect: our entry is not last "
                "in the chain (a plugin after it may undo or skip its work)"
            )
        warning = "; ".join(warnings)
        if warning and warning != self.warning:
            self.log("warning", warning)
        self.warning = warning

    def warn_about_others(self, others: list[str]) -> None:
        warning = other_configs_warning(others) if others and self.conf_file is None else ""
        if warning and warning != self.warning:
            self.log("warning", warning)
        self.warning = warning

    def uninstall(self, snapshot: ConfDir | None = None) -> None:
        """Remove only what we added: our drop-ins, and our inlined entry (`uninstall_inline`)."""
        snapshot = snapshot or read_conf_dir(self.conf_dir, self.conf_file)
        self.dropin.uninstall(snapshot)
        self.edit.uninstall_inline()
        self.ready_reason = "uninstalled"

    def uninstall_inline(self) -> None:
        self.edit.uninstall_inline()

    def remove_backups(self) -> None:
        self.edit.remove_backups()

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
