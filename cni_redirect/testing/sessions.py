"""One-call sessions on a backend, for tests and benchmarks: `at(backend, netns).apply(ruleset)`."""

from __future__ import annotations

from cni_redirect.backend import Backend, Observed
from cni_redirect.bounds import Bound
from cni_redirect.ruleset import Ruleset


class At:
    """A backend's session operations on one netns, one session per call: terse for tests."""

    def __init__(self, backend: Backend, netns: str) -> None:
        self.backend, self.netns = backend, netns

    def apply(self, ruleset: Ruleset) -> None:
        with self.backend.session(self.netns) as session:
            session.apply(ruleset)

    def remove(self) -> bool:
        with self.backend.session(self.netns) as session:
            return session.remove()

    def read(self, raw: bool = False, bound: Bound | None = None) -> list[dict] | None:
        with self.backend.session(self.netns) as session:
            return session.read(raw, bound)

    def observe(self, routing_wanted: bool = False, bound: Bound | None = None) -> Observed:
        with self.backend.session(self.netns) as session:
            return session.observe(routing_wanted, bound)


def at(backend: Backend, netns: str) -> At:
    return At(backend, netns)
