"""Fixtures and markers for every tier.

Markers follow the directories: everything under `integration/` is marked
`root` (network namespaces, the kernel's nftables), everything under `e2e/`
`root` and `e2e` (a real container runtime), so `pytest -m "not root"` runs
the unit tier, which needs nothing, in seconds. `slow` marks the heavy unit
tests (100 000-entry lists, large property runs): the full suite runs them,
`scripts/check.sh` leaves them out.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cni_redirect.testing.netlab import Processes

# Every property test in the suite runs this many examples, without a deadline (the machine has 2 cores).
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
MARKERS = {"integration": ("root",), "e2e": ("root", "e2e")}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        for marker in MARKERS.get(tier, ()):
            item.add_marker(getattr(pytest.mark, marker))


@pytest.fixture
def procs():
    """Background helpers (listeners) started by a test; stopped by PID afterwards."""
    processes = Processes()
    yield processes
    processes.stop()


@pytest.fixture(scope="session")
def bundle(tmp_path_factory) -> Path:
    """The self-contained plugin, built once per run by the same script the Containerfile runs."""
    out = tmp_path_factory.mktemp("bundle")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHON": sys.executable, "HOME": "/root"}
    proc = subprocess.run(
        [str(REPO / "install" / "build-bundle.sh"), str(out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"install/build-bundle.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return out / "cni-redirect"


@pytest.fixture
def host(tmp_path):
    """A temp node for the node agent: CNI bin and conf dirs, a bundle to install."""
    from tests.support import NodeHost

    return NodeHost(tmp_path)
