"""The node agent's process: install the bundle, keep our entry chained, repair, serve probes and metrics.

It runs as the DaemonSet's main process with the host's CNI bin and conf
dirs mounted. Start-up order, so that nothing is claimed that cannot be
served: probe socket (private), CNI server listening under a temp name,
bundle installed, HTTP port bound; only then is the CNI socket renamed over
the shared path, the node claimed (`ownership.py`) and our entry chained.
A failure before that leaves the node as it was: the predecessor's socket,
token and entry untouched.

Upgrades without a gap (the DaemonSet surges: the new pod starts before the
old one stops): the new agent claims the node once it can serve; the old one
sees a live successor, stops editing and repairing (standby), and on SIGTERM
drains its socket and exits. If the successor goes away (a rollout undone, a
surge pod deleted, a crash) the old agent takes the node back.

Stopping never uninstalls: SIGTERM without a successor is as often a
liveness restart as a DaemonSet deletion. Entry and bundle stay (the plugin
works in-process with no agent); `cni-redirect uninstall` removes them.
"""

from __future__ import annotations

import http.server
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ... import wire
from ...errors import CniRedirectError, NodeApiError, SettingsError
from ...logs import JsonLog
from ...threads import NamedThread
from .. import CHAIN_MODES, REPAIR_MODES
from ..chaining.bundle import Bundle
from ..chaining.chain import ChainInstaller, ChainPass, load_entry_settings
from ..chaining.dropin import choose_mode
from ..options import Options
from .httpport import serve_readiness
from .ownership import Ownership, State
from .watch import DirWatch

if TYPE_CHECKING:
    from ...cniserver import CniServer
    from ..pods.nftevents import NftablesEvents
    from ..pods.repair import Repairer
    from .metrics import Metrics
    from .probe import ProbeServer


def check_agent_socket(path: str) -> str:
    """The front only talks to sockets it can trust: root's directory, a plain path."""
    if not wire.trusted_socket_path(path):
        raise SettingsError(f"--agent-socket {path!r} must be a .sock path under {' or '.join(wire.SOCKET_DIRS)}")
    return path


class NodeAgent:
    """The bundle and the chain on one node, reconciled together, and this agent's place among the node's agents."""

    def __init__(self, options: Options, log: Callable[..., None], entry: dict[str, Any]) -> None:
        self.options = options
        self.log = log
        self.bundle = Bundle(options.plugin_source, options.cni_bin_dir, log)
        self.runtime_name = ""  # the node's runtime by CRI's name, when asked (chain mode auto)

        def ask_runtime() -> tuple[str, str]:
            name, version = _runtime_version(options.cri_socket)
            self.runtime_name = name
            return name, version

        self.choice = choose_mode(options.chain_mode, ask_runtime)
        log("info", "chain mode", mode=self.choice.mode, why=self.choice.why)
        self.chain = ChainInstaller(
            options.cni_conf_dir, entry, log, options.conf_file, options.wait_log_interval, self.choice
        )
        self.ownership = Ownership(options.cni_bin_dir)
        self.problem = ""  # the last iteration's failure (a reinstall on a full disk, EROFS, EIO): unready, retried
        self.pass_started: float | None = None  # monotonic time the running pass began; None between passes

    def stuck(self, deadline: float) -> str:
        """Why the probes should not trust the last pass's answer: one running for longer than `deadline`."""
        started = self.pass_started
        if started is None or time.monotonic() - started <= deadline:
            return ""
        return f"a pass over the CNI dirs has not finished in {time.monotonic() - started:.0f} s (a blocked read?)"

    @property
    def ready_reason(self) -> str:
        return self.problem or self.chain.ready_reason

    def install(self) -> None:
        with self.ownership.installing():
            self.bundle.install()
            runtime = self.runtime_name or runtime_of_socket(self.options.cri_socket)
            if runtime:
                self.ownership.record_runtime(runtime)

    def reconcile(self) -> ChainPass:
        """One pass: the plugin in the bin dir and our entry in the primary config.

        A failure is this iteration's, not the agent's: it is logged once, makes the agent unready with the
        reason, and the next iteration tries again."""
        self.pass_started = time.monotonic()
        try:
            if not self.bundle.installed():  # gone, or not ours (a successor's that went away): ours again
                with self.ownership.installing():
                    self.bundle.ensure()
            result = self.chain.reconcile()
        except Exception as exc:  # a full disk, EROFS, EIO, or a bug: never a reason to stop
            problem = f"cannot keep the plugin installed: {type(exc).__name__}: {exc}"
            if problem != self.problem:
                self.log("error", problem)
            self.problem = problem
            return ChainPass(False, problem, mode=self.chain.mode)
        finally:
            self.pass_started = None
        if self.problem:
            self.log("info", "recovered", was=self.problem)
        self.problem = ""
        return result


#: A pass over the CNI dirs takes milliseconds; one running longer is reported by readiness, then by liveness.
PASS_DEADLINE_READY, PASS_DEADLINE_HEALTHY = 10.0, 60.0


def runtime_of_socket(cri_socket: str) -> str:
    """The runtime the admin's CRI socket path names, where the agent did not ask it (an explicit chain mode, the
    minimal install without the socket mounted): `uninstall` needs only containerd or CRI-O."""
    name = cri_socket.rsplit("/", 1)[-1]
    return "containerd" if "containerd" in name else "cri-o" if "crio" in name else ""


def _runtime_version(cri_socket: str) -> tuple[str, str]:
    """The runtime's name and version, asked once at start (a few ms; the agent loads grpc for repair anyway)."""
    from ...cri import CriClient

    client = CriClient(cri_socket, timeout=5.0)
    try:
        return client.version()
    finally:
        client.close()


def checked_entry(options: Options) -> dict[str, Any]:
    """Our conflist entry from the admin's settings and flags, or SettingsError naming what is wrong."""
    ours = load_entry_settings(options.entry_file)
    if options.agent_socket is not None:
        ours["agent_socket"] = check_agent_socket(str(options.agent_socket))
    if options.repair not in REPAIR_MODES:
        raise SettingsError(f"--repair {options.repair!r} must be one of {', '.join(REPAIR_MODES)}")
    if options.chain_mode not in CHAIN_MODES:
        raise SettingsError(f"--chain-mode {options.chain_mode!r} must be one of {', '.join(CHAIN_MODES)}")
    return ours


def run(options: Options, log: Callable[..., None] | None = None, stop: threading.Event | None = None) -> int:
    """The node agent's main loop; returns the exit code."""
    log = log or JsonLog()
    stop = stop or threading.Event()
    try:
        ours = checked_entry(options)
    except CniRedirectError as exc:
        message = getattr(exc, "msg", None) or str(exc)
        log("error", "invalid plugin settings; nothing installed", entry_file=str(options.entry_file), error=message)
        return 2
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
    agent = NodeAgent(options, log, ours)
    watch = DirWatch((options.cni_conf_dir, options.cni_bin_dir), options.recheck_interval, options.poll_interval)
    services = _Services(options, log, agent, watch.wake)
    try:
        try:
            services.prepare()  # nothing shared is touched yet
            agent.install()
            services.bind_port()
            services.take_node()  # the claim first: if it fails (EIO, ENOSPC), the predecessor's socket is untouched
        except OSError as exc:
            log("error", "cannot start: nothing taken over on this node", error=f"{type(exc).__name__}: {exc}")
            return 1

        def wake_on_stop() -> None:
            stop.wait()
            watch.wake()

        NamedThread(wake_on_stop, "stop-waker").start()
        log("info", "agent started", bin_dir=str(options.cni_bin_dir), conf_dir=str(options.cni_conf_dir))
        while not stop.is_set():
            services.step()
            # a change in the conf or bin dir, a stop, the owner's end, the periodic re-check; sooner while a file
            # we swapped out is watched for the primary's late write into it
            watch.wait(agent.chain.wants_pass_in())
    finally:
        services.finish()
        watch.close()
        log("info", "agent stopped: entry and plugin stay in place (cni-redirect uninstall removes them)")
    return 0


class _Services:
    """What the agent runs beside its loop: probes, the CNI server, the HTTP port, the repair thread; and the
    agent's state among the node's agents (owner, standby), which decides which of them run."""

    def __init__(self, options: Options, log: Callable[..., None], agent: NodeAgent, wake: Callable[[], None]) -> None:
        self.options, self.log, self.agent, self.wake = options, log, agent, wake
        self.metrics: Metrics | None = _metrics() if options.readiness_port else None
        self.server: CniServer | None = None
        self.probe: ProbeServer | None = None
        self.http_server: http.server.ThreadingHTTPServer | None = None
        self.repairer: Repairer | None = None
        self.repair_stop, self.repair_wake = threading.Event(), threading.Event()
        self.state: State | None = None  # None while starting, then State.OWNER or State.STANDBY
        self.watching: str | None = None  # the owner whose end we wait for, in standby
        self.tainted = bool(options.not_ready_taint)  # the new-node taint may still be on the node
        self.taint_problem = ""

    # --- start-up: nothing shared is taken before the agent can serve ---

    def prepare(self) -> None:
        self.agent.ownership.enter()
        if self.options.probe_socket is not None:
            from .probe import ProbeServer

            self.probe = ProbeServer(self.options.probe_socket, self.answer)
            self.probe.start()
        if self.options.agent_socket is not None:
            from ...cniserver import CniServer

            observe = self.metrics.observe if self.metrics else None
            self.server = CniServer(self.options.agent_socket, self.log, observe=observe)
            self.server.bind()  # listening, but under a temp name: the shared path is still the predecessor's

    def bind_port(self) -> None:
        if self.metrics is not None:
            server, metrics = self.server, self.metrics
            metrics.agent_up.set_function(
                lambda: 1 if self.state == State.OWNER and not (server is not None and server.problem()) else 0
            )
        self._open_http()

    def take_node(self) -> None:
        """Claim the node, publish our socket, start repairing: from now on we run it. The claim comes first: one
        that fails leaves the running agent's socket where it is (a rename over it could not be undone)."""
        self.agent.ownership.claim()
        if self.server is not None:
            self.server.take_path()
        self.state = State.OWNER
        self.watching = None
        if self.http_server is None:
            self._open_http()
        self.repair_stop.clear()
        if self.repairer is None:  # taking the node back (after `uninstall --force`): the one we run goes on
            self.repairer = _start_repair(
                self.options, self.log, self.server, self.repair_stop, self.repair_wake, self.metrics
            )

    # --- the loop ---

    def step(self) -> None:
        state = self.agent.ownership.state()
        if state is State.STANDBY:
            self.stand_by()
        elif state is State.UNOWNED:
            self.log("info", "the agent that had taken over this node is gone: taking it back")
            try:
                self.take_node()
            except OSError as exc:  # EIO, ENOSPC on the owner file: the next iteration tries again
                self.log("error", "cannot take the node back", error=f"{type(exc).__name__}: {exc}")
                return
            self.reconcile()
        else:
            self.keep_socket()
            self.reconcile()

    def reconcile(self) -> None:
        first_insert = self.agent.chain.writes == 0
        result = self.agent.reconcile()
        if result.wrote:
            self.repair_wake.set()  # pods may have started while our entry was gone
            if not first_insert and self.metrics is not None:  # the first pass that wrote is the install
                self.metrics.reinsertions.inc(result.wrote)
        if self.metrics is not None:
            self.metrics.chain_fallbacks.inc(int(result.fell_back))
            self.metrics.set_chain_mode(result.mode)
        if self.tainted and self.state == State.OWNER and not self.agent.ready_reason:
            self.untaint()

    def untaint(self) -> None:
        """Installed, chained, running the node: opted-in pods may be scheduled here now. A failure is logged
        once per distinct reason and tried again on the next iteration; readiness does not wait for it."""
        from .nodetaint import NodeApi

        key = self.options.not_ready_taint
        try:
            removed = NodeApi.in_cluster(self.options.node_name).remove_taint(key)
        except NodeApiError as exc:
            if str(exc) != self.taint_problem:
                self.log("error", "cannot take the new-node taint off; trying again", taint=key, error=str(exc))
                self.taint_problem = str(exc)
            return
        self.tainted = False
        if removed:
            self.log("info", "took the new-node taint off: pods may be scheduled here", taint=key,
                     node=self.options.node_name)  # fmt: skip

    def keep_socket(self) -> None:
        """The shared path holds a dead agent's socket, or none: ours again, unless a live agent is starting
        (it renames its socket over the path just before it claims the node)."""
        server = self.server
        if server is None or server.owns_path():
            return
        others = [t for t in self.agent.ownership.live_agents() if t != self.agent.ownership.token]
        if others:
            return
        self.log("info", "the CNI socket path is not ours any more and no other agent runs: serving it again")
        server.take_path()

    def stand_by(self) -> None:
        """A newer agent runs the node: stop repairing and serving the port (scrapes reach it now); wake the
        loop the moment it ends."""
        owner = self.agent.ownership.owner()
        if self.state != State.STANDBY:
            self.log("info", "a newer node agent took over this node: standing by", owner=owner)
            self.state = State.STANDBY
            self.repair_stop.set()
            self.repair_wake.set()
            if self.repairer is not None:
                self.repairer.close()
                self.repairer = None
            self._close_http()
        if owner is not None and owner != self.watching:
            self.watching = owner
            self.agent.ownership.when_gone(owner, self.wake)

    def answer(self, question: str) -> str:
        """The exec probes' answer, from this agent's own state: "" when all is well, else why not."""
        server = self.server
        if question == "healthy":
            stuck = self.agent.stuck(PASS_DEADLINE_HEALTHY)  # liveness: a restart ends a pass that never will
            if stuck or server is None:
                return stuck
            return server.problem(own_path=self.state == State.OWNER)
        if self.state is None:
            return "starting: installing the plugin"
        if self.state == State.STANDBY:
            return f"standby: agent {self.agent.ownership.owner()} runs this node"
        return self.agent.stuck(PASS_DEADLINE_READY) or self.agent.ready_reason

    # --- the end ---

    def finish(self) -> None:
        """SIGTERM (or a failed start): stop, leaving entry and bundle in place; drop only what is ours."""
        self.repair_stop.set()
        self.repair_wake.set()
        if self.state == State.STANDBY:
            self.log("info", "stopping: a newer agent runs this node")
        if self.server is not None:
            if self.state == State.STANDBY:
                self.server.drain()
            else:
                self.server.stop()  # unlinks the shared path only if it is still our socket
        if self.repairer is not None:
            self.repairer.close()
        self._close_http()
        if self.probe is not None:
            self.probe.close()
        self.agent.ownership.leave()

    def _open_http(self) -> None:
        if self.options.readiness_port:
            self.http_server = serve_readiness(
                self.options.readiness_port, self.answer, lambda: self.agent.chain.warning, self.log, self.metrics
            )

    def _close_http(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
            self.http_server.server_close()
            self.http_server = None


def _metrics() -> Metrics:
    from .metrics import Metrics

    return Metrics()


def _nftables_events(log: Callable[..., None]) -> NftablesEvents | None:
    """Hear nftables transactions from the node's netns, so quiet pods are not entered; None (every pod's
    generation read, as before) where this kernel does not deliver them across netns."""
    from ...errors import KernelError
    from ..pods.nftevents import NftablesEvents

    try:
        events = NftablesEvents.open()
    except KernelError as exc:
        log("info", f"repair reads every pod's nftables generation: {exc.msg}: {exc.details}")
        return None
    log("info", "repair hears nftables transactions: a pod whose netns had none is not entered")
    return events


def _start_repair(
    options: Options,
    log: Callable[..., None],
    server: CniServer | None,
    stop: threading.Event,
    wake: threading.Event,
    metrics: Metrics | None = None,
) -> Repairer | None:
    if options.repair == "off":
        return None
    from ...cri import CriClient
    from ..pods.repair import PassResult, Repairer
    from ..pods.survey import kernel_sessions

    def passed(result: PassResult) -> None:
        if metrics is not None and result.chained:  # before the first insert (the agent's start) is no failure
            metrics.pass_done(result.states, result.reasons, result.error, result.failed)

    repairer = Repairer(
        CriClient(options.cri_socket),
        options.cni_conf_dir,
        log,
        mode=options.repair,
        conf_file=options.conf_file,
        sessions=kernel_sessions(server.locks if server is not None else None),
        on_pass=passed,
        events=_nftables_events(log),
    )
    repairer.start(stop, wake, options.repair_interval)
    return repairer
