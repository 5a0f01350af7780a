"""What a pod gets, and whether its netns holds it: the one evaluation and the one comparison.

`evaluate(conf, pod)` turns the conflist entry, the pod's identity and its
annotations (in the entry's runtimeConfig, as the runtime hands them over)
into an `Evaluation`: the kind of outcome, the reason for people, every
setting with its value and where it came from, what a restricted policy
ignored, the spec and the ruleset. ADD, CHECK, `render`, `inspect`, the
survey and repair, `doctor` and the agent's entry check all use it; nothing
else layers settings.

`compare(evaluation, observed)` is the one comparison of what a pod should
have with what its netns holds (table listing and our policy routing):
CHECK, the survey (and so `inspect`, `doctor`, repair) use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from .bounds import DEFAULT_BOUND, Bound, bound_for
from .build import build_ruleset
from .config import ANNOTATIONS_CAPABILITY, PluginConf, PodRef, parse_conf
from .errors import CniError
from .profiles import PROFILES, profile_named
from .ruleset import FAMILY, TABLE, Observed, Ruleset, describe, normalize
from .settings import Setting, is_enabled, merge_settings
from .spec import ANNOTATION_PREFIX, OPT_IN_KEY, CaptureSpec, build_spec

TABLE_NAME = f"table {FAMILY} {TABLE}"
NO_NAMESPACE_NOTE = "no K8S_POD_NAMESPACE in CNI_ARGS: exclude_namespaces does not apply"


class Outcome(Enum):
    """The kind of decision for a pod. The values are the `decision` of `inspect --json` (a contract)."""

    CAPTURED = "captured"
    NOT_ENABLED = "not-enabled"
    EXCLUDED_NAMESPACE = "excluded-namespace"
    HOST_NETWORK = "host-network"  # the survey's: the sandbox shares the node's netns, ADD never sees it
    INVALID = "invalid"
    UNKNOWN = "unknown"  # the survey's: the runtime could not give the sandbox's status


@dataclass(frozen=True)
class Evaluation:
    """What one pod gets, and why; `error` is what ADD reports when the outcome is INVALID."""

    outcome: Outcome
    reason: str
    settings: Mapping[str, Setting] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # annotations a restricted policy ignored
    spec: CaptureSpec | None = None
    ruleset: Ruleset | None = None
    error: CniError | None = None
    notes: tuple[tuple[str, str], ...] = ()  # (level, message) worth a line in the plugin's log

    @property
    def captured(self) -> bool:
        return self.outcome is Outcome.CAPTURED

    @property
    def wants_routing(self) -> bool:
        return self.ruleset is not None and self.ruleset.routing is not None

    @property
    def tuning(self) -> Ruleset | None:
        """The ruleset when it sets anything besides the table (route MSS, sysctls): what `observe` reads too."""
        ruleset = self.ruleset
        return ruleset if ruleset is not None and (ruleset.route_mss or ruleset.sysctls) else None

    @property
    def read_bound(self) -> Bound:
        """How much of our table a reader lists in this pod's netns: room for what we would write, and more."""
        return DEFAULT_BOUND if self.ruleset is None else bound_for(self.ruleset.objects())

    def raise_if_invalid(self) -> None:
        if self.error is not None:
            raise self.error


def evaluate(conf: PluginConf, pod: PodRef) -> Evaluation:
    """Pure policy: from the entry (with the pod's annotations), and the pod's identity, to what it gets."""
    notes: list[tuple[str, str]] = []
    if pod.namespace is None:
        notes.append(("info", NO_NAMESPACE_NOTE))
    elif pod.namespace in conf.exclude_namespaces:
        reason = f"skipped: namespace {pod.namespace} is in exclude_namespaces"
        return Evaluation(Outcome.EXCLUDED_NAMESPACE, reason, notes=tuple(notes))
    if not conf.capabilities.get(ANNOTATIONS_CAPABILITY):
        notes.append(
            (
                "warning",
                f'conflist entry lacks "capabilities": {{"{ANNOTATIONS_CAPABILITY}": true}}: '
                "the runtime passes no pod annotations, only defaults apply",
            )
        )
    settings: dict[str, Setting] = {}
    ignored: list[str] = []
    try:
        settings, ignored = merge_settings(
            conf.defaults, conf.annotations(), conf.annotation_policy, conf.pod_settable, profile_named(conf.profile)
        )
        if ignored:
            notes.append(
                ("warning", f"annotation_policy restricted: ignored {', '.join(sorted(ignored))} (not in pod_settable)")
            )
        if not is_enabled(settings):
            why = settings[OPT_IN_KEY].why
            if why:
                notes.append(("info", f"not capturing: {why}"))
            reason = f"skipped: not enabled ({why})" if why else "skipped: not enabled"
            return Evaluation(Outcome.NOT_ENABLED, reason, settings, tuple(ignored), notes=tuple(notes))
        spec = build_spec(
            settings, allow_root_proxy_uid=conf.allow_root_proxy_uid, max_set_elements=conf.max_set_elements
        )
    except CniError as error:
        return Evaluation(Outcome.INVALID, error.msg, settings, tuple(ignored), error=error, notes=tuple(notes))
    ruleset = build_ruleset(spec)
    return Evaluation(Outcome.CAPTURED, "captured", settings, tuple(ignored), spec, ruleset, notes=tuple(notes))


def evaluate_sandbox(entry: Mapping[str, object], pod: PodRef, annotations: Mapping[str, str]) -> Evaluation:
    """As ADD would decide for a sandbox now: our installed entry, with the sandbox's annotations."""
    raw = {**entry, "runtimeConfig": {ANNOTATIONS_CAPABILITY: dict(annotations)}, "prevResult": {}}
    try:
        conf = parse_conf(raw)
    except CniError as error:
        return Evaluation(Outcome.INVALID, error.msg, error=error)
    return evaluate(conf, pod)


def entry_check_pods(conf: PluginConf) -> list[tuple[str, Evaluation]]:
    """The entry evaluated for every kind of pod a node starts (the agent's entry check): one with no
    annotation, one opted in with our own annotation, and one opted in by each mesh profile's injector. Each
    is named for the log line that refuses an entry."""
    pods: list[tuple[str, dict[str, str]]] = [
        ("a pod without annotations", {}),
        (f"a pod annotated {ANNOTATION_PREFIX}{OPT_IN_KEY}=true", {ANNOTATION_PREFIX + OPT_IN_KEY: "true"}),
    ]
    pods += [(f"a pod {name}'s injector opted in", dict(profile.opted_in)) for name, profile in PROFILES.items()]
    found = []
    for who, pod_annotations in pods:
        pod_conf = conf.model_copy(update={"runtime_config": {ANNOTATIONS_CAPABILITY: pod_annotations}})
        found.append((who, evaluate(pod_conf, PodRef(None, None, None))))
    return found


# --- the comparison ---


class DriftKind(Enum):
    MISSING = "missing"  # the pod should have our table, and has none
    DRIFTED = "drifted"  # the table or its policy routing differs from what the pod should have
    UNEXPECTED = "unexpected"  # a table where none belongs


@dataclass(frozen=True)
class Drift:
    kind: DriftKind
    message: str  # the first difference, for people (CHECK's error message)
    details: str = ""


def compare(evaluation: Evaluation, observed: Observed) -> Drift | None:
    """What differs between what the pod should have and what its netns holds; None when nothing does."""
    ruleset = evaluation.ruleset
    expected = None if ruleset is None else normalize(ruleset.objects())
    if observed.oversized:
        if expected is None:
            return Drift(
                DriftKind.UNEXPECTED, f"{TABLE_NAME} exists but the pod should not be captured ({evaluation.reason})"
            )
        return Drift(
            DriftKind.DRIFTED,
            f"{TABLE_NAME} is far larger than what the pod's annotations require ({observed.oversized}); not read",
            "a process in the pod added to our table; it is replaced",
        )
    actual = None if observed.listing is None else normalize(observed.listing)
    if actual != expected:
        return _table_drift(expected, actual, evaluation.reason)
    want = ruleset.routing.objects(ipv6=observed.ipv6) if ruleset is not None and ruleset.routing else []
    missing = [obj for obj in want if obj not in observed.routing]
    extra = [obj for obj in observed.routing if obj not in want]
    why = "TPROXY needs both the table and its policy routing"
    if missing:
        message = "TPROXY policy routing is missing from the pod network namespace: "
        return Drift(DriftKind.DRIFTED, message + "; ".join(map(describe, missing)), why)
    if extra:
        message = "TPROXY policy routing is present but the pod's table does not use it: "
        return Drift(DriftKind.DRIFTED, message + "; ".join(map(describe, extra)), why)
    return _tuning_drift(ruleset, observed)


def _tuning_drift(ruleset: Ruleset | None, observed: Observed) -> Drift | None:
    """`loopback-mss`'s advmss on every route of the pod's (a route the primary added later has none), and the
    sysctls the pod's settings set."""
    if ruleset is None:
        return None
    if ruleset.route_mss is not None and observed.without_mss:
        return Drift(
            DriftKind.DRIFTED,
            f"loopback-mss: routes without an advmss in the pod network namespace: {', '.join(observed.without_mss)}",
            "a captured connection over them would offer its eth0 MSS to the proxy",
        )
    held = dict(observed.sysctls)
    for name, value in ruleset.sysctls:
        if held.get(name) != value:
            return Drift(DriftKind.DRIFTED, f"the pod's {name} is {held.get(name)!r}, its settings say {value!r}")
    return None


def _table_drift(expected: list[dict] | None, actual: list[dict] | None, reason: str) -> Drift:
    if actual is None:
        return Drift(
            DriftKind.MISSING,
            f"{TABLE_NAME} is missing from the pod network namespace",
            "the pod's annotations require it",
        )
    if expected is None:
        return Drift(DriftKind.UNEXPECTED, f"{TABLE_NAME} exists but the pod should not be captured ({reason})")
    index = next(i for i in range(max(len(expected), len(actual))) if _at(expected, i) != _at(actual, i))
    return Drift(
        DriftKind.DRIFTED,
        f"{TABLE_NAME} differs from what the pod's annotations require (object {index})",
        f"expected {json.dumps(_at(expected, index))[:800]}; found {json.dumps(_at(actual, index))[:800]}",
    )


def _at(objects: list[dict], index: int) -> dict | None:
    return objects[index] if index < len(objects) else None
