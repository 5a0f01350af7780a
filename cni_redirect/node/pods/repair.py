"""Repair: pods that started while our entry was absent get their table in place, without the kube API.

It happens at node boot, on an upgrade gap, when the primary CNI rewrote its
file: a pod starts before cni-redirect is chained and runs uncaptured. The
node agent lists the ready sandboxes through CRI at start, after every
re-insertion of our entry and every `--repair-interval` seconds, decides for
each exactly as ADD would and compares exactly as CHECK would (`survey`).
Passes share a `SurveyMemo`: a sandbox's status is asked once, its evaluation
is redone only when the entry changes, and a netns whose nftables generation
is unchanged since its last comparison is not listed again (every sixtieth
pass, 30 minutes at the default interval, compares everything in full).
A missing or drifted table is programmed (`in-place`), or only logged
(`report`); `off` does nothing. Never touched: host-network sandboxes,
excluded namespaces, the agent's own netns; a sandbox that disappears
mid-pass is not an error.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import CriError, SettingsError
from ...threads import NamedThread
from .. import REPAIR_MODES
from ..chaining.chain import installed_entry
from .survey import DRIFTED, MISSING, PodView, SandboxSource, SessionFactory, Survey, SurveyMemo, kernel_sessions

if TYPE_CHECKING:
    import threading

    from ...backend import Session
    from .nftevents import TransactionEvents


@dataclass
class PassResult:
    """One pass: how many sandboxes in each state, what was repaired, how long it took."""

    states: Counter[str] = field(default_factory=Counter)
    repaired: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)  # what was wrong with the repaired ones
    seconds: float = 0.0
    error: str = ""
    failed: int = 0  # sandboxes whose status, netns or repair failed (each recorded, the pass went on)
    chained: bool = True  # False: our entry is not in the node's config (yet), so there was nothing to walk
    deferred: int = 0  # new sandboxes left for the next pass (younger than the pass's `settle`)


def put_right(session: Session, view: PodView) -> None:
    """Give the pod what its evaluation says, in its netns: the table (or none), and no stale routing."""
    evaluation = view.evaluation
    assert evaluation is not None
    if evaluation.ruleset is None:
        session.remove()  # the table and any routing of ours
        return
    session.apply(evaluation.ruleset)
    if not evaluation.wants_routing and view.observed is not None and view.observed.routing:
        session.clear_routing()


class Repairer:
    def __init__(
        self,
        cri: SandboxSource,
        conf_dir: Path,
        log: Callable[..., None],
        mode: str = "in-place",
        conf_file: str | None = None,
        sessions: SessionFactory | None = None,
        on_pass: Callable[[PassResult], None] | None = None,
        events: TransactionEvents | None = None,
    ) -> None:
        if mode not in REPAIR_MODES:
            raise SettingsError(f"--repair {mode!r} must be one of {', '.join(REPAIR_MODES)}")
        self.cri = cri
        self.conf_dir = conf_dir
        self.conf_file = conf_file
        self.log = log
        self.mode = mode
        self.sessions = sessions or kernel_sessions()
        self.on_pass = on_pass
        self.events = events  # nftables transactions heard from the node's netns: quiet pods are not entered
        self.passes = 0
        self.last: PassResult | None = None
        self.repairs: Counter[str] = Counter()  # by reason: missing, drifted
        self.memo = SurveyMemo()  # what earlier passes learnt: an idle node's pass costs almost nothing
        self._last_error = ""
        self._thread: threading.Thread | None = None

    def run_once(self, settle: float = 0.0) -> PassResult:
        """One pass over the node's ready sandboxes; those first listed and younger than `settle` seconds wait for
        the next pass (0: none waits)."""
        result = PassResult()
        start = time.monotonic()
        entry = installed_entry(self.conf_dir, self.conf_file)
        if entry is None:
            result.error, result.chained = "cni-redirect is not chained into the node's CNI config", False
            return self._finish(result, start)
        survey = Survey(self.cri, entry, self.sessions, self.memo, self.events, settle)
        try:
            for view in survey.pods():
                if view.state in (MISSING, DRIFTED):
                    view = self._repair(survey, view, result)
                result.states[view.state or view.decision.value] += 1
                result.failed += 1 if view.problems else 0
        except CriError as exc:
            result.error = str(exc)
        finally:
            result.deferred = survey.deferred
            self._close_channel()  # an idle gRPC channel costs CPU between passes; a new one costs a millisecond
        return self._finish(result, start)

    def _repair(self, survey: Survey, view: PodView, result: PassResult) -> PodView:
        """Put one pod right (or, in report mode, say it needs it); returns the pod's report after."""
        drift = view.drift.message if view.drift is not None else ""
        what = f"{view.ref} ({view.sandbox_id[:13]}): {drift}"
        if self.mode == "report":
            self.log("warning", f"repair needed: {what}", pod=view.ref, state=view.state, mode="report")
            return view
        reason = str(view.state)  # MISSING or DRIFTED: _repair is called for those only
        assert view.netns is not None
        try:
            with self.sessions(view.netns) as session:
                put_right(session, view)
        except Exception as exc:  # a sandbox torn down mid-pass, a kernel refusal: next pass tries again
            self.log("info", f"repair skipped: {view.ref}: {exc}", pod=view.ref)
            return view.with_problem(f"repair failed: {exc}")
        self.repairs[reason] += 1
        result.repaired.append(view.ref)
        result.reasons[reason] += 1
        captured = view.evaluation is not None and view.evaluation.captured
        self.log("warning", f"repaired {what}", pod=view.ref, state=reason, captured=captured)
        return survey.examine(view, fresh=True)  # state now ok (or nothing expected)

    def _finish(self, result: PassResult, start: float) -> PassResult:
        result.seconds = time.monotonic() - start
        self.passes += 1
        self.last = result
        if result.error and result.error != self._last_error:
            self.log("error", f"repair pass failed: {result.error}")
        self._last_error = result.error
        if self.on_pass is not None:
            self.on_pass(result)
        return result

    def loop(self, stop: threading.Event, wake: threading.Event, interval: float) -> None:
        """Run passes until stop: one now, then each interval or when woken (our entry was re-inserted). A pass
        on the interval leaves sandboxes younger than the interval to the next one (`run_once`'s settle): their
        ADD set them up moments ago, and a burst of pod starts is not slowed by their first look."""
        if self.mode == "off":
            return
        settle = 0.0  # the first pass, and one our entry's return woke, look at every sandbox at once
        while not stop.is_set():
            wake.clear()
            try:
                self.run_once(settle)
            except Exception as exc:  # never let the repair thread die silently
                self.log("error", f"repair pass crashed: {type(exc).__name__}: {exc}")
            settle = 0.0 if wake.wait(interval) else interval

    def start(self, stop: threading.Event, wake: threading.Event, interval: float) -> None:
        """`loop` in a thread of its own, which `close` waits for."""
        self._thread = NamedThread(self.loop, "repair", (stop, wake, interval))
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Once `stop` is set: wait for a pass under way to end (bounded: a pod's kernel reads are), then close
        the CRI channel, never under a pass that still uses it."""
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self.log("warning", "the repair pass did not end in time; closing its CRI channel under it")
        self._close_channel()
        close_events = getattr(self.events, "close", None)
        if callable(close_events) and (thread is None or not thread.is_alive()):
            close_events()  # a pass still running keeps its socket: the process is ending anyway

    def _close_channel(self) -> None:
        close = getattr(self.cri, "close", None)
        if callable(close):
            close()
