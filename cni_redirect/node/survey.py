"""What every pod sandbox on the node should have, and what its netns holds: for repair, inspect and doctor.

The sandboxes come from a `SandboxSource` (the runtime's CRI, or a fake);
each is evaluated exactly as ADD would evaluate it now, with the entry
installed in the node's conflist and the sandbox's own annotations
(`evaluation.evaluate_sandbox`), and its netns is compared exactly as CHECK
compares (`evaluation.compare`), in a session a `SessionFactory` opens.
Reading only: nothing here changes a netns.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..config import PodRef
from ..errors import CriError, HostNetns, InvalidEnvironment
from ..evaluation import Drift, DriftKind, Evaluation, Outcome, compare, evaluate_sandbox

if TYPE_CHECKING:
    from ..backend import Observed, Session
    from ..cniserver import NetnsLocks
    from ..cri import Sandbox, SandboxDetails

OK, MISSING, DRIFTED = "ok", "missing", "drifted"

#: Opens a session on a pod netns by its path (vetted, entered; under the CNI server's lock when there is one).
SessionFactory = Callable[[str], AbstractContextManager["Session"]]


class SandboxSource(Protocol):
    """What the survey needs from the runtime (cri.CriClient; a fake in tests)."""

    def ready_sandboxes(self) -> list[Sandbox]: ...

    def sandbox_details(self, sandbox_id: str) -> SandboxDetails | None:
        """None when the sandbox is gone since it was listed; CriError when the runtime fails."""


def kernel_sessions(locks: NetnsLocks | None = None) -> SessionFactory:
    """Sessions on real pod netns: opened and vetted by path, held under the CNI server's per-netns lock."""
    from ..backend import KernelBackend
    from ..netns import open_netns, received_fd

    @contextmanager
    def session(netns: str) -> Iterator[Session]:
        fd = open_netns(netns)
        try:
            with (
                locks.held(fd) if locks is not None else nullcontext(),
                KernelBackend(received_fd(fd)).session(netns) as opened,
            ):
                yield opened
        finally:
            os.close(fd)

    return session


@dataclass
class PodView:
    """One sandbox: who it is, what ADD would give it now, and how its netns compares."""

    sandbox_id: str
    namespace: str
    name: str
    uid: str
    annotations: dict[str, str]
    netns: str | None = None
    decision: Outcome = Outcome.CAPTURED
    reason: str = ""
    evaluation: Evaluation | None = None
    observed: Observed | None = None
    drift: Drift | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def state(self) -> str | None:
        """ok, missing, drifted (also: a table or routing where none belongs); None: nothing expected, none there."""
        if self.observed is None:
            return None
        if self.drift is None:
            return OK if self.evaluation is not None and self.evaluation.ruleset is not None else None
        return MISSING if self.drift.kind is DriftKind.MISSING else DRIFTED

    @property
    def listing(self) -> list[dict] | None:
        return self.observed.listing if self.observed is not None else None


class Survey:
    """Walk the node's ready sandboxes and compare each netns with what ADD would program."""

    def __init__(self, cri: SandboxSource, entry: dict, sessions: SessionFactory | None = None) -> None:
        self.cri = cri
        self.entry = entry
        self.sessions = sessions or kernel_sessions()

    def pods(self) -> Iterator[PodView]:
        """Every ready sandbox; one whose status the runtime cannot give is reported, and the walk goes on."""
        for sandbox in self.cri.ready_sandboxes():
            view = PodView(sandbox.id, sandbox.namespace, sandbox.name, sandbox.uid, sandbox.annotations)
            try:
                details = self.cri.sandbox_details(sandbox.id)
            except CriError as error:
                view.decision, view.reason = Outcome.UNKNOWN, str(error)
                view.problems.append(str(error))
                yield view
                continue
            if details is None:
                continue  # removed since we listed it
            self._classify(view, details)
            yield view

    def _classify(self, view: PodView, details: SandboxDetails) -> None:
        if details.host_network:
            view.decision, view.reason = Outcome.HOST_NETWORK, "uses the node's network namespace"
            return
        evaluation = evaluate_sandbox(self.entry, PodRef(view.namespace, view.name, view.uid), view.annotations)
        view.evaluation, view.decision, view.reason = evaluation, evaluation.outcome, evaluation.reason
        if evaluation.outcome in (Outcome.INVALID, Outcome.EXCLUDED_NAMESPACE):
            return  # never touched, never read
        view.netns = details.netns
        if view.netns is None:
            view.problems.append("the runtime reports no network namespace path for this sandbox")
            return
        self.examine(view)

    def examine(self, view: PodView) -> None:
        """Read the pod's table and routing, and compare them exactly as CHECK does."""
        assert view.evaluation is not None and view.netns is not None
        try:
            with self.sessions(view.netns) as session:
                view.observed = session.observe(view.evaluation.wants_routing)
        except HostNetns:
            view.decision, view.reason = Outcome.HOST_NETWORK, "its netns is the node's own"
            return
        except InvalidEnvironment as error:
            view.problems.append(error.msg)  # gone since we listed it, or not a netns
            return
        view.drift = compare(view.evaluation, view.observed)
