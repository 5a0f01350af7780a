"""ADD, DEL, CHECK, STATUS and GC for the cni-redirect chained plugin.

Each command reads straight down: parse the config, decide, do the one
kernel operation through the backend, return. Everything that can be wrong
with the input is found before the backend is called, so a failed ADD
never leaves a partial table.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

from .backend import Backend, KernelBackend, normalize
from .config import ANNOTATIONS_CAPABILITY, PluginConf, PodRef, parse_cni_args, parse_conf, pod_ref
from .errors import CniError, InternalError, InvalidConfig
from .logs import EventLog
from .profiles import profile_named
from .result import convert_result
from .ruleset import FAMILY, TABLE, Ruleset, build_ruleset
from .skel import Request, dispatch
from .spec import CaptureSpec, build_spec, is_enabled, merge_settings

TABLE_NAME = f"table {FAMILY} {TABLE}"
NO_NAMESPACE_NOTE = "no K8S_POD_NAMESPACE in CNI_ARGS: exclude_namespaces does not apply"


@dataclass(frozen=True)
class Decision:
    """What a pod gets: a ruleset, or None and the reason it is left alone."""

    ruleset: Ruleset | None
    reason: str
    spec: CaptureSpec | None = None


def decide(conf: PluginConf, pod: PodRef, log: EventLog | None = None) -> Decision:
    """Pure policy: from config, pod identity and annotations to a ruleset or a reason."""
    if pod.namespace is None:
        if log:
            log.log("info", NO_NAMESPACE_NOTE)
    elif pod.namespace in conf.exclude_namespaces:
        return Decision(None, f"skipped: namespace {pod.namespace} is in exclude_namespaces")
    if log and not conf.capabilities.get(ANNOTATIONS_CAPABILITY):
        log.log(
            "warning",
            f'conflist entry lacks "capabilities": {{"{ANNOTATIONS_CAPABILITY}": true}}: '
            "the runtime passes no pod annotations, only defaults apply",
        )
    settings, ignored = merge_settings(
        conf.defaults, conf.annotations(), conf.annotation_policy, conf.pod_settable, profile_named(conf.profile)
    )
    if ignored and log:
        log.log("warning", f"annotation_policy restricted: ignored {', '.join(sorted(ignored))} (not in pod_settable)")
    if not is_enabled(settings):
        why = settings["enabled"].why
        if why and log:
            log.log("info", f"not capturing: {why}")
        return Decision(None, f"skipped: not enabled ({why})" if why else "skipped: not enabled")
    spec = build_spec(
        settings,
        allow_root_proxy_uid=conf.allow_root_proxy_uid,
        max_set_elements=conf.max_set_elements,
    )
    return Decision(build_ruleset(spec), "captured", spec)


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
        pod = self._pod(request)
        decision = decide(conf, pod, self.log)
        if decision.ruleset is not None:
            self.backend.apply(request.netns, decision.ruleset)
        self._finish(request, decision.reason)
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
        removed = self.backend.remove(request.netns)
        self._finish(request, "removed table" if removed else "nothing to do: no table")

    def check(self, request: Request) -> None:
        conf = self._conf(request)
        if conf.prev_result is None:
            raise InvalidConfig("prevResult is missing: CHECK needs the result of the ADD it checks")
        decision = decide(conf, self._pod(request), self.log)
        actual = self.backend.read(request.netns)
        expected = None if decision.ruleset is None else normalize(decision.ruleset.objects())
        if actual != expected:
            raise InternalError(*describe_drift(expected, actual, decision.reason))
        routing = decision.ruleset.routing if decision.ruleset is not None else None
        drift = self.backend.routing_drift(request.netns, routing)
        if drift:
            raise InternalError(drift, "TPROXY needs both the table and its policy routing")
        self._finish(request, f"consistent: {decision.reason}")

    def status(self, request: Request) -> None:
        self._conf(request)
        self.backend.status()
        self._finish(request, "ready")

    def gc(self, request: Request) -> None:
        """Nothing to collect: every rule we make lives and dies with its pod netns."""
        self._conf(request)
        self._finish(request, "nothing to collect")

    # --- bookkeeping ---

    def _conf(self, request: Request) -> PluginConf:
        raw = request.config
        level, path = raw.get("log_level"), raw.get("log_file")
        # Configure logging first, so even a config error reaches the admin's log file.
        self.log.configure(level if isinstance(level, str) else "warning", path if isinstance(path, str) else None)
        if "fallback" in self._notes and not self._notes.get("warned"):
            self._notes["warned"] = True
            self.log.log("warning", str(self._notes["fallback"]))
        return parse_conf(raw)

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


def describe_drift(expected: list[dict] | None, actual: list[dict] | None, reason: str) -> tuple[str, str]:
    if actual is None:
        return f"{TABLE_NAME} is missing from the pod network namespace", "the pod's annotations require it"
    if expected is None:
        return f"{TABLE_NAME} exists but the pod should not be captured ({reason})", ""
    for index in range(max(len(expected), len(actual))):
        want = expected[index] if index < len(expected) else None
        have = actual[index] if index < len(actual) else None
        if want != have:
            return (
                f"{TABLE_NAME} differs from what the pod's annotations require (object {index})",
                f"expected {json.dumps(want)[:800]}; found {json.dumps(have)[:800]}",
            )
    return f"{TABLE_NAME} differs from what the pod's annotations require", ""  # pragma: no cover


def run_in_process(stdin: bytes, fallback: str | None = None) -> int:
    """Do the CNI command in this process: no CNI server configured, or (`fallback`, why) none answered."""
    code = dispatch(RedirectPlugin(fallback=fallback), os.environ, stdin, sys.stdout, sys.stderr)
    sys.stdout.flush()
    return code
