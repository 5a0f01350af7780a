"""A fake `SandboxSource` (what the survey reads from CRI), for unit tests of survey, repair and inspect."""

from __future__ import annotations

from dataclasses import dataclass, field

from cni_redirect.cri import Sandbox, SandboxDetails
from cni_redirect.errors import CriError


@dataclass
class FakeSandbox:
    sandbox: Sandbox
    details: SandboxDetails | None  # None: gone between the listing and the status call
    error: str = ""  # a CRI status code name: the status call fails with it


@dataclass
class FakeCri:
    sandboxes: list[FakeSandbox] = field(default_factory=list)
    status_calls: list[str] = field(default_factory=list)
    closed: bool = False

    def add(
        self,
        name: str,
        annotations: dict[str, str] | None = None,
        namespace: str = "default",
        netns: str | None = None,
        host_network: bool = False,
        gone: bool = False,
        error: str = "",
        created_at: float = 0.0,
    ) -> str:
        """A ready sandbox; its netns path is /run/netns/<name> unless given. Returns the path."""
        path = netns if netns is not None else f"/run/netns/{name}"
        sandbox = Sandbox(f"id-{name}", namespace, name, f"uid-{name}", dict(annotations or {}), created_at)
        details = None if gone else SandboxDetails(host_network, path)
        self.sandboxes.append(FakeSandbox(sandbox, details, error))
        return path

    def ready_sandboxes(self) -> list[Sandbox]:
        return [fake.sandbox for fake in self.sandboxes]

    def sandbox_details(self, sandbox_id: str) -> SandboxDetails | None:
        self.status_calls.append(sandbox_id)
        (fake,) = [f for f in self.sandboxes if f.sandbox.id == sandbox_id]
        if fake.error:
            raise CriError(f"CRI PodSandboxStatus at fake: {fake.error}: transitional", fake.error)
        return fake.details

    def close(self) -> None:
        self.closed = True
