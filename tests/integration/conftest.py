"""The real tier: root, network namespaces, the kernel's nftables. Missing any of them is a failure, never a skip."""

from __future__ import annotations

import contextlib
import os
import shutil

import pytest

from cni_redirect.testing.netlab import PLUGIN, Netns, PodNetwork, host_ruleset


@pytest.fixture(scope="session", autouse=True)
def real_kernel_required():
    assert os.geteuid() == 0, "the integration tier must run as root (network namespaces, nftables)"
    for tool in ("ip", "nft"):
        assert shutil.which(tool), f"'{tool}' is missing: run scripts/setup.sh (apt packages iproute2, nftables)"
    assert PLUGIN.exists(), f"{PLUGIN} is missing: run scripts/setup.sh"
    import nftables  # noqa: F401  - the bindings must import, or nothing below is real

    before = host_ruleset()
    yield
    assert host_ruleset() == before, "the host ruleset changed during the integration tier"


@pytest.fixture
def host_unchanged():
    before = host_ruleset()
    yield
    assert host_ruleset() == before, "the host ruleset changed"


@pytest.fixture
def pod(host_unchanged):
    """A bare pod netns (lo only), removed afterwards."""
    ns = Netns.create("pod")
    yield ns
    ns.delete()


@pytest.fixture
def net(host_unchanged):
    network = PodNetwork.create()
    yield network
    network.delete()


@pytest.fixture
def socket_dir():
    """Root's CNI server socket dir, made here if this machine has none (a fresh machine has none);
    removed again if this fixture made it and nothing else is left in it."""
    import os
    from pathlib import Path

    from cni_redirect.wire import SOCKET_DIRS

    path = Path(SOCKET_DIRS[0])
    made = not path.exists()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    yield path
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(path)
