"""The node agent's settings: one dataclass, and each setting's one default.

`cli.py` builds the `install` flags from these defaults (each also read from
its UPPER_SNAKE environment variable), so a default lives only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..wire import DEFAULT_SOCKET
from . import CONTAINERD_SOCKET


@dataclass
class Options:
    cni_bin_dir: Path = Path("/host/opt/cni/bin")
    cni_conf_dir: Path = Path("/host/etc/cni/net.d")
    conf_file: str | None = None
    plugin_source: Path = Path("/opt/cni-redirect/bundle/cni-redirect")
    entry_file: Path | None = None
    readiness_port: int = 0  # 0: no readiness endpoint
    poll_interval: float = 0.2  # how often to look at a dir inotify cannot watch
    recheck_interval: float = 10.0  # the periodic re-check beside inotify
    wait_log_interval: float = 5.0
    uninstall_grace: float = 2.0  # `cni-redirect uninstall`: how long a runtime may still exec us after the entry went
    handover_wait: float = 5.0  # no effect since stopping never uninstalls; accepted so existing manifests keep working
    probe_socket: Path | None = None  # answers `cni-redirect ready|healthy` (exec probes); a container-private path
    agent_socket: Path | None = Path(DEFAULT_SOCKET)  # the CNI server (the fast path); None: off
    cri_socket: str = CONTAINERD_SOCKET
    chain_mode: str = "auto"  # dropin | edit | auto (drop-in where the runtime's CRI Version says it loads them)
    repair: str = "in-place"
    repair_interval: float = 30.0
    node_name: str = ""  # this node (the manifest passes spec.nodeName): where the new-node taint is taken off
    not_ready_taint: str = ""  # this taint's key comes off the node once the agent is installed and chained; "": off
