"""`cni-redirect uninstall`: the one way cni-redirect leaves a node.

A stopping agent never uninstalls: SIGTERM comes as often from a liveness
restart, an OOM kill's restart or a node drain as from deleting the DaemonSet,
and the agent cannot tell them apart. Entry and bundle stay; with no agent, the
plugin does its work in-process. Removing cni-redirect is an explicit step,
run once no agent runs on the node (the DaemonSet deleted): our entry out, the
primary's file restored byte for byte, then, after a grace period for a runtime
that loaded the old config, the bundle, the backups and the owner files.

CRI-O tears a pod down from the config libcni cached at its ADD, so it still
runs `cni-redirect` for DEL of pods set up while our entry was inlined. Unless
the agent recorded the node's runtime as containerd (which tears down from the
config loaded now), a cached sandbox naming us (or a cache we cannot read)
leaves the DEL stub (`bundle.DEL_STUB`) in place of the plugin; running
uninstall again once those pods are gone removes it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ...errors import ConfError, NodeError
from ..agent.ownership import AGENTS_DIR, OWNER_FILE, Ownership, live_agents, recorded_runtime
from ..chaining import conflists
from ..chaining.bundle import BINARY, BUNDLE_PREFIX, Bundle, is_del_stub, temps
from ..chaining.chain import ChainInstaller
from ..chaining.confdir import read_conf_dir
from ..chaining.dropin import clear_reload_marker
from ..chaining.edit import JOURNAL
from ..files import read_regular

#: libcni's default cache dir (CRI-O and containerd both keep it): `results/<network>-<sandbox>-<ifname>`.
CNI_CACHE_DIR = Path("/var/lib/cni")
#: The most cache files read: a node runs at most a few hundred pods; a cache past this is not read whole.
MAX_CACHE_FILES = 10_000


def uninstall(
    bin_dir: Path,
    conf_dir: Path,
    log: Callable[..., None],
    conf_file: str | None = None,
    grace: float = 2.0,
    force: bool = False,
    cache_dir: Path = CNI_CACHE_DIR,
) -> list[str]:
    """Remove everything of ours from the node; returns the configs that still name us (bundle kept for them)."""
    running = live_agents(bin_dir / AGENTS_DIR)
    if running and not force:
        raise NodeError(
            f"a cni-redirect agent is still running on this node ({', '.join(running)}): it would put the entry "
            "back; delete the DaemonSet first (or --force)"
        )
    chain = ChainInstaller(conf_dir, {}, log, conf_file)
    try:
        chain.recover(finish=False)  # a conversion or restore a killed agent or uninstall left half done
    except ConfError as exc:
        if (conf_dir / JOURNAL).exists():  # not a file of ours (a FIFO, a link): never acted on, never removed
            raise NodeError(f"{exc}: check --cni-conf-dir and remove it") from None
        # a journal that was not ours: refused (logged), removed, nothing of it done; the rest goes on
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
    runtime = recorded_runtime(bin_dir)
    cached = [] if runtime == "containerd" else cached_sandboxes(cache_dir)
    with ownership.installing():
        bundle = Bundle(bin_dir, bin_dir, log)
        if cached is None or cached:
            bundle.del_stub()
            unreadable = f"{cache_dir} unreadable"
            log("info", "sandboxes set up with cni-redirect may still get DEL from a cached config",
                runtime=runtime or "unknown", cached=cached if cached is not None else unreadable)  # fmt: skip
        else:
            bundle.remove()
    ownership.owner_file.unlink(missing_ok=True)
    shutil.rmtree(ownership.dir, ignore_errors=True)
    clear_reload_marker(conf_dir)
    if cached is None or cached:
        log("info", "uninstalled: only the DEL stub is left on this node")
    else:
        log("info", "uninstalled: nothing of cni-redirect is left on this node")
    return []


def cached_sandboxes(cache_dir: Path) -> list[str] | None:
    """The sandboxes libcni's cache holds with a config that runs cni-redirect (their cache files' names); None
    when the cache cannot be read (then a DEL stub is the safe side)."""
    results = cache_dir / "results"
    try:
        names = sorted(os.listdir(results))[:MAX_CACHE_FILES]
    except FileNotFoundError:
        return []
    except OSError:
        return None
    found = []
    for name in names:
        try:
            cached = json.loads(read_regular(results / name, follow=False))
            config = base64.b64decode(cached.get("config") or b"")
            document = json.loads(config)
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        plugins = document.get("plugins", [document]) if isinstance(document, dict) else []
        if any(isinstance(p, dict) and conflists.is_ours(p) for p in plugins):
            found.append(name)
    return found


def leftovers(bin_dir: Path, conf_dir: Path) -> tuple[list[str], list[str]]:
    """What of cni-redirect is still on the node (`uninstall --check`, the uninstall pod's readiness), and what
    is left on purpose (the DEL stub)."""
    kept = [BINARY + " (the DEL stub)"] if is_del_stub(bin_dir / BINARY) else []
    names = sorted(os.listdir(bin_dir))
    found = [
        name
        for name in names
        if (name in (BINARY, OWNER_FILE, AGENTS_DIR) or name.startswith(BUNDLE_PREFIX))
        and not (name == BINARY and kept)
    ]
    found += temps(bin_dir)
    found += read_conf_dir(conf_dir).files_naming_us()
    return found, kept
