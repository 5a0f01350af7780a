import subprocess
import sys
from pathlib import Path

import pytest

# tests/ is importable as a package (tests.support); make sure the repo root is on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


REPO = Path(__file__).resolve().parents[1]


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
