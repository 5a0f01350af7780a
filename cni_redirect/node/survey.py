"""What every pod sandbox on the node should have, and what its netns holds: for repair, inspect and doctor.

The sandboxes come from the container runtime through CRI; the decision is
the one ADD makes (`plugin.decide`) with the entry installed in the node's
conflist and the sandbox's own annotations; the comparison is the one CHECK
makes. Reading only: nothing here changes a netns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..backend import Backend, KernelBackend, normalize
from ..config import ANNOTATIONS_CAPABILITY, PodRef, parse_conf
from ..errors import CniError, ConfError, HostNetns, InvalidEnvironment
from ..netns import received_fd
from ..plugin import decide, describe_drift
from ..ruleset import Ruleset
from ..spec import CaptureSpec
from . import conflists

CAPTURED, NOT_ENABLED, EXCLUDED, HOST_NETWORK, INVALID = (
    "captured",
    "not-enabled",
    "excluded-namespace",
    "host-network",
    "invalid",
)
OK, MISSING, DRIFTED = "ok", "missing", "drifted"


@dataclass
class PodView:
    """One sandbox: who it is, what ADD would decide for it now, and how its netns compares."""

    sandbox_id: str
    namespace: str
    name: str
    uid: str
    annotations: dict[str, str]
    netns: str | None = None
    decision: str = CAPTURED
    reason: str = ""
    state: str | None = None  # ok, missing, drifted (also: a table where none belongs); None: nothing expected
    drift: str = ""  # CHECK's words for what differs
    ruleset: Ruleset | None = None
    spec: CaptureSpec | None = None
    listing: list[dict] | None = None  # the table as listed, counters included
    problems: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


def installed_entry(conf_dir: Path, conf_file: str | None = None) -> dict | None:
    """Our entry as the runtime hands it to ADD: with the conflist's cniVersion and name; None if not chained."""
    try:
        names = os.listdir(conf_dir)
    except OSError:
        return None
    name = conflists.pick_primary(names, conf_file)
    if name is None:
        return None
    try:
        document, _ = conflists.parse(name, (conf_dir / name).read_bytes())
    except (OSError, ConfError):
        return None
    for plugin in document["plugins"]:
        if conflists.is_ours(plugin):
            return {"cniVersion": document.get("cniVersion", "1.0.0"), "name": document.get("name", ""), **plugin}
    return None


def _host_network(status) -> bool:
    from ..cri import pb

    return status.status.linux.namespaces.options.network == pb.NODE


class Survey:
    """Walk the node's ready sandboxes and compare each netns with what ADD would program."""

    def __init__(self, cri, entry: dict, backend_for_fd=None, locks=None) -> None:
        self.cri = cri
        self.entry = entry
        self.backend_for_fd = backend_for_fd or (lambda fd: KernelBackend(received_fd(fd)))
        self.locks = locks

    def pods(self) -> Iterator[PodView]:
        import grpc

        for sandbox in self.cri.list_sandboxes(ready_only=True):
            meta = sandbox.metadata
            view = PodView(sandbox.id, meta.namespace, meta.name, meta.uid, dict(sandbox.annotations))
            try:
                status = self.cri.sandbox_status(sandbox.id)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    continue  # removed since we listed it
                raise
            self._classify(view, status)
            yield view

    def _classify(self, view: PodView, status) -> None:
        from ..cri import sandbox_netns

        if _host_network(status):
            view.decision, view.reason = HOST_NETWORK, "uses the node's network namespace"
            return
        raw = {**self.entry, "runtimeConfig": {ANNOTATIONS_CAPABILITY: view.annotations}, "prevResult": {}}
        try:
            decision = decide(parse_conf(raw), PodRef(view.namespace, view.name, view.uid))
        except CniError as error:
            view.decision, view.reason = INVALID, error.msg
            return
        view.ruleset, view.reason, view.spec = decision.ruleset, decision.reason, decision.spec
        if decision.reason.startswith("skipped: namespace"):
            view.decision = EXCLUDED
            return  # never touched, never read
        view.decision = CAPTURED if decision.ruleset is not None else NOT_ENABLED
        view.netns = sandbox_netns(status)
        if view.netns is None:
            view.problems.append("the runtime reports no network namespace path for this sandbox")
            return
        self.compare(view)

    def compare(self, view: PodView) -> None:
        """Read the pod's table and set state and drift, exactly as CHECK compares."""
        routing = view.ruleset.routing if view.ruleset is not None else None
        routing_drift = None
        try:
            with self.opened(view.netns) as backend:
                view.listing = backend.read(view.netns, raw=True)
                if routing is not None:  # TPROXY pods only: the others' survey stays one listing
                    routing_drift = backend.routing_drift(view.netns, routing)
        except HostNetns:
            view.decision, view.reason = HOST_NETWORK, "its netns is the node's own"
            return
        except InvalidEnvironment as error:
            view.problems.append(error.msg)  # gone since we listed it, or not a netns
            return
        expected = None if view.ruleset is None else normalize(view.ruleset.objects())
        actual = None if view.listing is None else normalize(view.listing)
        if actual == expected and routing_drift:
            view.drift, view.state = routing_drift, DRIFTED
            return
        if actual == expected:
            view.state = OK if expected is not None else None
            return
        view.drift = describe_drift(expected, actual, view.reason)[0]
        view.state = MISSING if actual is None else DRIFTED

    def opened(self, netns: str):
        """The netns as a vetted fd, held under the CNI server's per-netns lock when there is one."""
        from contextlib import contextmanager

        from ..netns import open_netns

        @contextmanager
        def holding() -> Iterator[Backend]:
            fd = open_netns(netns)
            try:
                if self.locks is None:
                    yield self.backend_for_fd(fd)
                else:
                    with self.locks.held(fd):
                        yield self.backend_for_fd(fd)
            finally:
                os.close(fd)

        return holding()


#: Which rules' counters say what: by the comment every rule carries (ruleset.py).
COUNTER_KINDS = {
    "outbound_redirected": ("capture outbound",),
    "inbound_redirected": ("capture inbound", "pod to own ip via"),
    "dns_redirected": ("dns udp", "dns tcp"),
    "proxy_exempt": ("proxy uid", "proxy gid"),
}


def counters(listing: list[dict] | None) -> dict[str, dict[str, int]]:
    """Packets and bytes per kind of capture rule. nat rules see only a connection's first packet, so
    packets count connections (and UDP flows)."""
    if listing is None:
        return {}
    totals = {kind: {"packets": 0, "bytes": 0} for kind in COUNTER_KINDS}
    for obj in listing:
        rule = obj.get("rule")
        if not rule:
            continue
        comment = rule.get("comment", "")
        for kind, prefixes in COUNTER_KINDS.items():
            if comment.startswith(prefixes):
                for expr in rule["expr"]:
                    if isinstance(expr.get("counter"), dict):
                        totals[kind]["packets"] += expr["counter"].get("packets", 0)
                        totals[kind]["bytes"] += expr["counter"].get("bytes", 0)
    return totals


def view_json(view: PodView) -> dict:
    """One sandbox as `inspect --json` prints it (the keys are a contract)."""
    return {
        "namespace": view.namespace,
        "name": view.name,
        "sandbox_id": view.sandbox_id,
        "decision": view.decision,
        "state": view.state,
        "counters": counters(view.listing) if view.decision == CAPTURED else {},
        "reason": view.reason,
        "drift": view.drift,
        "problems": view.problems,
    }
