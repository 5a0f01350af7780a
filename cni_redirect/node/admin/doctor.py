"""`cni-redirect doctor`: the traps that make a pod skip its proxy without an error anywhere.

Pod checks, for every captured pod, with the pod's processes found by their
netns (host /proc):
- the proxy-UID trap: a process running with the proxy's UID or GID that is
  neither the proxy (what listens on the outbound port as the proxy UID) nor
  started by it: its traffic is exempt, so it bypasses the proxy;
- an exempt UID that lives on: a process whose UID is in `exclude-uids`
  still running after a container of the pod started after it (init
  containers finish before the app's start);
- a port taken by the app: another process listening on one of the proxy's
  ports gets the captured traffic instead of the proxy;
- tables missing or drifted.
Node checks: the entry lacks the annotations capability, is not last in the
chain, its CNI server does not answer, or sits in a file the runtime may not
use. Read only.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ... import wire
from ...config import ANNOTATIONS_CAPABILITY
from ...errors import WireError
from ...evaluation import Outcome
from ..chaining import conflists
from ..chaining.confdir import ChainMode, ConfDir, other_configs_warning, read_conf_dir
from ..pods.procs import Process, descendants, processes
from ..pods.survey import DRIFTED, MISSING, PodView
from .inspect import printable

if TYPE_CHECKING:
    from ...cri import CriClient
    from ...spec import CaptureSpec

TRAP, NOTE = "trap", "note"


@dataclass
class Finding:
    check: str
    severity: str  # trap: doctor exits 1; note: worth knowing
    message: str
    pod: str | None = None

    def json(self) -> dict[str, Any]:
        return asdict(self)


def node_findings(conf_dir: Path, conf_file: str | None = None) -> list[Finding]:
    """What is wrong with how the node runs us: the primary config, our entry in it (or its drop-in), its CNI
    server."""
    return snapshot_findings(read_conf_dir(conf_dir, conf_file))


def snapshot_findings(snapshot: ConfDir) -> list[Finding]:
    """`node_findings` of a conf dir already read (a command reads it once)."""
    conf_dir, conf_file = snapshot.path, snapshot.conf_file
    primary = snapshot.primary
    if primary is None:
        if snapshot.problem.startswith("primary config left untouched"):
            return [Finding("conf-file", TRAP, f"{snapshot.problem}: fix {snapshot.primary_name}, or set --conf-file")]
        if snapshot.problem:
            return [Finding("chained", TRAP, snapshot.problem)]
        return [Finding("chained", TRAP, f"no CNI config in {conf_dir}: the node has no pod network yet")]
    mode = snapshot.mode()
    if not mode:
        message = f"cni-redirect is not in {primary.name}'s chain: pods start uncaptured; is the node agent running?"
        return [Finding("chained", TRAP, message)]
    if mode == ChainMode.EDIT:
        plugins = primary.document["plugins"]
        index = max(i for i, plugin in enumerate(plugins) if conflists.is_ours(plugin))
        findings = _entry_findings(primary.name, plugins, index) + _server_findings(plugins[index])
    else:
        dropin = snapshot.dropin()
        assert dropin is not None and dropin.plugin is not None
        name = str(dropin.path.relative_to(conf_dir))
        findings = _entry_findings(name, [dropin.plugin], 0) + _server_findings(dropin.plugin)
    others = snapshot.others()
    if others and conf_file is None:
        findings.append(Finding("conf-file", NOTE, other_configs_warning(others)))
    return findings


def _entry_findings(name: str, plugins: list[dict[str, Any]], index: int) -> list[Finding]:
    """Our entry (at `index` of the chain in file `name`): its capability, its place."""
    findings = []
    if not (plugins[index].get("capabilities") or {}).get(ANNOTATIONS_CAPABILITY):
        message = (
            f'our entry in {name} lacks "capabilities": {{"{ANNOTATIONS_CAPABILITY}": true}}: the runtime '
            "passes no pod annotations, so only the entry's defaults apply; add it (the node agent writes it)"
        )
        findings.append(Finding("capability", TRAP, message))
    if index != len(plugins) - 1:
        after = ", ".join(str(p.get("type")) for p in plugins[index + 1 :])
        message = (
            f"our entry is not last in {name}'s chain (after it: {after}): a plugin after us may undo the capture; "
            "move it last (the node agent does)"
        )
        findings.append(Finding("last", TRAP, message))
    return findings


def _server_findings(entry: dict[str, Any]) -> list[Finding]:
    """The CNI server our entry names, asked VERSION as the front would."""
    socket = entry.get("agent_socket")
    if not isinstance(socket, str) or not socket:
        return []
    try:
        code, _, _ = wire.exchange(socket, {"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "1.0.0"}', None, 2.0)
        if code != 0:
            raise WireError(f"exit code {code}")
    except WireError as exc:
        message = (
            f"the CNI server at {socket} does not answer ({exc}): every ADD runs in-process, about 0.5 s "
            "slower; check the node agent (its /healthz, its log)"
        )
        return [Finding("cni-server", TRAP, message)]
    return []


def pod_findings(view: PodView, procs: list[Process], started_containers: list[float]) -> list[Finding]:
    """The traps of one captured pod; `started_containers`: when each of its running containers started (epoch s)."""
    findings: list[Finding] = []
    if view.state in (MISSING, DRIFTED) and view.drift is not None:
        message = f"{_ref(view)}: {view.drift.message}: repair (--repair in-place) puts it right"
        findings.append(Finding("table", TRAP, message, view.ref))
    spec = view.evaluation.spec if view.evaluation is not None else None
    if view.decision is not Outcome.CAPTURED or spec is None or view.netns is None:
        return findings
    try:
        inode = os.stat(view.netns).st_ino
    except OSError:
        return findings
    members = [p for p in procs if p.netns == inode]
    proxies = [p for p in members if p.uid == spec.proxy_uid and spec.outbound_port in p.listening]
    if members and not proxies:
        message = (
            f"{_ref(view)}: nothing listens on :{spec.outbound_port} as the proxy UID {spec.proxy_uid}: captured "
            "connections are refused; is the proxy running, as that UID?"
        )
        findings.append(Finding("proxy", TRAP, message, view.ref))
    proxy_tree: set[int] = set()
    for proxy in proxies:
        proxy_tree |= descendants(procs, proxy.pid)
    for process in members:
        if process.pid not in proxy_tree:
            findings += _process_findings(view, spec, process, started_containers)
    return findings


def _process_findings(
    view: PodView, spec: CaptureSpec, process: Process, started_containers: list[float]
) -> list[Finding]:
    """One process of a captured pod that is not the proxy (nor started by it)."""
    who = f"{_ref(view)}: {printable(process.comm)} (pid {process.pid}"
    if process.uid == spec.proxy_uid or (spec.proxy_gid is not None and process.gid == spec.proxy_gid):
        what = (
            f"UID {process.uid}, the proxy UID"
            if process.uid == spec.proxy_uid
            else f"GID {process.gid}, the proxy GID"
        )
        message = (
            f"{who}) runs as {what}: its traffic bypasses the proxy; "
            "run it as another UID, or give the proxy one of its own (cni-redirect.io/proxy-uid)"
        )
        return [Finding("proxy-uid", TRAP, message, view.ref)]
    findings = []
    if process.uid in spec.exclude_uids and any(start > process.started for start in started_containers):
        message = (
            f"{who}) runs as UID {process.uid}, in exclude-uids, and still runs after the pod's containers "
            "started: its traffic is never captured; exclude-uids is for init containers"
        )
        findings.append(Finding("exempt", TRAP, message, view.ref))
    for port in sorted(process.listening & {spec.outbound_port, spec.inbound_port, spec.dns_port}):
        message = (
            f"{who}, UID {process.uid}) listens on {port}, one of the proxy's ports: captured traffic goes to it "
            "instead of the proxy; move it to another port"
        )
        findings.append(Finding("port", TRAP, message, view.ref))
    return findings


def _ref(view: PodView) -> str:
    return printable(view.ref)


def diagnose(cri: CriClient, snapshot: ConfDir, proc: Path) -> list[Finding]:
    """Every finding on the node, from one read of its conf dir."""
    from ..pods.survey import Survey

    findings = snapshot_findings(snapshot)
    entry = snapshot.entry()
    if entry is None:
        return findings
    procs = processes(proc)
    for view in Survey(cri, entry).pods():
        for problem in view.problems:
            findings.append(Finding("sandbox", NOTE, f"{_ref(view)}: {printable(problem)}", view.ref))
        starts = cri.container_starts(view.sandbox_id) if view.decision is Outcome.CAPTURED else []
        findings += pod_findings(view, procs, starts)
    return findings
