"""The node agent's settings: one dataclass, each setting's one default, and its command-line flag.

`cli.py` builds the `install` and `uninstall` flags from these fields (each also read from its UPPER_SNAKE
environment variable) and the `Options` back from the parsed flags, so a setting is written down only here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..wire import DEFAULT_SOCKET
from . import CHAIN_MODES, CONTAINERD_SOCKET, CRIO_SOCKET, REPAIR_MODES

INSTALL, UNINSTALL = "install", "uninstall"
SECONDS = "a number of seconds"


@dataclass(frozen=True)
class Flag:
    """How a setting appears on the command line: the commands that take it, its help, how a bad value is named
    (`what`, else by the field's type), the values it may take."""

    commands: tuple[str, ...] = (INSTALL,)
    help: str | None = None
    what: str = ""
    choices: tuple[str, ...] = ()
    metavar: str | None = None


def flag(**how: Any) -> dict[str, Flag]:
    """A field's metadata: its flag."""
    return {"flag": Flag(**how)}


@dataclass
class Options:
    cni_bin_dir: Path = field(default=Path("/host/opt/cni/bin"), metadata=flag(commands=(INSTALL, UNINSTALL)))
    cni_conf_dir: Path = field(default=Path("/host/etc/cni/net.d"), metadata=flag(commands=(INSTALL, UNINSTALL)))
    conf_file: str | None = field(
        default=None, metadata=flag(commands=(INSTALL, UNINSTALL), help="the primary conflist's file name")
    )
    plugin_source: Path = field(
        default=Path("/opt/cni-redirect/bundle/cni-redirect"),
        metadata=flag(help="the bundle folder (or a single executable) to install"),
    )
    entry_file: Path | None = field(
        default=None,
        metadata=flag(help="JSON object with our conflist entry's settings (defaults, exclude_namespaces, ...)"),
    )
    readiness_port: int = field(default=0, metadata=flag(what="a port number"))  # 0: no readiness endpoint
    poll_interval: float = field(
        default=0.2, metadata=flag(what=SECONDS, help="re-check interval where a dir cannot be watched")
    )
    recheck_interval: float = field(
        default=10.0,
        metadata=flag(
            what=SECONDS, help="the dirs are watched (inotify); this is the slow periodic re-check beside it"
        ),
    )
    wait_log_interval: float = 5.0  # no flag
    uninstall_grace: float = field(
        default=2.0,
        metadata=flag(
            commands=(UNINSTALL,),
            what=SECONDS,
            help="seconds between taking the entry out and removing the plugin (a runtime may still exec it)",
        ),
    )
    probe_socket: Path | None = field(
        default=None,
        metadata=flag(
            help="answer `cni-redirect ready|healthy` (the pod's exec probes) on this UNIX socket, a path private to "
            "the agent's container"
        ),
    )
    agent_socket: Path | None = field(
        default=Path(DEFAULT_SOCKET),
        metadata=flag(
            help=f"serve CNI requests on this UNIX socket, the fast path (default {DEFAULT_SOCKET}; empty: off)"
        ),
    )
    cri_socket: str = field(
        default=CONTAINERD_SOCKET,
        metadata=flag(
            help=f"the container runtime's CRI socket (default containerd's {CONTAINERD_SOCKET}; CRI-O: {CRIO_SOCKET})"
        ),
    )
    chain_mode: str = field(
        default="auto",
        metadata=flag(
            choices=CHAIN_MODES,
            help="dropin: our entry as libcni's drop-in <conf dir>/<network>/99-cni-redirect.conf, the primary's file "
            "untouched (containerd >= 2.1, CRI-O >= 1.33); edit: inlined into the primary's file; auto: dropin where "
            "the runtime's CRI Version says it loads drop-ins, else edit",
        ),
    )
    repair: str = field(
        default="in-place",
        metadata=flag(
            choices=REPAIR_MODES, help="pods whose table is missing or drifted: program it, only log it, or do nothing"
        ),
    )
    repair_interval: float = field(default=30.0, metadata=flag(what=SECONDS, metavar="SECONDS"))
    node_name: str = field(
        default="",
        metadata=flag(help="this node's name (the manifest passes spec.nodeName): where --not-ready-taint comes off"),
    )
    not_ready_taint: str = field(
        default="",
        metadata=flag(
            help="take the NoSchedule taint with this key off this node once installed and chained, so opted-in pods "
            "never start on a new node before the agent (the node registers with it); empty: off"
        ),
    )


#: (command, flag) -> why it is gone: flags that did nothing there. A manifest that still passes one is told so
#: in one line; its environment variable is not read any more.
REMOVED_FLAGS = {
    (INSTALL, "--handover-wait"): "it had no effect: stopping never uninstalls (`cni-redirect uninstall` does)",
    (INSTALL, "--uninstall-grace"): "it had no effect here: it is `cni-redirect uninstall`'s",
}
