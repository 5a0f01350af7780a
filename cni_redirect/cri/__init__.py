"""A CRI `runtime.v1` client: the node agent's view of the pod sandboxes on its node.

The stubs (`runtime_pb2`, `runtime_pb2_grpc`) are generated from our own
`runtime.proto`, a subset of k8s.io/cri-api with upstream field numbers, by
`scripts/gen-cri.sh`, and committed. Only the node agent and the tests
import this: the plugin's thin front never does.
"""

from __future__ import annotations

import json

import grpc

from . import runtime_pb2 as pb
from .runtime_pb2_grpc import RuntimeServiceStub


class CriClient:
    """A gRPC channel to the runtime's CRI socket and the RuntimeService on it."""

    pb = pb

    def __init__(self, socket: str, timeout: float = 10.0) -> None:
        self.socket = socket
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        self.stub = RuntimeServiceStub(self.channel)

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def list_sandboxes(self, ready_only: bool = False) -> list:
        request = pb.ListPodSandboxRequest()
        if ready_only:
            request.filter.state.state = pb.SANDBOX_READY
        return list(self.stub.ListPodSandbox(request, timeout=self.timeout).items)

    def sandbox_status(self, sandbox_id: str, verbose: bool = True):
        request = pb.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=verbose)
        return self.stub.PodSandboxStatus(request, timeout=self.timeout)


def sandbox_netns(status) -> str | None:
    """The netns path of a sandbox, from its verbose status: the runtime spec's network
    namespace (containerd, CRI-O), else `/proc/<pid>/ns/net` of the sandbox's process."""
    try:
        info = json.loads(status.info.get("info", "{}"))
    except ValueError:
        return None
    for namespace in info.get("runtimeSpec", {}).get("linux", {}).get("namespaces", []):
        if namespace.get("type") == "network" and namespace.get("path"):
            return namespace["path"]
    pid = info.get("pid")
    return f"/proc/{pid}/ns/net" if isinstance(pid, int) and pid > 0 else None
