"""A CRI `runtime.v1` client: the node agent's view of the pod sandboxes on its node.

The stubs (`runtime_pb2`, `runtime_pb2_grpc`) are generated from our own
`runtime.proto`, a subset of k8s.io/cri-api with upstream field numbers, by
`scripts/gen-cri.sh`, and committed. Only the node agent and the tests
import this: the plugin's thin front never does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from ..errors import CriError
from . import runtime_pb2 as pb
from .runtime_pb2_grpc import RuntimeServiceStub

T = TypeVar("T")


@dataclass(frozen=True)
class Sandbox:
    """One pod sandbox as listed: who it is and its annotations."""

    id: str
    namespace: str
    name: str
    uid: str
    annotations: dict[str, str] = field(default_factory=dict)
    created_at: float = 0.0  # seconds since the epoch, as the runtime lists it (0: not said)


@dataclass(frozen=True)
class SandboxDetails:
    """What the survey needs from a sandbox's (verbose) status."""

    host_network: bool
    netns: str | None  # None: the runtime reports no path


def _sandbox(listed: pb.PodSandbox) -> Sandbox:
    meta = listed.metadata
    return Sandbox(listed.id, meta.namespace, meta.name, meta.uid, dict(listed.annotations), listed.created_at / 1e9)


def _cri_error(what: str, socket: str, exc: grpc.RpcError) -> CriError:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    name = code.name if code is not None else "UNKNOWN"
    return CriError(f"CRI {what} at {socket}: {name}: {details}", name)


def _call(what: str, socket: str, call: Callable[[], T]) -> T:
    """One CRI call; a gRPC error becomes a CriError naming the call, the socket and the status."""
    try:
        return call()
    except grpc.RpcError as exc:
        raise _cri_error(what, socket, exc) from None


class CriClient:
    """A gRPC channel to the runtime's CRI socket and the RuntimeService on it.

    The channel is made on first use, and `close()` lets it go until the next call: an open channel
    costs CPU while idle (about 0.04 % of a core here), a new one about a millisecond, so the repair
    loop closes it between passes."""

    pb = pb

    def __init__(self, socket: str, timeout: float = 10.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self._channel: grpc.Channel | None = None
        self._stub: RuntimeServiceStub | None = None

    def _connect(self) -> tuple[grpc.Channel, RuntimeServiceStub]:
        if self._channel is None or self._stub is None:
            self._channel = grpc.insecure_channel(f"unix://{self.socket}")
            self._stub = RuntimeServiceStub(self._channel)
        return self._channel, self._stub

    @property
    def channel(self) -> grpc.Channel:
        return self._connect()[0]

    @property
    def stub(self) -> RuntimeServiceStub:
        return self._connect()[1]

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def version(self) -> tuple[str, str]:
        """The runtime's name and version (CRI Version), e.g. ("containerd", "v2.4.2"); CriError on failure."""
        answer = _call("Version", self.socket, lambda: self.stub.Version(pb.VersionRequest(), timeout=self.timeout))
        return answer.runtime_name, answer.runtime_version

    def list_sandboxes(self, ready_only: bool = False) -> list[Any]:
        request = pb.ListPodSandboxRequest()
        if ready_only:
            request.filter.state.state = pb.SANDBOX_READY
        return list(self.stub.ListPodSandbox(request, timeout=self.timeout).items)

    def sandbox_status(self, sandbox_id: str, verbose: bool = True) -> Any:
        request = pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
        return self.stub.PodSandboxStatus(request, timeout=self.timeout)

    # --- the survey's view (node/pods/survey.py `SandboxSource`): typed values, CriError on failure ---

    def ready_sandboxes(self) -> list[Sandbox]:
        items = _call("ListPodSandbox", self.socket, lambda: self.list_sandboxes(ready_only=True))
        return [_sandbox(s) for s in items]

    def sandbox_details(self, sandbox_id: str) -> SandboxDetails | None:
        """None when the sandbox is gone since it was listed."""
        try:
            status = self.sandbox_status(sandbox_id)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise _cri_error("PodSandboxStatus", self.socket, exc) from None
        host_network = status.status.linux.namespaces.options.network == pb.NODE
        return SandboxDetails(host_network, sandbox_netns(status))

    def container_starts(self, sandbox_id: str) -> list[float]:
        """When each running container of a sandbox started, in seconds since the epoch."""
        request = pb.ListContainersRequest()
        request.filter.pod_sandbox_id = sandbox_id
        request.filter.state.state = pb.CONTAINER_RUNNING

        def starts() -> list[float]:
            found = []
            for container in self.stub.ListContainers(request, timeout=self.timeout).containers:
                status_request = pb.ContainerStatusRequest(container_id=container.id)
                status = self.stub.ContainerStatus(status_request, timeout=self.timeout)
                found.append(status.status.started_at / 1e9)
            return found

        return _call("ListContainers", self.socket, starts)


def sandbox_netns(status: Any) -> str | None:
    """The netns path of a sandbox, from its verbose status: the runtime spec's network
    namespace (containerd, CRI-O), else `/proc/<pid>/ns/net` of the sandbox's process."""
    try:
        info = json.loads(status.info.get("info", "{}"))
    except ValueError:
        return None
    if not isinstance(info, dict):
        return None
    spec = info.get("runtimeSpec")
    linux = spec.get("linux") if isinstance(spec, dict) else None
    namespaces = linux.get("namespaces") if isinstance(linux, dict) else None
    for namespace in namespaces if isinstance(namespaces, list) else []:
        if isinstance(namespace, dict) and namespace.get("type") == "network" and namespace.get("path"):
            return str(namespace["path"])
    pid = info.get("pid")
    return f"/proc/{pid}/ns/net" if isinstance(pid, int) and pid > 0 else None
