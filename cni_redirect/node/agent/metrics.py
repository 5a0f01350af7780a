"""The node agent's Prometheus metrics, served at /metrics beside /readyz (prometheus_client).

Requests are counted in the CNI server (the front stays stdlib-only and
keeps no state): a pod whose ADD ran in-process because no server answered
is not in `cni_redirect_requests_total`, and its `log_file` line carries a
`fallback` field instead. One registry per agent, so tests can run several.
"""

from __future__ import annotations

from collections import Counter as Tally

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ...skel import REQUIRED_ENV
from ..chaining.confdir import ChainMode

#: Every CNI error code we answer with (errors.py), and 0 for success.
CNI_CODES = frozenset({0, 1, 2, 4, 6, 7, 11, 50, 999})
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    CONTENT_TYPE = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "cni_redirect_requests",
            "CNI requests the CNI server answered, by command, outcome and CNI error code (0: success)",
            ["command", "outcome", "code"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "cni_redirect_request_duration_seconds",
            "Time the CNI server spent on a request, from reading it to the reply",
            ["command"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.repairs = Counter(
            "cni_redirect_repairs",
            "Pod tables repaired in place, by what was wrong",
            ["reason"],
            registry=self.registry,
        )
        self.pods = Gauge(
            "cni_redirect_pods",
            "Ready pod sandboxes on the node by state (ok, missing, drifted) or decision, from the last repair pass",
            ["state"],
            registry=self.registry,
        )
        self.reinsertions = Counter(
            "cni_redirect_conflist_reinsertions",
            "Times our entry was put back after the primary CNI rewrote its config without it",
            registry=self.registry,
        )
        self.chain_mode = Gauge(
            "cni_redirect_chain_mode",
            "1 for the way our entry reaches the runtime now: mode drop-in (libcni's drop-in file) or edit (inlined)",
            ["mode"],
            registry=self.registry,
        )
        self.chain_fallbacks = Counter(
            "cni_redirect_chain_mode_fallbacks",
            "Times drop-in mode was chosen but the primary config refused drop-ins (a single-plugin .conf, "
            "loadOnlyInlinedPlugins: true), so our entry was edited in",
            registry=self.registry,
        )
        self.agent_up = Gauge(
            "cni_redirect_agent_up",
            "1 while the node agent does its job (its CNI server serves)",
            registry=self.registry,
        )
        self.pass_failures = Counter(
            "cni_redirect_repair_pass_failures",
            "Repair passes that could not walk the node (CRI unreachable, not chained)",
            registry=self.registry,
        )
        self.sandbox_failures = Counter(
            "cni_redirect_repair_sandbox_failures",
            "Sandboxes a repair pass could not check or repair (status, netns or kernel failure); the pass went on",
            registry=self.registry,
        )
        self.last_pass_ok = Gauge(
            "cni_redirect_repair_last_pass_ok",
            "1 if the last repair pass walked the node (cni_redirect_pods is from it), else 0",
            registry=self.registry,
        )
        self._pod_states: set[str] = set()

    def observe(self, command: str, cni_code: int, seconds: float) -> None:
        """One answered CNI request: its CNI code as the dispatcher gave it (0: success)."""
        outcome = "ok" if cni_code == 0 else "error"
        # Label values come from a closed set: a made-up CNI_COMMAND (any root process on the node can send
        # one) must not grow the scrape without bound.
        known = command if command in REQUIRED_ENV else "other"
        cni_code = cni_code if cni_code in CNI_CODES else 999
        self.requests.labels(known, outcome, str(cni_code)).inc()
        self.duration.labels(known).observe(seconds)

    def pass_done(self, states: Tally[str], repaired: dict[str, int], error: str = "", failed: int = 0) -> None:
        """One repair pass. A failed pass counts as one and sets no pod gauge (they would be the last good
        pass's, or nothing): `cni_redirect_repair_last_pass_ok` says whether they are current."""
        self.sandbox_failures.inc(failed)
        self.last_pass_ok.set(0 if error else 1)
        if error:
            self.pass_failures.inc()
            return
        for state in self._pod_states - set(states):
            self.pods.labels(state).set(0)
        for state, count in states.items():
            self.pods.labels(state).set(count)
        self._pod_states |= set(states)
        for reason, count in repaired.items():
            self.repairs.labels(reason).inc(count)

    def set_chain_mode(self, mode: ChainMode | None) -> None:
        for known in ChainMode:
            self.chain_mode.labels(mode=known.value).set(1 if mode == known else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
