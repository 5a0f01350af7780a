"""What every pod sandbox on the node should have, and what its netns holds: for repair, inspect and doctor.

The sandboxes come from a `SandboxSource` (the runtime's CRI, or a fake);
each is evaluated exactly as ADD would evaluate it now, with the entry
installed in the node's conflist and the sandbox's own annotations
(`evaluation.evaluate_sandbox`), and its netns is compared exactly as CHECK
compares (`evaluation.compare`), in a session a `SessionFactory` opens.
Reading only: nothing here changes a netns.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol

from ...config import PodRef
from ...errors import CriError, HostNetns, InvalidEnvironment
from ...evaluation import Drift, DriftKind, Evaluation, Outcome, compare, evaluate_sandbox

if TYPE_CHECKING:
    from ...backend import Observed, Session
    from ...cniserver import NetnsLocks
    from ...cri import Sandbox, SandboxDetails
    from .nftevents import Heard, TransactionEvents


class TableState(StrEnum):
    """A pod's netns against what ADD would give it now (a table or routing where none belongs is drifted)."""

    OK = "ok"
    MISSING = "missing"
    DRIFTED = "drifted"


OK, MISSING, DRIFTED = TableState.OK, TableState.MISSING, TableState.DRIFTED
Who = tuple[str, str, str, str, dict[str, str]]  # a sandbox's id, namespace, name, uid, annotations

#: Opens a session on a pod netns by its path (vetted, entered; under the CNI server's lock when there is one).
SessionFactory = Callable[[str], AbstractContextManager["Session"]]


class SandboxSource(Protocol):
    """What the survey needs from the runtime (cri.CriClient; a fake in tests)."""

    def ready_sandboxes(self) -> list[Sandbox]: ...

    def sandbox_details(self, sandbox_id: str) -> SandboxDetails | None:
        """None when the sandbox is gone since it was listed; CriError when the runtime fails."""


def kernel_sessions(locks: NetnsLocks | None = None) -> SessionFactory:
    """Sessions on real pod netns: opened and vetted by path, held under the CNI server's per-netns lock."""
    from ...backend import KernelBackend
    from ...netns import open_netns, vetted_fd

    @contextmanager
    def session(netns: str) -> Iterator[Session]:
        fd = open_netns(netns)  # vetted here, once: the backend's opener only dups it
        try:
            with (
                locks.held(fd) if locks is not None else nullcontext(),
                KernelBackend(vetted_fd(fd)).session(netns) as opened,
            ):
                yield opened
        finally:
            os.close(fd)

    return session


@dataclass(frozen=True)
class PodView:
    """One sandbox's report: who it is, what ADD would give it now (its decision, and why), and how its netns
    compares. Frozen: a later look (after a repair) is a new report."""

    sandbox_id: str
    namespace: str
    name: str
    uid: str
    annotations: dict[str, str]
    decision: Outcome
    reason: str = ""
    netns: str | None = None
    evaluation: Evaluation | None = None
    observed: Observed | None = None
    drift: Drift | None = None
    problems: tuple[str, ...] = ()

    def with_problem(self, problem: str) -> PodView:
        return replace(self, problems=(*self.problems, problem))

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def state(self) -> TableState | None:
        """OK, MISSING, DRIFTED (also: a table or routing where none belongs); None: nothing expected, none there."""
        if self.observed is None:
            return None
        if self.drift is None:
            return OK if self.evaluation is not None and self.evaluation.ruleset is not None else None
        return MISSING if self.drift.kind is DriftKind.MISSING else DRIFTED

    @property
    def listing(self) -> list[dict[str, Any]] | None:
        return self.observed.listing if self.observed is not None else None


@dataclass
class Seen:
    """What earlier passes learnt of one sandbox (its status never changes; its evaluation only with the entry)."""

    details: SandboxDetails
    entry_key: str = ""
    evaluation: Evaluation | None = None
    generation: int | None = None  # the netns's nftables generation when its table was last compared
    observed: Observed | None = None
    drift: Drift | None = None
    read_in: int = 0  # the pass that last read that generation (by the events' count)
    heard: Heard | None = None  # how nftables events name its netns; None: not heard (no id) or not asked yet
    unheard_in: int = -1  # the full pass that last found it cannot be heard (asked again at the next full one)


@dataclass
class SurveyMemo:
    """Kept by the repair loop across passes, so a pass over a node where nothing changed costs almost nothing:
    one ListPodSandbox, and per pod one netns entry and one netlink round trip (the nftables generation), or,
    where the node agent hears nftables transactions (`nftevents`), not even that for a pod whose netns had none.

    `full_every`: every so many passes (60: every 30 minutes at the default interval), every pod is compared
    in full anyway. Every other pass already sees any nftables transaction (the generation), our routing where
    a pod has or wants some, and its tuning; the full pass adds our routing appearing in a pod that has none, and
    is the belt over that reasoning. At 100 pods it costs about 14 remembered passes (docs/benchmarks.md
    §8), so 60 rather than 20: the idle agent's largest single cost, a third as often."""

    seen: dict[str, Seen] = field(default_factory=dict)
    full_every: int = 60
    remember: bool = True  # False: a one-off look (inspect, doctor): every pod compared in full, nothing kept
    passes: int = 0
    status_calls: int = 0  # PodSandboxStatus calls made
    full: int = 0  # pods compared in full (table listed)
    quick: int = 0  # pods found unchanged by their generation alone
    heard: int = 0  # pods found unchanged by the nftables events alone, their netns not entered

    @classmethod
    def forgetful(cls) -> SurveyMemo:
        return cls(full_every=1, remember=False)


class Survey:
    """Walk the node's ready sandboxes and compare each netns with what ADD would program."""

    def __init__(
        self,
        cri: SandboxSource,
        entry: dict[str, Any],
        sessions: SessionFactory | None = None,
        memo: SurveyMemo | None = None,
        events: TransactionEvents | None = None,
        settle: float = 0.0,
    ) -> None:
        self.cri = cri
        self.entry = entry
        self.sessions = sessions or kernel_sessions()
        self.memo = memo or SurveyMemo.forgetful()
        self.entry_key = json.dumps(entry, sort_keys=True)
        self.full_pass = self.memo.passes % self.memo.full_every == 0
        self.memo.passes += 1
        self.events = events if self.memo.remember else None
        self.pass_number = self.events.advance() if self.events is not None else 0  # before any read of this pass
        self.settle = settle if self.memo.remember else 0.0
        self.deferred = 0  # sandboxes too young for their first look in this pass

    def pods(self) -> Iterator[PodView]:
        """Every ready sandbox; one whose status the runtime cannot give is reported, and the walk goes on."""
        sandboxes = self.cri.ready_sandboxes()
        listed = {sandbox.id for sandbox in sandboxes}
        for gone in set(self.memo.seen) - listed:
            del self.memo.seen[gone]
        now = time.time()
        for sandbox in sandboxes:
            if self._settling(sandbox, now):
                self.deferred += 1
                continue
            who: Who = (sandbox.id, sandbox.namespace, sandbox.name, sandbox.uid, sandbox.annotations)
            try:
                details = self._details(sandbox.id)
            except CriError as error:
                yield PodView(*who, Outcome.UNKNOWN, str(error), problems=(str(error),))
                continue
            if details is not None:  # None: removed since we listed it
                yield self._classify(who, details)

    def _settling(self, sandbox: Sandbox, now: float) -> bool:
        """Not seen before and younger than `settle`: its first look (a status call, an evaluation, its table
        listed) waits for the next pass. A burst of pod starts is then not slowed by a pass reading each new pod
        while the node is busiest; the pod's ADD set it up a moment ago."""
        return (
            self.settle > 0
            and sandbox.id not in self.memo.seen
            and sandbox.created_at > 0
            and now - sandbox.created_at < self.settle
        )

    def _details(self, sandbox_id: str) -> SandboxDetails | None:
        seen = self.memo.seen.get(sandbox_id)
        if seen is not None:
            return seen.details
        details = self.cri.sandbox_details(sandbox_id)
        self.memo.status_calls += 1
        if details is not None and self.memo.remember:
            self.memo.seen[sandbox_id] = Seen(details)
        return details

    def _evaluate(self, sandbox_id: str, pod: PodRef, annotations: dict[str, str]) -> Evaluation:
        """ADD's evaluation of the sandbox; remembered until the entry changes (its annotations never do)."""
        seen = self.memo.seen.get(sandbox_id)
        if seen is not None and seen.evaluation is not None and seen.entry_key == self.entry_key:
            return seen.evaluation
        evaluation = evaluate_sandbox(self.entry, pod, annotations)
        if seen is not None:
            seen.evaluation, seen.entry_key, seen.generation = evaluation, self.entry_key, None
        return evaluation

    def _classify(self, who: Who, details: SandboxDetails) -> PodView:
        if details.host_network:
            return PodView(*who, Outcome.HOST_NETWORK, "uses the node's network namespace")
        sandbox_id, namespace, name, uid, annotations = who
        evaluation = self._evaluate(sandbox_id, PodRef(namespace, name, uid), annotations)
        if evaluation.outcome in (Outcome.INVALID, Outcome.EXCLUDED_NAMESPACE):  # never touched, never read
            return PodView(*who, evaluation.outcome, evaluation.reason, evaluation=evaluation)
        view = PodView(*who, evaluation.outcome, evaluation.reason, netns=details.netns, evaluation=evaluation)
        if details.netns is None:
            return view.with_problem("the runtime reports no network namespace path for this sandbox")
        return self.examine(view)

    def examine(self, view: PodView, fresh: bool = False) -> PodView:
        """The report with the pod's table and routing read and compared exactly as CHECK does. A netns whose
        nftables generation (and routing, where the pod has or had some) is as at the last comparison the memo
        kept is not listed again. `fresh`: compare in full whatever the memo says (after a repair)."""
        evaluation = view.evaluation
        assert evaluation is not None and view.netns is not None
        seen = self.memo.seen.get(view.sandbox_id)
        if seen is not None and not fresh and not self.full_pass and self._quiet(seen, view.netns):
            self.memo.heard += 1
            return replace(view, observed=seen.observed, drift=seen.drift)
        if seen is not None:
            self._identify(seen, view.netns)
        try:
            with self.sessions(view.netns) as session:
                generation = session.generation() if seen is not None else None
                if seen is not None:
                    seen.read_in = self.pass_number
                if seen is not None and not fresh and not self.full_pass and self._unchanged(seen, generation, session):
                    self.memo.quick += 1
                    return replace(view, observed=seen.observed, drift=seen.drift)
                observed = session.observe(evaluation.wants_routing, evaluation.read_bound, evaluation.tuning)
        except HostNetns:
            return replace(view, decision=Outcome.HOST_NETWORK, reason="its netns is the node's own")
        except InvalidEnvironment as error:
            return view.with_problem(error.msg)  # gone since we listed it, or not a netns
        drift = compare(evaluation, observed)
        if seen is not None:
            self.memo.full += 1
            seen.generation, seen.observed, seen.drift = generation, observed, drift
        return replace(view, observed=observed, drift=drift)

    def _quiet(self, seen: Seen, netns: str) -> bool:
        """Unchanged by what the kernel told us: no nftables transaction in that netns since its generation was
        read, and nothing compared that a transaction does not announce (routing, tuning)."""
        if self.events is None or seen.heard is None or seen.observed is None or seen.generation is None:
            return False
        assert seen.evaluation is not None
        if seen.evaluation.tuning is not None or seen.evaluation.wants_routing or seen.observed.routing:
            return False
        return self.events.quiet(netns, seen.heard, seen.read_in)

    def _identify(self, seen: Seen, netns: str) -> None:
        """Learn how the events name the netns, before its generation is read; asked again at each full pass
        for one that cannot be heard (a primary may give it an id later)."""
        if self.events is None or seen.heard is not None:
            return
        if seen.unheard_in >= 0 and not self.full_pass:
            return
        seen.heard = self.events.identify(netns)
        seen.unheard_in = self.memo.passes if seen.heard is None else -1

    @staticmethod
    def _unchanged(seen: Seen, generation: int | None, session: Session) -> bool:
        if seen.observed is None or seen.generation is None or seen.generation != generation:
            return False
        assert seen.evaluation is not None
        if seen.evaluation.tuning is not None:
            return False  # routes and sysctls change without an nftables transaction: read them every pass
        if seen.evaluation.wants_routing or seen.observed.routing:
            return session.routing() == seen.observed.routing  # a filtered dump: our mark and table only
        return True
