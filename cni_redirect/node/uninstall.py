"""`cni-redirect uninstall`: the one way cni-redirect leaves a node.

A stopping agent never uninstalls: SIGTERM comes as often from a liveness
restart, an OOM kill's restart or a node drain as from deleting the DaemonSet,
and the agent cannot tell them apart. Entry and bundle stay; with no agent, the
plugin does its work in-process. Removing cni-redirect is an explicit step,
run once no agent runs on the node (the DaemonSet deleted): our entry out, the
primary's file restored byte for byte, then, after a grace period for a runtime
that loaded the old config, the bundle, the backups and the owner files.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import NodeError
from .bundle import BINARY, BUNDLE_PREFIX, Bundle
from .chain import ChainInstaller
from .confdir import read_conf_dir
from .dropin import clear_reload_marker
from .ownership import AGENTS_DIR, OWNER_FILE, Ownership, live_agents


def uninstall(
    bin_dir: Path,
    conf_dir: Path,
    log: Callable[..., None],
    conf_file: str | None = None,
    grace: float = 2.0,
    force: bool = False,
) -> list[str]:
    """Remove everything of ours from the node; returns the configs that still name us (bundle kept for them)."""
    running = live_agents(bin_dir / AGENTS_DIR)
    if running and not force:
        raise NodeError(
            f"a cni-redirect agent is still running on this node ({', '.join(running)}): it would put the entry "
            "back; delete the DaemonSet first (or --force)"
        )
    chain = ChainInstaller(conf_dir, {}, log, conf_file)
    chain.recover(finish=False)  # a conversion or restore a killed agent or uninstall left half done
    snapshot = read_conf_dir(conf_dir, conf_file)
    if snapshot.files_naming_us():
        chain.adopt_installed(snapshot)
        chain.uninstall(snapshot)  # the drop-ins, then the inlined entry (the primary's bytes restored)
        time.sleep(grace)  # a runtime that loaded the old conflist may still exec us for a moment
    still = read_conf_dir(conf_dir, conf_file).files_naming_us()
    if still:
        log(
            "warning",
            "left the plugin in the bin dir: configs still name cni-redirect, and every pod would fail without it",
            files=still,
        )
        return still
    chain.remove_backups()  # what a restore killed after its write left behind
    ownership = Ownership(bin_dir)
    with ownership.installing():
        Bundle(bin_dir, bin_dir, log).remove()
    ownership.owner_file.unlink(missing_ok=True)
    shutil.rmtree(ownership.dir, ignore_errors=True)
    clear_reload_marker(conf_dir)
    log("info", "uninstalled: nothing of cni-redirect is left on this node")
    return []


def leftovers(bin_dir: Path, conf_dir: Path) -> list[str]:
    """What of cni-redirect is still on the node: `uninstall --check`, the uninstall pod's readiness."""
    found = [
        name
        for name in sorted(os.listdir(bin_dir))
        if name in (BINARY, OWNER_FILE, AGENTS_DIR) or name.startswith(BUNDLE_PREFIX)
    ]
    found += read_conf_dir(conf_dir).files_naming_us()
    return found
