"""Fixtures and markers for every tier.

Markers follow the directories: everything under `integration/` is marked
`root` (network namespaces, the kernel's nftables), everything under `e2e/`
`root` and `e2e` (a real container runtime), everything under `cluster/` also
`cluster` (a real Kubernetes control plane and kubelet), so `pytest -m "not root"` runs
the unit tier, which needs nothing, in seconds. `slow` marks the heavy unit
tests (100 000-entry lists, large property runs): the full suite runs them,
`scripts/check.sh` leaves them out.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cni_redirect.testing.images import AGENT_IMAGE, storage_env
from cni_redirect.testing.netlab import Processes

# Every property test in the suite runs this many examples, without a deadline (the machine has 2 cores).
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci")

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
MARKERS = {"integration": ("root",), "e2e": ("root", "e2e"), "cluster": ("root", "e2e", "cluster")}


#: `CNIR_TEST_ORDER=reverse` runs each module's tests last to first: no test may rely on another's order (each
#: starts from a state its fixtures ensure), and this is how that is checked (docs/CONTRIBUTING.md).
ORDER = os.environ.get("CNIR_TEST_ORDER", "file")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    assert ORDER in ("file", "reverse"), f"CNIR_TEST_ORDER={ORDER!r}: file or reverse"
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        for marker in MARKERS.get(tier, ()):
            item.add_marker(getattr(pytest.mark, marker))
    if ORDER == "reverse":
        modules: dict[str, list[pytest.Item]] = {}
        for item in items:
            modules.setdefault(str(item.fspath), []).append(item)
        items[:] = [item for group in modules.values() for item in reversed(group)]


@pytest.fixture(scope="session")
def host_snapshot():
    """What the runtime tiers may disturb on the host, taken once before the first of them starts."""
    from cni_redirect.testing.host import HostSnapshot

    assert os.geteuid() == 0, "the e2e and cluster tiers must run as root (they start containerd)"
    return HostSnapshot.take()


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


@pytest.fixture(scope="session")
def go() -> str:
    """The Go toolchain that builds the compiled front: go on PATH, else where this machine kind has it."""
    import shutil

    found = shutil.which("go") or "/usr/local/go/bin/go"
    assert os.access(found, os.X_OK), (
        "Go is needed to build the compiled front (install/front); ./scripts/setup.sh checks"
    )
    return found


@pytest.fixture(scope="session")
def compiled_front(go, tmp_path_factory) -> Path:
    """The compiled front alone, built by the script build-bundle.sh runs (a few seconds, not the whole bundle)."""
    out = tmp_path_factory.mktemp("front") / "cni-redirect"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "GO": go, "HOME": os.environ.get("HOME", "/root")}
    proc = subprocess.run(
        [str(REPO / "install" / "front" / "build.sh"), str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, f"install/front/build.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return out


@pytest.fixture(scope="session")
def fronts(compiled_front, tmp_path_factory) -> dict[str, Path]:
    """Both fronts by name: "python", this checkout's console script, and "compiled", laid out as in the bundle
    with that console script beside it as `cni-redirect-py` (what it execs for what it does not answer)."""
    import shutil

    from cni_redirect.testing.netlab import PLUGIN

    folder = tmp_path_factory.mktemp("fronts")
    shutil.copy2(compiled_front, folder / "cni-redirect")  # a copy: it finds its Python front beside its real path
    (folder / "cni-redirect-py").symlink_to(PLUGIN)
    return {"python": PLUGIN, "compiled": folder / "cni-redirect"}


@pytest.fixture
def host(tmp_path):
    """A temp node for the node agent: CNI bin and conf dirs, a bundle to install."""
    from tests.support import NodeHost

    return NodeHost(tmp_path)


GLIBC_AND_ZLIB = r"^(ld-linux.*|libc|libm|libdl|libpthread|librt|libz)\.so(\.\d+)*$"


@pytest.fixture(scope="session")
def agent_image(tmp_path_factory) -> Path:
    """install/build-image.sh, exactly as the README runs it, into a podman store of the suite's own; checked
    (root user, install entrypoint, nothing outside the bundle but glibc and zlib) and saved as an OCI tar."""
    env = storage_env()
    start = time.monotonic()
    build = subprocess.run(["install/build-image.sh", AGENT_IMAGE], cwd=REPO, env=env, capture_output=True, text=True)
    assert build.returncode == 0, f"install/build-image.sh failed:\n{build.stdout}\n{build.stderr[-4000:]}"
    print(f"\n[image] built in {time.monotonic() - start:.0f} s: {build.stderr.strip()}")
    inspect = subprocess.run(
        ["podman", "image", "inspect", AGENT_IMAGE], env=env, capture_output=True, text=True, check=True
    )
    (info,) = json.loads(inspect.stdout)
    assert info["Config"].get("User") == "0" and info["Config"]["Entrypoint"][-1] == "install"
    files = _image_files(env)
    outside = sorted(f for f in files if not f.startswith("opt/cni-redirect/bundle/") and not f.endswith("/"))
    assert outside and all(re.match(GLIBC_AND_ZLIB, f.rsplit("/", 1)[-1]) for f in outside), outside
    assert not {"bin/sh", "usr/bin/apt", "usr/bin/dpkg"} & set(files), "no shell, no package manager"
    print(f"[image] {int(info['Size']) / 1e6:.1f} MB; outside the bundle: {outside}")
    tar = tmp_path_factory.mktemp("image") / "cni-redirect.tar"
    subprocess.run(["podman", "save", "--quiet", "-o", str(tar), AGENT_IMAGE], env=env, check=True)
    return tar


def _image_files(env: dict[str, str]) -> set[str]:
    container = subprocess.run(["podman", "create", AGENT_IMAGE], env=env, capture_output=True, text=True, check=True)
    cid = container.stdout.strip()
    try:
        export = subprocess.run(["podman", "export", cid], env=env, capture_output=True, check=True).stdout
    finally:
        subprocess.run(["podman", "rm", "-f", cid], env=env, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(export)) as tar:
        return {member.name + ("/" if member.isdir() else "") for member in tar.getmembers()}
