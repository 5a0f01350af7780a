"""ADD, DEL, CHECK, STATUS and GC for the cni-redirect chained plugin.

Each command is a function of one frozen `Invocation` (as skel's commands take CmdArgs) and reads straight
down: parse the config, evaluate
(evaluation.py), do the one kernel operation in a session on the pod's
netns, return. Everything that can be wrong
with the input is found before the backend is called, so a failed ADD
never leaves a partial table.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .backend import Backend, KernelBackend
from .config import PluginConf, PodRef, parse_cni_args, parse_conf, pod_ref
from .errors import CniError, InternalError, InvalidConfig, NetnsGone, NotANetns
from .evaluation import NO_NAMESPACE_NOTE, Evaluation, compare, evaluate
from .logs import EventLog
from .result import convert_result
from .skel import Request, dispatch
from .status import status_of


@dataclass(frozen=True)
class Invocation:
    """One CNI call and what it acts on, fixed when it arrives (skel's CmdArgs, plus the binding): the request
    (env and config, the netns path), the backend that reaches the netns, the log, who does the work
    ("in-process", or "cni-server"), why it is in-process when a server was configured, and when it started."""

    request: Request
    backend: Backend
    log: EventLog
    via: str = "in-process"
    fallback: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def pod(self) -> PodRef:
        return pod_ref(parse_cni_args(self.request.args))


# --- the commands: functions of one invocation, nothing kept between calls ---


def cmd_add(call: Invocation) -> dict:
    conf = _conf(call)
    if conf.prev_result is None:
        raise InvalidConfig(
            "prevResult is missing: cni-redirect must be called as a chained plugin, after the primary CNI plugin"
        )
    result = convert_result(conf.prev_result, call.request.cni_version)
    evaluation = _evaluate(call, conf)
    if evaluation.ruleset is not None:
        with call.backend.session(call.request.netns) as session:
            session.apply(evaluation.ruleset)
    _finish(call, evaluation.reason)
    return result


def cmd_del(call: Invocation) -> None:
    try:
        _conf(call)
    except InvalidConfig as error:  # a broken conflist must not block pod teardown
        call.log.log("warning", f"DEL continues despite an invalid config: {error.msg}")
    if not call.request.netns:
        _finish(call, "nothing to do: CNI_NETNS is empty")
        return
    try:
        with call.backend.session(call.request.netns) as session:
            removed = session.remove()
    except (NetnsGone, NotANetns):
        removed = False  # the sandbox is gone, and our table with it
    _finish(call, "removed table" if removed else "nothing to do: no table")


def cmd_check(call: Invocation) -> None:
    conf = _conf(call)
    if conf.prev_result is None:
        raise InvalidConfig("prevResult is missing: CHECK needs the result of the ADD it checks")
    evaluation = _evaluate(call, conf)
    with call.backend.session(call.request.netns) as session:
        observed = session.observe(evaluation.wants_routing, evaluation.read_bound, evaluation.tuning)
    drift = compare(evaluation, observed)
    if drift is not None:
        raise InternalError(drift.message, drift.details)
    _finish(call, f"consistent: {evaluation.reason}")


def cmd_status(call: Invocation) -> None:
    """The same answer the front gives without us (`status.status_of`), then the backend's own check."""
    _settled(call)
    call.backend.status()
    _finish(call, "ready")


def cmd_gc(call: Invocation) -> None:
    """Nothing to collect: every rule we make lives and dies with its pod netns."""
    _settled(call)
    _finish(call, "nothing to collect")


COMMANDS: dict[str, Callable[[Invocation], dict | None]] = {
    "ADD": cmd_add,
    "DEL": cmd_del,
    "CHECK": cmd_check,
    "STATUS": cmd_status,
    "GC": cmd_gc,
}


# --- what every command does first and last ---


def _configure_log(call: Invocation) -> None:
    """First, so that even a config error reaches the admin's log file."""
    config = call.request.config
    level, path = config.get("log_level"), config.get("log_file")
    call.log.configure(level if isinstance(level, str) else "warning", path if isinstance(path, str) else None)
    if call.fallback:
        call.log.log("warning", call.fallback)


def _conf(call: Invocation) -> PluginConf:
    _configure_log(call)
    return parse_conf(call.request.config)


def _settled(call: Invocation) -> None:
    _configure_log(call)
    problem = status_of(call.request.command, call.request.config)
    if problem is not None:
        raise problem


def _evaluate(call: Invocation, conf: PluginConf) -> Evaluation:
    evaluation = evaluate(conf, call.pod)
    for level, message in evaluation.notes:
        call.log.log(level, message)
    evaluation.raise_if_invalid()
    return evaluation


_FOR_A_POD = ("ADD", "CHECK", "DEL")  # the commands whose event names the pod


def _event_fields(call: Invocation) -> dict[str, object]:
    request = call.request
    return {
        "command": request.command,
        "container_id": request.container_id[:16],
        "pod": str(call.pod) if request.command in _FOR_A_POD else None,
        "duration_ms": round((time.monotonic() - call.started) * 1000, 2),
    }


def _finish(call: Invocation, outcome: str) -> None:
    note = NO_NAMESPACE_NOTE if call.request.command in _FOR_A_POD and call.pod.namespace is None else None
    call.log.event(**_event_fields(call), outcome=outcome, via=call.via, note=note, fallback=call.fallback)


@dataclass(frozen=True)
class RedirectPlugin:
    """The commands bound to what they act on (skel's PluginMainFuncs): a backend, a log, who does the work.
    Frozen: each call builds its own `Invocation`; nothing is kept from one call to the next."""

    backend: Backend = field(default_factory=KernelBackend)
    log: EventLog = field(default_factory=EventLog)
    fallback: str | None = None
    via: str = "in-process"
    started: float = field(default_factory=time.monotonic)  # the request's arrival: one binding serves one request

    def invocation(self, request: Request) -> Invocation:
        return Invocation(request, self.backend, self.log, self.via, self.fallback, self.started)

    def add(self, request: Request) -> dict:
        return cmd_add(self.invocation(request))

    def delete(self, request: Request) -> None:
        cmd_del(self.invocation(request))

    def check(self, request: Request) -> None:
        cmd_check(self.invocation(request))

    def status(self, request: Request) -> None:
        cmd_status(self.invocation(request))

    def gc(self, request: Request) -> None:
        cmd_gc(self.invocation(request))

    def report_failure(self, request: Request | None, error: CniError) -> None:
        fields: dict[str, object] = {"command": None, "container_id": None, "pod": None}
        if request is not None:
            fields = _event_fields(self.invocation(request))
        fields["duration_ms"] = round((time.monotonic() - self.started) * 1000, 2)
        self.log.event(**fields, outcome="error", via=self.via, code=error.code, msg=error.msg, fallback=self.fallback)


def run_in_process(stdin: bytes, fallback: str | None = None) -> int:
    """Do the CNI command in this process: no CNI server configured, or (`fallback`, why) none answered."""
    code = dispatch(RedirectPlugin(fallback=fallback), os.environ, stdin, sys.stdout, sys.stderr)
    sys.stdout.flush()
    return code
