"""One read of a node's CNI conf dir: the snapshot that every reader of it uses.

The installer (both chain modes), repair, `inspect`, `doctor` and `uninstall`
all look at the conf dir through `read_conf_dir`: which file is the primary
(libcni's order, or `--conf-file`), its bytes and its document, the symlink
rule (followed only inside the dir), why it cannot be used, the other configs a
runtime could load, our backups, and our entry wherever it is: inlined in the
primary's chain (edit mode) or as libcni's drop-in
`<conf dir>/<network name>/99-cni-redirect.conf`.

Every field a decision rests on is read as libcni (v1.3) reads it: booleans
(`loadOnlyInlinedPlugins`) as JSON booleans or the strings "true"/"false" in any
case, the network `name` only as a string. Nothing in the dir is trusted: files
are read without blocking, regular files only, up to a bound.

Reading only: nothing here writes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ...errors import ConfError
from ..files import read_regular
from . import conflists

#: Our drop-in's file name in `<conf dir>/<network name>/`: libcni runs drop-ins after the inlined plugins, in
#: file name order, so a name late in that order keeps us after any other drop-in.
DROPIN_NAME = "99-cni-redirect.conf"


class ChainMode(StrEnum):
    """How our entry reaches the runtime: as the primary network's libcni drop-in, or inlined into its conflist.
    The `chain_mode` setting spells the first `dropin` (a flag value: node.CHAIN_MODES); logs and metrics, this."""

    DROPIN = "drop-in"
    EDIT = "edit"


BACKUP_PREFIX = ".cni-redirect-original-"
BACKUP_SUFFIX = ".bak"  # no CNI suffix at the end: libcni loads hidden files too, and would take a backup for one
#: libcni's key that turns drop-ins off; also what we set for the instant of a mode switch (`Primary.switching`).
INLINE_ONLY = "loadOnlyInlinedPlugins"


def backup_name(original_name: str) -> str:
    return f"{BACKUP_PREFIX}{original_name}{BACKUP_SUFFIX}"


def libcni_bool(document: Mapping[str, object], key: str) -> tuple[bool, str]:
    """A conflist boolean as libcni's NetworkConfFromBytes reads it: absent is false; a JSON boolean; a string
    "true"/"false" in any case. Anything else: libcni refuses the whole file (the second item says why)."""
    if key not in document:
        return False, ""
    value = document[key]
    if isinstance(value, bool):
        return value, ""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true", ""
    shown = json.dumps(value)[:80]
    return False, f'libcni refuses {key}={shown} (a boolean or "true"/"false"): it loads no network from this file'


def other_configs_warning(others: list[str]) -> str:
    """The one wording of "other configs exist" (the agent's /readyz and `doctor` both show it)."""
    return (
        f"other network configs exist ({', '.join(others)}): a runtime that picks its network by name "
        "(CRI-O's cni_default_network) may use one without cni-redirect; set --conf-file to the one it uses"
    )


def real_path(conf_dir: Path, name: str) -> Path:
    """A config's real path. A symlink is followed only inside the conf dir: writing through a link to
    elsewhere (a mounted ConfigMap, another component's file) is not ours to do (ConfError)."""
    path = conf_dir / name
    if not path.is_symlink():
        return path
    real = path.resolve()
    if not real.is_relative_to(conf_dir.resolve()) or not real.is_file():
        raise ConfError(
            f"{name}: a symlink to {real}, outside --cni-conf-dir or not a file; left untouched "
            "(set --conf-file to a real file)"
        )
    return real


@dataclass(frozen=True)
class Primary:
    """The network config the runtime uses, as read."""

    name: str  # its file name in the conf dir
    path: Path  # where its bytes are (a symlink inside the dir followed)
    data: bytes
    document: dict[str, Any]  # as a conflist (a single-plugin config lifted into one)
    single: bool  # a single-plugin `.conf`/`.json`
    backup: bytes | None = None  # the primary's own bytes we keep (edit mode), if any
    converted_from: str = ""  # the single-plugin config we made this conflist from ("" if we did not)
    dropin_dir: str = ""  # what is wrong with `<conf dir>/<network>` for a drop-in ("" when fine or absent)
    dropins: tuple[str, ...] = ()  # the `.conf` files libcni loads from `<conf dir>/<network>/`, ours included

    @property
    def network(self) -> str:
        name = self.document.get("name")
        return name if isinstance(name, str) else ""

    @property
    def switching(self) -> bool:
        """Our entry inlined with `loadOnlyInlinedPlugins` true that the primary's own bytes lack: the instant of
        a switch between modes (no drop-in loaded while both exist), ours to take off again."""
        if self.single or not conflists.names_us(self.document) or not libcni_bool(self.document, INLINE_ONLY)[0]:
            return False
        if self.backup is None:
            return False
        try:
            theirs, _ = conflists.parse(self.name, self.backup)
        except ConfError:
            return False
        return not libcni_bool(theirs, INLINE_ONLY)[0]

    def theirs(self) -> dict[str, Any]:
        """The document as its owner wrote it: our entry out, and our switch flag out."""
        document = conflists.without_entry(self.document)
        if self.switching:
            document = {k: v for k, v in document.items() if k != INLINE_ONLY}
        return document

    def dropin_refusal(self) -> str:
        """Why libcni would not load a drop-in for this config, or why we will not write one ("" when fine)."""
        if self.single:
            return f"{self.name} is a single-plugin config: libcni loads drop-ins only for a .conflist"
        if self.converted_from:
            # Said as on the pass that converted it: one fallback, one reason, while it stays converted.
            return f"{self.converted_from} is a single-plugin config: libcni loads drop-ins only for a .conflist"
        if not self.name.endswith(".conflist"):
            return f"{self.name} is not a .conflist: libcni loads drop-ins only for a .conflist"
        inline_only, invalid = libcni_bool(self.theirs(), INLINE_ONLY)
        if invalid:
            return f"{self.name}: {invalid}"
        if inline_only:
            return f"{self.name} sets {INLINE_ONLY} (as libcni reads it: {json.dumps(self.document[INLINE_ONLY])})"
        if not isinstance(self.document.get("name"), str):
            return f"{self.name} has no string network name: libcni loads no network from it"
        network = self.network
        if not network or network in (".", "..") or "/" in network or "\0" in network:
            return f"{self.name}'s network name {network!r} cannot name a drop-in directory"
        if self.dropin_dir:
            return self.dropin_dir
        return ""

    def foreign_dropins_after(self, mode: ChainMode) -> list[str]:
        """Drop-ins of others that libcni runs after our entry: after every inlined plugin (edit mode), or
        after ours by file name (drop-in mode). Our entry is then not last."""
        others = [name for name in self.dropins if name != DROPIN_NAME]
        return [name for name in others if mode == ChainMode.EDIT or name > DROPIN_NAME]

    def inline_entry(self) -> dict[str, Any] | None:
        ours = [plugin for plugin in self.document["plugins"] if conflists.is_ours(plugin)]
        return ours[-1] if ours else None


@dataclass(frozen=True)
class Dropin:
    """A drop-in file of ours (`<network>/99-cni-redirect.conf`)."""

    path: Path
    data: bytes
    plugin: dict[str, Any] | None  # None: not a plugin object of ours (a broken or foreign file under our name)


@dataclass(frozen=True)
class ConfDir:
    """The conf dir as read once: every decision about it is made from this."""

    path: Path
    conf_file: str | None
    names: tuple[str, ...] = ()
    primary: Primary | None = None
    problem: str = ""  # why there is no usable primary ("" when there is one, or simply none yet)
    dropins: tuple[Dropin, ...] = field(default=())  # ours, in any network's drop-in dir
    backups: Mapping[str, bytes] = field(default_factory=dict)  # original name -> the primary's bytes we keep

    @property
    def primary_name(self) -> str | None:
        return conflists.pick_primary(self.names, self.conf_file)

    def dropin(self) -> Dropin | None:
        """Our drop-in for the primary's network, if there is one."""
        if self.primary is None or self.primary.dropin_refusal():
            return None
        wanted = self.path / self.primary.network / DROPIN_NAME
        return next((d for d in self.dropins if d.path == wanted and d.plugin is not None), None)

    def stale_dropins(self) -> list[Dropin]:
        """Drop-ins of ours that the runtime does not (or should not) load for the primary: another network's."""
        current = self.dropin()
        return [d for d in self.dropins if d != current]

    def mode(self) -> ChainMode | None:
        """How our entry reaches the runtime now; None: not chained."""
        if self.primary is not None and self.primary.inline_entry() is not None:
            return ChainMode.EDIT
        return ChainMode.DROPIN if self.dropin() is not None else None

    def describe_mode(self) -> str:
        """For people (`inspect`, `doctor`): how our entry reaches the runtime, and where."""
        mode, primary, dropin = self.mode(), self.primary, self.dropin()
        if mode == ChainMode.EDIT and primary is not None:
            return f"edit: our entry inlined in {primary.name}"
        if mode == ChainMode.DROPIN and primary is not None and dropin is not None:
            return f"drop-in: {dropin.path.relative_to(self.path)}, {primary.name} untouched"
        return "not chained"

    def entry(self) -> dict[str, Any] | None:
        """Our entry as the runtime hands it to ADD (with the list's cniVersion and name); None if not chained.
        Inlined wins: libcni runs the inlined plugins first."""
        if self.primary is None:
            return None
        plugin = self.primary.inline_entry()
        if plugin is None:
            dropin = self.dropin()
            plugin = dropin.plugin if dropin is not None else None
        if plugin is None:
            return None
        document = self.primary.document
        return {"cniVersion": document.get("cniVersion", "1.0.0"), "name": document.get("name", ""), **plugin}

    def others(self, also: str = "") -> list[str]:
        """The network configs a runtime could load besides the primary (parseable, a CNI suffix), in libcni's
        order; `also`: a further name to leave out (the conflist a single-plugin config becomes)."""
        skip = {self.primary_name, also}
        found = []
        for name in sorted(self.names):
            if name in skip or not name.endswith(conflists.CONF_SUFFIXES):
                continue
            try:
                conflists.parse(name, read_regular(real_path(self.path, name)))
            except (OSError, ConfError):
                continue
            found.append(name)
        return found

    def files_naming_us(self) -> list[str]:
        """Every config that still runs cni-redirect: top-level configs holding our entry, our drop-ins, and a
        drop-in naming us that libcni loads through a link out of the dir (never ours to remove: reported)."""
        found = []
        for name in sorted(self.names):
            if not name.endswith(conflists.CONF_SUFFIXES):
                continue
            try:
                document, _ = conflists.parse(name, read_regular(real_path(self.path, name)))
            except (OSError, ConfError):
                continue
            if conflists.names_us(document):
                found.append(name)
        found += [str(d.path.relative_to(self.path)) for d in self.dropins if d.plugin is not None]
        primary = self.primary
        if primary is not None and primary.dropin_dir and DROPIN_NAME in primary.dropins:
            found.append(f"{primary.network}/{DROPIN_NAME} (through {primary.dropin_dir.split(':')[0]})")
        return found


def read_conf_dir(conf_dir: Path, conf_file: str | None = None) -> ConfDir:
    """The one read of a conf dir. Never raises: what cannot be read is the snapshot's `problem`."""
    try:
        names = tuple(sorted(os.listdir(conf_dir)))
    except OSError as exc:
        return ConfDir(conf_dir, conf_file, problem=f"cannot list --cni-conf-dir {conf_dir}: {exc.strerror}")
    dropins = tuple(_dropins(conf_dir, names))
    backups = _backups(conf_dir, names)
    name = conflists.pick_primary(names, conf_file)
    if name is None:
        return ConfDir(conf_dir, conf_file, names, dropins=dropins, backups=backups)
    try:
        path = real_path(conf_dir, name)
        data = read_regular(path)
        document, single = conflists.parse(name, data)
    except OSError as exc:
        problem = f"cannot read {conf_dir / name}: {exc.strerror}"
        return ConfDir(conf_dir, conf_file, names, problem=problem, dropins=dropins, backups=backups)
    except ConfError as exc:
        snapshot = ConfDir(conf_dir, conf_file, names, dropins=dropins, backups=backups)
        fallback = snapshot.others()
        crio = (
            f"; CRI-O skips an invalid file and would start pods with {fallback[0]}, without cni-redirect"
            if fallback and conf_file is None
            else ""
        )
        problem = f"primary config left untouched: {exc}{crio}"
        return ConfDir(conf_dir, conf_file, names, problem=problem, dropins=dropins, backups=backups)
    network = document.get("name")
    dropin_dir, loaded = _network_dir(conf_dir, network) if isinstance(network, str) and not single else ("", ())
    converted = next(
        (o for o in backups if o != name and not o.endswith(".conflist") and conflists.conflist_name(o) == name), ""
    )
    primary = Primary(name, path, data, document, single, backups.get(converted or name), converted, dropin_dir, loaded)
    return ConfDir(conf_dir, conf_file, names, primary, dropins=dropins, backups=backups)


def _network_dir(conf_dir: Path, network: str) -> tuple[str, tuple[str, ...]]:
    """`<conf dir>/<network>` as libcni will read it: what is wrong with it for a drop-in of ours, and the
    `.conf` names libcni loads from it (libcni follows a link there; we only list it)."""
    if not network or network in (".", "..") or "/" in network or "\0" in network:
        return "", ()
    path = conf_dir / network
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "", ()
    except OSError as exc:
        return f"{path}: {exc.strerror}", ()
    problem = ""
    if stat.S_ISLNK(info.st_mode):
        problem = (
            f"{path} is a symlink to {os.readlink(path)}: libcni loads drop-ins through it, but cni-redirect never "
            "writes through a link (editing the primary instead)"
        )
    elif not stat.S_ISDIR(info.st_mode):
        return f"{path} is not a directory: no drop-in can be written there", ()
    try:
        loaded = tuple(sorted(n for n in os.listdir(path) if os.path.splitext(n)[1] == ".conf"))
    except OSError:
        loaded = ()
    return problem, loaded


def _backups(conf_dir: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    found = {}
    for name in names:
        if name.startswith(BACKUP_PREFIX) and name.endswith(BACKUP_SUFFIX):
            original = name[len(BACKUP_PREFIX) : -len(BACKUP_SUFFIX)]
            try:
                found[original] = read_regular(conf_dir / name, follow=False)
            except OSError:
                continue
    return found


def _dropins(conf_dir: Path, names: tuple[str, ...]) -> list[Dropin]:
    """Our drop-in in each subdirectory that has one (a plain directory, not a link out of the conf dir)."""
    found = []
    for name in names:
        folder = conf_dir / name
        path = folder / DROPIN_NAME
        if folder.is_symlink() or not folder.is_dir() or path.is_symlink():
            continue
        try:
            data = read_regular(path, follow=False)
        except OSError:
            continue
        found.append(Dropin(path, data, _our_plugin(data)))
    return found


def _our_plugin(data: bytes) -> dict[str, Any] | None:
    try:
        plugin = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return plugin if isinstance(plugin, dict) and conflists.is_ours(plugin) else None
