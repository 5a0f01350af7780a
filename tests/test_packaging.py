"""What the wheel ships: the plugin and the node agent, never the test labs (#32)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _subpackages() -> set[str]:
    return {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "cni_redirect").rglob("__init__.py")}


def test_every_package_but_the_test_labs_is_listed():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert listed == _subpackages() - {"cni_redirect.testing"}


@pytest.mark.slow
def test_the_built_wheel_holds_no_test_lab(tmp_path):
    # From a copy without the editable install's leftovers (build/, *.egg-info), which setuptools would reuse.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "tests", "bench")
    shutil.copytree(ROOT, source, ignore=ignore)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("cni_redirect-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cni_redirect/front.py" in names and "cni_redirect/node/agent/daemon.py" in names
    assert not [n for n in names if n.startswith("cni_redirect/testing/")]
