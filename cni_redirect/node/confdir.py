"""One read of a node's CNI conf dir: the snapshot that every reader of it uses.

The installer (both chain modes), repair, `inspect`, `doctor` and `uninstall`
all look at the conf dir through `read_conf_dir`: which file is the primary
(libcni's order, or `--conf-file`), its bytes and its document, the symlink
rule (followed only inside the dir), why it cannot be used, the other configs a
runtime could load, and our entry wherever it is: inlined in the primary's
chain (edit mode) or as libcni's drop-in `<conf dir>/<network name>/99-cni-redirect.conf`.

Reading only: nothing here writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfError
from . import conflists

#: Our drop-in's file name in `<conf dir>/<network name>/`: libcni runs drop-ins after the inlined plugins, in
#: file name order, so a name late in that order keeps us after any other drop-in.
DROPIN_NAME = "99-cni-redirect.conf"
DROPIN, EDIT = "drop-in", "edit"


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
    document: dict  # as a conflist (a single-plugin config lifted into one)
    single: bool  # a single-plugin `.conf`/`.json`

    @property
    def network(self) -> str:
        name = self.document.get("name")
        return name if isinstance(name, str) else ""

    def dropin_refusal(self) -> str:
        """Why libcni would not load a drop-in for this config ("" when it would)."""
        if self.single:
            return f"{self.name} is a single-plugin config: libcni loads drop-ins only for a .conflist"
        if not self.name.endswith(".conflist"):
            return f"{self.name} is not a .conflist: libcni loads drop-ins only for a .conflist"
        if self.document.get("loadOnlyInlinedPlugins") is True:
            return f"{self.name} sets loadOnlyInlinedPlugins: true"
        network = self.network
        if not network or network in (".", "..") or "/" in network or "\0" in network:
            return f"{self.name}'s network name {network!r} cannot name a drop-in directory"
        return ""

    def inline_entry(self) -> dict | None:
        ours = [plugin for plugin in self.document["plugins"] if conflists.is_ours(plugin)]
        return ours[-1] if ours else None


@dataclass(frozen=True)
class Dropin:
    """A drop-in file of ours (`<network>/99-cni-redirect.conf`)."""

    path: Path
    data: bytes
    plugin: dict | None  # None: not a plugin object of ours (a broken or foreign file under our name)


@dataclass(frozen=True)
class ConfDir:
    """The conf dir as read once: every decision about it is made from this."""

    path: Path
    conf_file: str | None
    names: tuple[str, ...] = ()
    primary: Primary | None = None
    problem: str = ""  # why there is no usable primary ("" when there is one, or simply none yet)
    dropins: tuple[Dropin, ...] = field(default=())  # ours, in any network's drop-in dir

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

    def mode(self) -> str:
        """How our entry reaches the runtime now: EDIT (inlined), DROPIN, or "" (not chained)."""
        if self.primary is not None and self.primary.inline_entry() is not None:
            return EDIT
        return DROPIN if self.dropin() is not None else ""

    def describe_mode(self) -> str:
        """For people (`inspect`, `doctor`): how our entry reaches the runtime, and where."""
        mode, primary, dropin = self.mode(), self.primary, self.dropin()
        if mode == EDIT and primary is not None:
            return f"edit: our entry inlined in {primary.name}"
        if mode == DROPIN and primary is not None and dropin is not None:
            return f"drop-in: {dropin.path.relative_to(self.path)}, {primary.name} untouched"
        return "not chained"

    def entry(self) -> dict | None:
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
                conflists.parse(name, real_path(self.path, name).read_bytes())
            except (OSError, ConfError):
                continue
            found.append(name)
        return found

    def files_naming_us(self) -> list[str]:
        """Every config that still runs cni-redirect: top-level configs holding our entry, and our drop-ins."""
        found = []
        for name in sorted(self.names):
            if not name.endswith(conflists.CONF_SUFFIXES):
                continue
            try:
                document, _ = conflists.parse(name, real_path(self.path, name).read_bytes())
            except (OSError, ConfError):
                continue
            if conflists.names_us(document):
                found.append(name)
        found += [str(d.path.relative_to(self.path)) for d in self.dropins if d.plugin is not None]
        return found


def read_conf_dir(conf_dir: Path, conf_file: str | None = None) -> ConfDir:
    """The one read of a conf dir. Never raises: what cannot be read is the snapshot's `problem`."""
    try:
        names = tuple(sorted(os.listdir(conf_dir)))
    except OSError as exc:
        return ConfDir(conf_dir, conf_file, problem=f"cannot list --cni-conf-dir {conf_dir}: {exc.strerror}")
    dropins = tuple(_dropins(conf_dir, names))
    name = conflists.pick_primary(names, conf_file)
    if name is None:
        return ConfDir(conf_dir, conf_file, names, dropins=dropins)
    try:
        path = real_path(conf_dir, name)
        data = path.read_bytes()
        document, single = conflists.parse(name, data)
    except OSError as exc:
        problem = f"cannot read {conf_dir / name}: {exc.strerror}"
        return ConfDir(conf_dir, conf_file, names, problem=problem, dropins=dropins)
    except ConfError as exc:
        snapshot = ConfDir(conf_dir, conf_file, names, dropins=dropins)
        fallback = snapshot.others()
        crio = (
            f"; CRI-O skips an invalid file and would start pods with {fallback[0]}, without cni-redirect"
            if fallback and conf_file is None
            else ""
        )
        problem = f"primary config left untouched: {exc}{crio}"
        return ConfDir(conf_dir, conf_file, names, problem=problem, dropins=dropins)
    return ConfDir(conf_dir, conf_file, names, Primary(name, path, data, document, single), dropins=dropins)


def _dropins(conf_dir: Path, names: tuple[str, ...]) -> list[Dropin]:
    """Our drop-in in each subdirectory that has one (a plain directory, not a link out of the conf dir)."""
    found = []
    for name in names:
        folder = conf_dir / name
        path = folder / DROPIN_NAME
        if folder.is_symlink() or not folder.is_dir() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found.append(Dropin(path, data, _our_plugin(data)))
    return found


def _our_plugin(data: bytes) -> dict | None:
    try:
        plugin = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return plugin if isinstance(plugin, dict) and conflists.is_ours(plugin) else None
