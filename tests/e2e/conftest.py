"""The end-to-end tier: real runtimes run the real CNI chain. Nothing here skips.

Each runtime is module-scoped: its teardown restores the host before the next
runtime starts, so one runtime's cleanup can never pull state from under another.
"""

from __future__ import annotations

import pytest

from cni_redirect.testing.containerd import VERSIONS, Containerd, new_workdir
from cni_redirect.testing.host import tear_down


def running_containerd(host_snapshot, prepare=None, **options):
    """A private containerd (`options` go to Containerd) and its CRI client; `prepare(runtime)` runs once it
    is up (importing an image). Everything is torn down and the host checked afterwards."""
    workdir = new_workdir()
    runtime = Containerd(workdir, **options)
    client = None
    try:
        runtime.start()
        if prepare is not None:
            prepare(runtime)
        client = runtime.connect()
        yield client
    finally:
        try:
            if client is not None:
                client.remove_all()
                client.close()
        finally:
            tear_down(runtime, host_snapshot, workdir)


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def containerd(host_snapshot, request):
    """containerd whose chain already ends with cni-redirect (the venv's plugin); each tested version in turn."""
    yield from running_containerd(host_snapshot, with_plugin=True, version=request.param)


@pytest.fixture(scope="module", params=VERSIONS, ids=[f"containerd-{v}" for v in VERSIONS])
def bare_containerd(host_snapshot, request):
    """containerd on a node where cni-redirect is not installed yet; each tested version in turn."""
    yield from running_containerd(host_snapshot, with_plugin=False, version=request.param)


@pytest.fixture(scope="module")
def podman(host_snapshot):
    from tests.e2e.podman import Podman

    workdir = new_workdir()
    runtime = Podman(workdir)
    try:
        runtime.start()
        yield runtime
    finally:
        tear_down(runtime, host_snapshot, workdir)
