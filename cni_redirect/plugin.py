"""ADD, DEL, CHECK, STATUS and GC for the cni-redirect chained plugin.

Each command reads straight down: parse the config, evaluate
(evaluation.py), do the one kernel operation in a session on the pod's
netns, return. Everything that can be wrong
with the input is found before the backend is called, so a failed ADD
never leaves a partial table.
"""

from __future__ import annotations

import os
import sys
import time

from .backend import Backend, KernelBackend
from .config import PluginConf, PodRef, parse_cni_args, parse_conf, pod_ref
from .errors import CniError, InternalError, InvalidConfig, NetnsGone, NotANetns
from .evaluation import NO_NAMESPACE_NOTE, Evaluation, compare, evaluate
from .logs import EventLog
from .result import convert_result
from .skel import Request, dispatch
from .status import status_of


class RedirectPlugin:
    """The plugin's commands, over an injectable backend and log."""

    def __init__(
        self,
        backend: Backend | None = None,
        log: EventLog | None = None,
        fallback: str | None = None,
        via: str = "in-process",
    ) -> None:
        self.backend: Backend = backend if backend is not None else KernelBackend()
        self.log = log if log is not None else EventLog()
        self.via = via  # who did the work: "in-process" (the plugin's own process) or "cni-server"
        self._started = time.monotonic()
        self._notes: dict[str, object] = {"fallback": fallback} if fallback else {}

    # --- commands ---

    def add(self, request: Request) -> dict:
        conf = self._conf(request)
        if conf.prev_result is None:
            raise InvalidConfig(
                "prevResult is missing: cni-redirect must be called as a chained plugin, after the primary CNI plugin"
            )
        result = convert_result(conf.prev_result, request.cni_version)
        evaluation = self._evaluate(conf, request)
        if evaluation.ruleset is not None:
            with self.backend.session(request.netns) as session:
                session.apply(evaluation.ruleset)
        self._finish(request, evaluation.reason)
        return result

    def delete(self, request: Request) -> None:
        try:
            self._conf(request)
        except InvalidConfig as error:  # a broken conflist must not block pod teardown
            self.log.log("warning", f"DEL continues despite an invalid config: {error.msg}")
        self._pod(request)
        if not request.netns:
            self._finish(request, "nothing to do: CNI_NETNS is empty")
            return
        try:
            with self.backend.session(request.netns) as session:
                removed = session.remove()
        except (NetnsGone, NotANetns):
            removed = False  # the sandbox is gone, and our table with it
        self._finish(request, "removed table" if removed else "nothing to do: no table")

    def check(self, request: Request) -> None:
        conf = self._conf(request)
        if conf.prev_result is None:
            raise InvalidConfig("prevResult is missing: CHECK needs the result of the ADD it checks")
        evaluation = self._evaluate(conf, request)
        with self.backend.session(request.netns) as session:
            observed = session.observe(evaluation.wants_routing, evaluation.read_bound)
        drift = compare(evaluation, observed)
        if drift is not None:
            raise InternalError(drift.message, drift.details)
        self._finish(request, f"consistent: {evaluation.reason}")

    def status(self, request: Request) -> None:
        """The same answer the front gives without us (`status.status_of`), then the backend's own check."""
        self._settled(request)
        self.backend.status()
        self._finish(request, "ready")

    def gc(self, request: Request) -> None:
        """Nothing to collect: every rule we make lives and dies with its pod netns."""
        self._settled(request)
        self._finish(request, "nothing to collect")

    def _settled(self, request: Request) -> None:
        self._configure_log(request)
        problem = status_of(request.command, request.config)
        if problem is not None:
            raise problem

    # --- bookkeeping ---

    def _conf(self, request: Request) -> PluginConf:
        self._configure_log(request)
        return parse_conf(request.config)

    def _configure_log(self, request: Request) -> None:
        """First, so that even a config error reaches the admin's log file."""
        level, path = request.config.get("log_level"), request.config.get("log_file")
        self.log.configure(level if isinstance(level, str) else "warning", path if isinstance(path, str) else None)
        if "fallback" in self._notes and not self._notes.get("warned"):
            self._notes["warned"] = True
            self.log.log("warning", str(self._notes["fallback"]))

    def _evaluate(self, conf: PluginConf, request: Request) -> Evaluation:
        evaluation = evaluate(conf, self._pod(request))
        for level, message in evaluation.notes:
            self.log.log(level, message)
        evaluation.raise_if_invalid()
        return evaluation

    def _pod(self, request: Request) -> PodRef:
        pod = pod_ref(parse_cni_args(request.args))
        self._notes["pod"] = str(pod)
        if pod.namespace is None:
            self._notes["note"] = NO_NAMESPACE_NOTE
        return pod

    def _finish(self, request: Request, outcome: str) -> None:
        self.log.event(
            command=request.command,
            container_id=request.container_id[:16],
            pod=self._notes.get("pod"),
            duration_ms=round((time.monotonic() - self._started) * 1000, 2),
            outcome=outcome,
            via=self.via,
            note=self._notes.get("note"),
            fallback=self._notes.get("fallback"),
        )

    def report_failure(self, request: Request | None, error: CniError) -> None:
        self.log.event(
            command=request.command if request else None,
            container_id=request.container_id[:16] if request else None,
            pod=self._notes.get("pod"),
            duration_ms=round((time.monotonic() - self._started) * 1000, 2),
            outcome="error",
            via=self.via,
            code=error.code,
            msg=error.msg,
            fallback=self._notes.get("fallback"),
        )


def run_in_process(stdin: bytes, fallback: str | None = None) -> int:
    """Do the CNI command in this process: no CNI server configured, or (`fallback`, why) none answered."""
    code = dispatch(RedirectPlugin(fallback=fallback), os.environ, stdin, sys.stdout, sys.stderr)
    sys.stdout.flush()
    return code
